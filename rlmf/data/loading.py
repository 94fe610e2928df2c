"""Batches that are the same on every run: each epoch's order is a pure function of ``(seed, epoch)``, each process
takes its own share, and a run resumed mid-epoch continues with the very next batch.

Every training loader of the pipeline is built here (:class:`RowsDataModule`), so three things hold everywhere:

* **Several processes.** Rank ``r`` of ``w`` takes batches ``r, r + w, ...`` of the epoch's order, and every rank
  gets the same number of batches (DDP steps in lock-step; a rank with one batch more would hang the others).
  Lightning's own distributed-sampler injection is therefore off (``use_distributed_sampler=False``).
* **Exact resume.** Lightning restores ``global_step`` from ``last.ckpt`` before the epoch's iterator is created;
  the sampler turns it into (epoch, batches already trained on in it) then, and skips those batches instead of
  replaying the epoch from its start. (Lightning's own per-epoch batch counters are not used: whether they count
  the batch being saved depends on which hook saved the checkpoint.)
* **No hidden randomness.** The order comes from the sampler's own seeded generator, and each loader has its own
  ``torch.Generator``, so building an iterator never draws from the global RNG (whose state a checkpoint restores).
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

# (batches in epoch e, as a function of e) -> (epoch, batches already trained on in it)
Progress = Callable[[Callable[[int], int]], Tuple[int, int]]


class EpochBatchSampler(Sampler[List[int]]):
    """Batches of row indices: shuffled (or in order), optionally bucketed by length, sharded by rank, resumable.

    With ``lengths``, each epoch shuffles, cuts the order into windows of ``bucket_batches`` batches, sorts each
    window by length and shuffles the batches: little padding, still random. With ``max_tokens`` (``lengths``
    required) a batch is not ``batch_size`` rows but as many consecutive rows of that order as fit in ``max_tokens``
    summed ``lengths`` (a longer row alone), so the number of batches may differ from epoch to epoch. ``progress`` (set by
    :class:`RowsDataModule` for training loaders) tells the sampler which epoch it is in and how many of its batches
    were already completed, when an iterator starts; without it, :meth:`set_epoch` sets the epoch.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 lengths: Optional[Sequence[int]] = None, bucket_batches: int = 32, rank: int = 0,
                 world_size: int = 1, progress: Optional[Progress] = None, max_tokens: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_tokens is not None and (max_tokens < 1 or lengths is None):
            raise ValueError(f"max_tokens={max_tokens} needs to be positive and the rows' lengths")
        self.max_tokens = max_tokens
        self.num_rows, self.batch_size, self.seed, self.shuffle = num_rows, batch_size, seed, shuffle
        self.drop_last, self.lengths, self.bucket_batches = drop_last, lengths, bucket_batches
        self.rank, self.world_size, self.progress = rank, world_size, progress
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self, epoch: int) -> List[List[int]]:
        order = list(range(self.num_rows))
        rng = random.Random(self.seed * 100_003 + epoch)
        if self.shuffle:
            rng.shuffle(order)
        if self.lengths is not None and self.shuffle:
            window = self.batch_size * self.bucket_batches
            if self.max_tokens is not None:  # about bucket_batches budgets' worth of rows
                mean = sum(self.lengths) / max(1, len(self.lengths))
                window = max(1, round(self.bucket_batches * self.max_tokens / max(mean, 1)))
            order = [i for start in range(0, len(order), window)
                     for i in sorted(order[start: start + window], key=self.lengths.__getitem__)]
        if self.max_tokens is not None:
            batches = self._token_budget_batches(order)
        else:
            batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            if self.drop_last and batches and len(batches[-1]) < self.batch_size:
                batches.pop()
        if self.lengths is not None and self.shuffle:
            rng.shuffle(batches)
        return batches

    def _token_budget_batches(self, order: List[int]) -> List[List[int]]:
        batches: List[List[int]] = [[]]
        used = 0
        for i in order:
            if batches[-1] and used + self.lengths[i] > self.max_tokens:
                batches.append([])
                used = 0
            batches[-1].append(i)
            used += self.lengths[i]
        return [b for b in batches if b]

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """This rank's batches of ``epoch``, as many on every rank."""
        batches = self._all_batches(epoch)
        per_rank = len(batches) // self.world_size if self.world_size > 1 else len(batches)
        return batches[self.rank:: self.world_size][:per_rank]

    def __iter__(self) -> Iterator[List[int]]:
        skip = 0
        if self.progress is not None:
            self.epoch, skip = self.progress(lambda epoch: len(self.epoch_batches(epoch)))
        return iter(self.epoch_batches(self.epoch)[skip:])

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))


