"""Turning (prompt, completion) text into discriminator inputs, and rows of feedback into training batches.

The discriminator reads a prompt and a completion as a sentence pair (``[CLS] prompt [SEP] completion [SEP]`` for
BERT-style tokenizers). When the pair is longer than ``max_length`` the completion, the thing being judged, keeps
priority: the prompt gives up its *beginning* first, since its end is the context nearest the completion, but it
always keeps at least a quarter of the window (or all of itself, if shorter); only a completion too long for the
rest is cut, at its end.

Rows may be dicts or objects with the same attributes (``rlmf.data.formats.PreferencePair`` and
``FeedbackExample``), so the collators do not care which stage produced them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Dict, List

import torch

# The prompt always keeps at least this fraction of the token budget when both sides are too long.
PROMPT_MIN_SHARE = 0.25


def row_field(row: Any, name: str, allowed: Sequence[str]) -> Any:
    """``row[name]`` for a mapping, ``row.name`` otherwise; a ``KeyError`` naming the expected fields if absent."""
    try:
        return row[name] if isinstance(row, Mapping) else getattr(row, name)
    except (KeyError, AttributeError):
        raise KeyError(
            f"row {type(row).__name__} has no field {name!r}; rows must have the fields {', '.join(allowed)}"
        ) from None


def _truncation_lengths(prompt_length: int, completion_length: int, budget: int) -> tuple[int, int]:
    """How many prompt tokens (counted from its end) and completion tokens (from its start) fit in ``budget``."""
    if prompt_length + completion_length <= budget:
        return prompt_length, completion_length
    prompt_floor = min(prompt_length, int(budget * PROMPT_MIN_SHARE))
    kept_completion = min(completion_length, budget - prompt_floor)
    return budget - kept_completion, kept_completion


def encode_prompt_completion(tokenizer, prompts: List[str], completions: List[str], max_length: int) -> Dict[str, torch.Tensor]:
    """Tokenize ``prompts[i]`` and ``completions[i]`` as a sentence pair, padded to the longest, at most
    ``max_length`` tokens each (special tokens included).

    The cut is made on the text, at token boundaries found with the fast tokenizer's offsets, so the final call
    is an ordinary ``tokenizer(prompts, completions)`` and any tokenizer's special tokens and type ids come out
    right. Returns a dict of ``[B, T]`` tensors (``input_ids``, ``attention_mask``, and ``token_type_ids`` when the
    tokenizer makes them).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions; they must pair up")
    if not tokenizer.is_fast:
        raise TypeError(f"{type(tokenizer).__name__} is a slow tokenizer; the discriminator needs a fast one (offsets)")
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    if budget < 2:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt and a completion")

    # verbose=False: these untruncated passes only measure, so the "longer than the model" warning is noise.
    offsets = lambda texts: tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    prompt_offsets = offsets(prompts)["offset_mapping"]
    completion_offsets = offsets(completions)["offset_mapping"]
    kept_prompts, kept_completions = [], []
    for prompt, completion, p_offsets, c_offsets in zip(prompts, completions, prompt_offsets, completion_offsets):
        n_prompt, n_completion = _truncation_lengths(len(p_offsets), len(c_offsets), budget)
        if n_prompt < len(p_offsets):
            prompt = prompt[p_offsets[len(p_offsets) - n_prompt][0]:] if n_prompt else ""
        if n_completion < len(c_offsets):
            completion = completion[: c_offsets[n_completion - 1][1]] if n_completion else ""
        kept_prompts.append(prompt)
        kept_completions.append(completion)

    # Re-tokenizing a cut string can differ from the original tokens at the cut (a word cut inside a sub-word
    # piece, a leading space in byte-level BPE), usually by a token, so a plain length guard backs up the cut.
    encoding = tokenizer(
        kept_prompts,
        kept_completions,
        padding="longest",
        truncation="longest_first",
        max_length=max_length,
        return_tensors="pt",
    )
    return dict(encoding)


class PairRewardCollator:
    """Collate ``{"prompt", "chosen", "rejected"}`` rows into ``{"chosen": encoding, "rejected": encoding}``.

    Each encoding is the output of :func:`encode_prompt_completion` for the ``B`` rows, so row ``i`` of both
    encodings shares a prompt.
    """

    fields = ("prompt", "chosen", "rejected")

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows: Sequence[Any]) -> Dict[str, Dict[str, torch.Tensor]]:
        prompts = [row_field(row, "prompt", self.fields) for row in rows]
        chosen = [row_field(row, "chosen", self.fields) for row in rows]
        rejected = [row_field(row, "rejected", self.fields) for row in rows]
        batch = {
            "chosen": encode_prompt_completion(self.tokenizer, prompts, chosen, self.max_length),
            "rejected": encode_prompt_completion(self.tokenizer, prompts, rejected, self.max_length),
        }
        return _with_weights(batch, rows)


class ThumbsRewardCollator:
    """Collate ``{"prompt", "completion", "desirable"}`` rows into ``{"inputs": encoding, "desirable": [B] float}``."""

    fields = ("prompt", "completion", "desirable")

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows: Sequence[Any]) -> Dict[str, Any]:
        prompts = [row_field(row, "prompt", self.fields) for row in rows]
        completions = [row_field(row, "completion", self.fields) for row in rows]
        desirable = [float(bool(row_field(row, "desirable", self.fields))) for row in rows]
        batch = {
            "inputs": encode_prompt_completion(self.tokenizer, prompts, completions, self.max_length),
            "desirable": torch.tensor(desirable, dtype=torch.float32),
        }
        return _with_weights(batch, rows)


def _with_weights(batch: Dict[str, Any], rows: Sequence[Any]) -> Dict[str, Any]:
    """``batch["weights"]`` ``[B]`` when any row carries a ``weight`` other than 1 (rows or dicts)."""
    weights = [float(row.get("weight", 1.0) if isinstance(row, dict) else getattr(row, "weight", 1.0)) for row in rows]
    if any(w != 1.0 for w in weights):
        batch["weights"] = torch.tensor(weights, dtype=torch.float32)
    return batch
