"""Collation of tokenised features (:mod:`rlmf.data.tokenization`) into generator batches.

Collated batches (labels are NOT shifted; the model code shifts them; ``-100`` marks prompt and padding):

- :class:`PairCollator`, B pairs -> ``input_ids``, ``attention_mask``, ``labels`` of shape ``[2B, T]`` (rows
  ``0..B-1`` are chosen, ``B..2B-1`` rejected; right-padded), and ``chosen_lengths``, ``rejected_lengths``,
  ``prompt_lengths`` of shape ``[B]`` (token counts, eos included in completions).
- :class:`FeedbackCollator`, B examples -> ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``,
  ``completion_lengths``, ``prompt_lengths`` ``[B]`` and ``desirable`` ``[B]`` bool.
- :class:`PromptCollator`, B prompts -> left-padded ``input_ids``, ``attention_mask`` ``[B, T]`` for generation.
- :class:`OnlinePromptCollator`, B prompts -> left-padded ``prompt_ids``, ``prompt_mask`` ``[B, P]`` and the prompt
  texts, for the online algorithms.

Pair and feedback batches also get ``weights`` ``[B]`` when any feature carries a weight.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

IGNORE_INDEX = -100


def _pad(rows: Sequence[List[int]], value: int, left: bool = False) -> torch.Tensor:
    """``[len(rows), longest]`` long tensor, each row padded with ``value`` on the right (or the left)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            start = width - len(r) if left else 0
            out[i, start:start + len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _sequences(prompts: Sequence[List[int]], completions: Sequence[List[int]], pad_token_id: int
               ) -> Dict[str, torch.Tensor]:
    """Right-padded ``prompt + completion`` rows with labels masked to the completion."""
    rows = [p + c for p, c in zip(prompts, completions)]
    labels = [[IGNORE_INDEX] * len(p) + c for p, c in zip(prompts, completions)]
    return {
        "input_ids": _pad(rows, pad_token_id),
        "attention_mask": _pad([[1] * len(r) for r in rows], 0),
        "labels": _pad(labels, IGNORE_INDEX),
    }


def _lengths(rows: Sequence[List[int]]) -> torch.Tensor:
    return torch.tensor([len(r) for r in rows], dtype=torch.long)


def _check_pad(pad_token_id: Optional[int]) -> int:
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token) before collating")
    return pad_token_id


def _weights(features: Sequence[Dict[str, Any]]) -> Optional[torch.Tensor]:
    """``[B]`` float32 per-example weights when any feature carries one (the others weigh 1), else None."""
    if not any("weight" in f for f in features):
        return None
    return torch.tensor([float(f.get("weight", 1.0)) for f in features], dtype=torch.float32)


class PairCollator:
    """Collate :func:`tokenize_pairs` features: B pairs -> one ``[2B, T]`` batch, chosen rows first.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (``[2B, T]``, right-padded with ``pad_token_id``, labels
    ``-100`` on prompt and padding, not shifted) and ``prompt_lengths``, ``chosen_lengths``, ``rejected_lengths``
    (``[B]``).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = _check_pad(pad_token_id)

    def __call__(self, features: Sequence[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
        prompts = [f["prompt_ids"] for f in features]
        chosen = [f["chosen_ids"] for f in features]
        rejected = [f["rejected_ids"] for f in features]
        batch = _sequences(prompts + prompts, chosen + rejected, self.pad_token_id)
        batch["prompt_lengths"] = _lengths(prompts)
        batch["chosen_lengths"] = _lengths(chosen)
        batch["rejected_lengths"] = _lengths(rejected)
        weights = _weights(features)
        if weights is not None:
            batch["weights"] = weights
        return batch


class FeedbackCollator:
    """Collate :func:`tokenize_feedback` features: ``input_ids``, ``attention_mask``, ``labels`` (``[B, T]``, as
    in :class:`PairCollator`), ``prompt_lengths``, ``completion_lengths`` (``[B]``) and ``desirable`` (``[B]``
    bool)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = _check_pad(pad_token_id)

    def __call__(self, features: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        prompts = [f["prompt_ids"] for f in features]
        completions = [f["completion_ids"] for f in features]
        batch = _sequences(prompts, completions, self.pad_token_id)
        batch["prompt_lengths"] = _lengths(prompts)
        batch["completion_lengths"] = _lengths(completions)
        batch["desirable"] = torch.tensor([bool(f["desirable"]) for f in features], dtype=torch.bool)
        weights = _weights(features)
        if weights is not None:
            batch["weights"] = weights
        return batch


class PromptCollator:
    """Collate :func:`tokenize_prompts` features into left-padded ``input_ids`` and ``attention_mask``
    (``[B, T]``), so every prompt ends at the last column where generation starts."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = _check_pad(pad_token_id)

    def __call__(self, features: Sequence[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
        prompts = [f["prompt_ids"] for f in features]
        return {
            "input_ids": _pad(prompts, self.pad_token_id, left=True),
            "attention_mask": _pad([[1] * len(p) for p in prompts], 0, left=True),
        }


class OnlinePromptCollator:
    """Collate ``{"prompt_ids", "prompt"}`` features (:func:`tokenize_prompts` plus the prompt's text) for the online
    algorithms: left-padded ``prompt_ids`` and ``prompt_mask`` ``[B, P]``, and ``prompts``, the texts (for the
    reward)."""

    def __init__(self, pad_token_id: int):
        self.prompt_collator = PromptCollator(pad_token_id)

    def __call__(self, features: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        batch = self.prompt_collator(features)
        return {"prompt_ids": batch["input_ids"], "prompt_mask": batch["attention_mask"],
                "prompts": [f["prompt"] for f in features]}