def training_progress(trainer: Optional[L.Trainer], steps_per_batch: int = 1) -> Optional[Progress]:
    """``(batches in epoch e) -> (epoch, batches trained on in it)`` from ``trainer.global_step`` (restored from a
    checkpoint): an epoch takes ``ceil(batches / accumulate_grad_batches)`` optimiser steps, each of
    ``accumulate_grad_batches`` batches. Checkpoints are taken at optimiser-step boundaries. A module that makes
    ``steps_per_batch`` optimiser steps of each batch (the online generator's updates per rollout) is checkpointed
    between batches, so its ``global_step`` is a multiple of that."""
    if trainer is None:
        return None

    def progress(batches_in: Callable[[int], int]) -> Tuple[int, int]:
        accumulate = trainer.accumulate_grad_batches
        steps, epoch = trainer.global_step // steps_per_batch, 0
        while True:  # epochs may differ in length (token-budget batches)
            steps_in_epoch = max(1, math.ceil(batches_in(epoch) / accumulate))
            if steps < steps_in_epoch:
                return epoch, steps * accumulate
            steps -= steps_in_epoch
            epoch += 1

    return progress


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning knows to be resumable (it has ``state_dict``/``load_state_dict``): its position comes
    back with ``global_step`` (:func:`training_progress`), so there is nothing of its own to save."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class RowsDataModule(L.LightningDataModule):
    """Training and validation batches of in-memory rows, collated by ``collate`` (``val_collate`` if given).

    Training batches are shuffled per epoch (bucketed by ``lengths`` when given), drop the last partial batch when
    there is more than one batch, are sharded across processes and resume mid-epoch (:class:`EpochBatchSampler`).
    Validation batches are in order, sharded the same way.
    """

    def __init__(self, train: Sequence[Any], validation: Sequence[Any], collate: Callable, batch_size: int,
                 seed: int = 0, num_workers: int = 0, val_collate: Optional[Callable] = None,
                 lengths: Optional[Sequence[int]] = None, val_lengths: Optional[Sequence[int]] = None,
                 steps_per_batch: int = 1, max_tokens: Optional[int] = None):
        super().__init__()
        self.steps_per_batch = steps_per_batch  # optimiser steps the module makes of each batch (training_progress)
        self.train_rows, self.val_rows = list(train), list(validation)
        self.collate, self.val_collate = collate, val_collate or collate
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.lengths, self.val_lengths = lengths, val_lengths
        self.max_tokens = max_tokens  # token-budget training batches instead of batch_size rows (needs lengths)

    def _drop_last(self) -> bool:
        return len(self.train_rows) > self.batch_size

    def _train_sampler(self, rank: int = 0, world: int = 1, progress: Optional[Progress] = None
                       ) -> EpochBatchSampler:
        return EpochBatchSampler(len(self.train_rows), self.batch_size, self.seed, shuffle=True,
                                 drop_last=self._drop_last(), lengths=self.lengths, rank=rank, world_size=world,
                                 progress=progress, max_tokens=self.max_tokens)

    def batches_per_epoch(self, epochs: int = 1) -> int:
        """Training batches per epoch on one process (before any process group exists); with token budgets, which
        vary by epoch, the mean over the first ``epochs``, rounded up."""
        sampler = self._train_sampler()
        return math.ceil(sum(len(sampler.epoch_batches(e)) for e in range(epochs)) / epochs)

    def _rank(self) -> Tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, rows: Sequence[Any], sampler: EpochBatchSampler, collate: Callable) -> DataLoader:
        return ResumableDataLoader(rows, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                                   generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        sampler = self._train_sampler(rank, world, training_progress(self.trainer, self.steps_per_batch))
        return self._loader(self.train_rows, sampler, self.collate)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        sampler = EpochBatchSampler(len(self.val_rows), self.batch_size, self.seed, shuffle=False,
                                    rank=rank, world_size=world)
        return self._loader(self.val_rows, sampler, self.val_collate)

