"""Batches for preference alignment, one collator per loss data format (``rlmf.losses.DATA_FORMATS``).

* ``paired``: :class:`~rlmf.data.collate.PairCollator` rows ([2B, T], chosen first).
* ``paired_online`` (HyPO): the pairs plus their prompts left-padded as ``online_prompt_ids``/``online_prompt_mask``,
  from which the generator samples its own completions.
* ``unpaired`` (KTO, APO-zero on thumbs): :class:`~rlmf.data.collate.FeedbackCollator` rows plus ``kl_*`` rows that
  pair each prompt with another row's completion (KTO's mismatched pairs for its reference point): the feature's
  own ``kl_completion_ids`` when :func:`with_mismatched_completions` fixed them, else the next row's in the batch.

Features may carry precomputed ``reference_logps`` (a float, or a ``(chosen, rejected)`` pair) and, with fixed
mismatched rows, ``reference_kl_logps``; the batch then has ``reference_logps`` / ``reference_kl_logps`` tensors
aligned with its rows and the generator uses them instead of a reference model.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from rlmf.data.collate import FeedbackCollator, PairCollator, PromptCollator
from rlmf.data.loading import RowsDataModule


def _with_reference(batch: Dict[str, torch.Tensor], features: Sequence[Dict[str, Any]], paired: bool
                    ) -> Dict[str, torch.Tensor]:
    if features and "reference_logps" in features[0]:
        refs = [f["reference_logps"] for f in features]
        values = [r[0] for r in refs] + [r[1] for r in refs] if paired else refs
        batch["reference_logps"] = torch.tensor(values, dtype=torch.float32)
    if features and "reference_kl_logps" in features[0]:
        batch["reference_kl_logps"] = torch.tensor([f["reference_kl_logps"] for f in features], dtype=torch.float32)
    return batch


def with_mismatched_completions(features: List[Dict[str, Any]], max_length: int) -> List[Dict[str, Any]]:
    """Fix KTO's mismatched completion of every feature once, so its reference log-prob can be precomputed.

    Row ``i`` gets the completion of row ``(i + n // 2) mod n`` (cut to fit ``max_length`` after its prompt): half
    the data set away, so not the other half of its own pair when thumbs come from unpaired preference pairs
    (chosen and rejected of one prompt are neighbours). The same rows in every epoch, like TRL's KL data set.
    """
    n = len(features)
    out = []
    for i, feature in enumerate(features):
        other = features[(i + n // 2) % n] if n > 1 else feature
        room = max(1, max_length - len(feature["prompt_ids"]))
        out.append({**feature, "kl_completion_ids": other["completion_ids"][:room]})
    return out


class PairedBatches:
    def __init__(self, pad_token_id: int, online: bool = False):
        self.pairs, self.prompts, self.online = PairCollator(pad_token_id), PromptCollator(pad_token_id), online

    def __call__(self, features: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        batch = _with_reference(self.pairs(features), features, paired=True)
        if self.online:
            prompts = self.prompts(features)
            batch["online_prompt_ids"], batch["online_prompt_mask"] = prompts["input_ids"], prompts["attention_mask"]
        return batch


class UnpairedBatches:
    def __init__(self, pad_token_id: int, max_length: int):
        self.rows, self.max_length = FeedbackCollator(pad_token_id), max_length

    def __call__(self, features: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        batch = _with_reference(self.rows(features), features, paired=False)
        n = len(features)
        mismatched = []
        for i, f in enumerate(features):
            if "kl_completion_ids" in f:
                completion = f["kl_completion_ids"]
            else:
                other = features[(i + 1) % n] if n > 1 else f
                completion = other["completion_ids"][: max(1, self.max_length - len(f["prompt_ids"]))]
            mismatched.append({"prompt_ids": f["prompt_ids"], "completion_ids": completion, "desirable": False})
        for key, value in self.rows(mismatched).items():
            if key in ("input_ids", "attention_mask", "labels"):
                batch["kl_" + key] = value
        return batch


def collator_for(data_format: str, pad_token_id: int, max_length: int):
    if data_format == "paired":
        return PairedBatches(pad_token_id)
    if data_format == "paired_online":
        return PairedBatches(pad_token_id, online=True)
    if data_format == "unpaired":
        return UnpairedBatches(pad_token_id, max_length)
    raise ValueError(f"no alignment batches for data format {data_format!r}")


class AlignmentDataModule(RowsDataModule):
    """Shuffled training batches and ordered validation batches of tokenized features (:mod:`rlmf.data.loading`)."""

    def __init__(self, train: List[Dict[str, Any]], validation: List[Dict[str, Any]], data_format: str,
                 pad_token_id: int, max_length: int, batch_size: int, seed: int = 0, num_workers: int = 0,
                 max_tokens: Optional[int] = None):
        if not train:
            raise ValueError("no training rows left for alignment (all were dropped or none were given)")
        # With a token budget, batches are cut by the tokens the packed decoder computes (length-bucketed).
        lengths = [packed_tokens(f) for f in train] if max_tokens is not None else None
        super().__init__(train, validation, collator_for(data_format, pad_token_id, max_length), batch_size,
                         seed=seed, num_workers=num_workers, lengths=lengths, max_tokens=max_tokens)


def packed_tokens(feature: Dict[str, Any]) -> int:
    """Tokens a tokenized feature costs the decoder with shared prompts: its prompt once, then each completion it
    carries (chosen and rejected; a completion and KTO's mismatched one)."""
    completions = ("chosen_ids", "rejected_ids", "completion_ids", "kl_completion_ids")
    return len(feature["prompt_ids"]) + sum(len(feature[k]) for k in completions if k in feature)
