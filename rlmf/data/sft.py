"""Supervised fine-tuning data: (prompt, completion) pairs -> length-bucketed batches, loss on completion tokens.

Batches are drawn from buckets of similar length (:class:`LengthBucketBatchSampler`), so almost no compute goes to
padding without the cross-sample attention leaks that packing would need extra masking to avoid.
"""

from __future__ import annotations

import random
from typing import Dict, Iterator, List, Sequence, Tuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

IGNORE_INDEX = -100


def tokenize_sft(examples: Sequence[Tuple[str, str]], tokenizer, max_length: int, max_prompt_length: int
                 ) -> List[Dict[str, List[int]]]:
    """Token ids of ``bos + prompt`` (the prompt's end is kept) and ``completion + eos`` (cut to fit max_length)."""
    rows = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for prompt, completion in examples:
        prompt_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prompt_ids = prompt_ids[-max_prompt_length:]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        completion_ids = completion_ids[: max(0, max_length - len(prompt_ids))]
        if completion_ids:
            rows.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids})
    return rows


class SFTCollator:
    """Right-padded ``input_ids``, ``attention_mask``, and ``labels`` (-100 on prompt and padding, not shifted)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: List[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
        width = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids = r["prompt_ids"] + r["completion_ids"]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, len(r["prompt_ids"]): len(ids)] = torch.tensor(r["completion_ids"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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
    def __init__(self, train: Sequence[Tuple[str, str]], validation: Sequence[Tuple[str, str]], tokenizer,
                 batch_size: int, max_length: int, max_prompt_length: int, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.train_rows = tokenize_sft(train, tokenizer, max_length, max_prompt_length)
        self.val_rows = tokenize_sft(validation, tokenizer, max_length, max_prompt_length)
        self.collate = SFTCollator(tokenizer.pad_token_id)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

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
