"""Supervised fine-tuning data: (prompt, completion) pairs -> length-bucketed batches, loss on completion tokens.

Tokenisation, truncation and collation are the data layer's (``rlmf.data.tokenization``, ``rlmf.data.collate``):
``[bos] prompt completion eos``, labels -100 on the prompt and padding.

Batches are drawn from buckets of similar length (:class:`LengthBucketBatchSampler`), so almost no compute goes to
padding without the cross-sample attention leaks that packing would need extra masking to avoid; they are sharded
across processes and resume mid-epoch like every training loader (:mod:`rlmf.data.loading`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from rlmf.data.collate import FeedbackCollator
from rlmf.data.formats import FeedbackExample
from rlmf.data.loading import EpochBatchSampler, RowsDataModule
from rlmf.data.tokenization import tokenize_feedback


def sft_rows(examples: Sequence[Union[Tuple[str, str], FeedbackExample]]) -> List[FeedbackExample]:
    """(prompt, completion) pairs as :class:`FeedbackExample` rows; rows already of that kind as they are."""
    return [e if isinstance(e, FeedbackExample) else FeedbackExample(e[0], e[1], True) for e in examples]


def tokenize_sft(examples: Sequence[Union[Tuple[str, str], FeedbackExample]], tokenizer, max_length: int,
                 max_prompt_length: int) -> List[Dict[str, Any]]:
    """``{"prompt_ids", "completion_ids"}`` per (prompt, completion) pair or :class:`FeedbackExample` (whose chat
    messages render through the tokenizer's chat template), truncated like every other row format."""
    features, _ = tokenize_feedback(sft_rows(examples), tokenizer, max_length, max_prompt_length)
    return features


class LengthBucketBatchSampler(EpochBatchSampler):
    """Shuffled batches of similar-length rows (:class:`~rlmf.data.loading.EpochBatchSampler` with ``lengths``).

    Each epoch shuffles, cuts the order into windows of ``bucket_batches`` batches, sorts each window by length and
    yields its batches in random order. With several processes each rank takes every ``world_size``-th batch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                 bucket_batches: int = 32, rank: int = 0, world_size: int = 1):
        super().__init__(len(lengths), batch_size, seed, shuffle=shuffle, lengths=list(lengths),
                         bucket_batches=bucket_batches, rank=rank, world_size=world_size)


def _lengths(rows: Sequence[Dict[str, Any]]) -> List[int]:
    return [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]


class SFTDataModule(RowsDataModule):
    """Length-bucketed SFT batches (``FeedbackCollator`` rows: loss on the completion tokens)."""

    def __init__(self, train: Sequence[Any], validation: Sequence[Any], tokenizer, batch_size: int, max_length: int,
                 max_prompt_length: int, seed: int = 0, num_workers: int = 0, max_tokens: Optional[int] = None):
        train_rows, self.drops = tokenize_feedback(sft_rows(train), tokenizer, max_length, max_prompt_length)
        val_rows = tokenize_sft(validation, tokenizer, max_length, max_prompt_length)
        super().__init__(train_rows, val_rows, FeedbackCollator(tokenizer.pad_token_id), batch_size, seed=seed,
                         num_workers=num_workers, lengths=_lengths(train_rows), max_tokens=max_tokens)

    def _drop_last(self) -> bool:
        return False  # every demonstration is seen each epoch; bucketing already keeps batches full
