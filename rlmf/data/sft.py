"""Supervised fine-tuning data: (prompt, completion) pairs -> length-bucketed batches, loss on completion tokens.

Tokenisation, truncation and collation are the data layer's (``rlmf.data.collate``): ``[bos] prompt completion
eos``, labels -100 on the prompt and padding.

Batches are drawn from buckets of similar length (:class:`LengthBucketBatchSampler`), so almost no compute goes to
padding without the cross-sample attention leaks that packing would need extra masking to avoid.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Iterator, List, Sequence, Tuple, Union

import lightning as L
from torch.utils.data import DataLoader, Sampler

from rlmf.data.collate import FeedbackCollator, tokenize_feedback
from rlmf.data.formats import FeedbackExample


def tokenize_sft(examples: Sequence[Union[Tuple[str, str], FeedbackExample]], tokenizer, max_length: int,
                 max_prompt_length: int) -> List[Dict[str, Any]]:
    """``{"prompt_ids", "completion_ids"}`` per (prompt, completion) pair or :class:`FeedbackExample` (whose chat
    messages render through the tokenizer's chat template), truncated like every other row format."""
    rows = [e if isinstance(e, FeedbackExample) else FeedbackExample(e[0], e[1], True) for e in examples]
    features, _ = tokenize_feedback(rows, tokenizer, max_length, max_prompt_length)
    return features


class LengthBucketBatchSampler(Sampler[List[int]]):
    """Shuffled batches of similar-length rows.

    Each epoch shuffles, cuts the order into windows of ``bucket_batches`` batches, sorts each window by length and
    yields its batches in random order. With several processes each rank takes every ``world_size``-th batch.
    Lightning calls ``set_epoch`` so every epoch has its own order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                 bucket_batches: int = 32, rank: int = 0, world_size: int = 1):
        self.lengths, self.batch_size, self.seed, self.shuffle = list(lengths), batch_size, seed, shuffle
        self.bucket_batches, self.rank, self.world_size = bucket_batches, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[List[int]]:
        if not self.shuffle:
            order = list(range(len(self.lengths)))
            batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            return iter(batches[self.rank:: self.world_size])
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        window = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start: start + window], key=self.lengths.__getitem__)
            batches += [chunk[i: i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches[self.rank:: self.world_size])

    def __len__(self) -> int:
        n = -(-len(self.lengths) // self.batch_size)
        return -(-n // self.world_size)


class SFTDataModule(L.LightningDataModule):
    def __init__(self, train: Sequence[Any], validation: Sequence[Any], tokenizer,
                 batch_size: int, max_length: int, max_prompt_length: int, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.train_rows = tokenize_sft(train, tokenizer, max_length, max_prompt_length)
        self.val_rows = tokenize_sft(validation, tokenizer, max_length, max_prompt_length)
        self.collate = FeedbackCollator(tokenizer.pad_token_id)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    def batches_per_epoch(self) -> int:
        """Training batches one process sees per epoch (before it runs, so on one process)."""
        return -(-len(self.train_rows) // self.batch_size)

    def _loader(self, rows, shuffle: bool) -> DataLoader:
        trainer = self.trainer
        sampler = LengthBucketBatchSampler(
            [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows], self.batch_size, self.seed,
            shuffle=shuffle, rank=trainer.global_rank if trainer else 0, world_size=trainer.world_size if trainer else 1)
        return DataLoader(rows, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_rows, shuffle=False)
