"""Tokenisation, truncation and collation of examples into generator batches.

Token layout of one sequence: ``[bos] prompt_tokens completion_tokens eos`` (``bos`` only if the tokenizer has one;
prompt and completion are tokenised separately, without the tokenizer's own special tokens).

Truncation, on token ids:

1. the prompt keeps its END: it is left-truncated to ``max_prompt_length`` tokens (the bos, if any, stays first and
   counts toward the limit);
2. each completion (eos included) is right-truncated so that ``len(prompt) + len(completion) <= max_length``.

After truncation a pair is dropped when a completion has no tokens left besides the eos (``empty_completion``), or
when chosen and rejected are the same token ids (``identical``: every pairwise loss is zero on it). Feedback examples
are dropped for an empty completion. :class:`DropCounts` counts both, for the caller to log.

Collated batches (labels are NOT shifted; the model code shifts them; ``-100`` marks prompt and padding):

- :class:`PairCollator`, B pairs -> ``input_ids``, ``attention_mask``, ``labels`` of shape ``[2B, T]`` (rows
  ``0..B-1`` are chosen, ``B..2B-1`` rejected; right-padded), and ``chosen_lengths``, ``rejected_lengths``,
  ``prompt_lengths`` of shape ``[B]`` (token counts, eos included in completions).
- :class:`FeedbackCollator`, B examples -> ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``,
  ``completion_lengths``, ``prompt_lengths`` ``[B]`` and ``desirable`` ``[B]`` bool.
- :class:`PromptCollator`, B prompts -> left-padded ``input_ids``, ``attention_mask`` ``[B, T]`` for generation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from rlmf.data.formats import FeedbackExample, PreferencePair, PromptOnly

IGNORE_INDEX = -100


@dataclass
class DropCounts:
    """How tokenisation changed the data: ``kept`` examples; drops by reason (``empty_completion``,
    ``identical``); ``prompt_truncated`` prompts and ``completion_truncated`` completions (a pair has two) that
    lost tokens."""

    kept: int = 0
    empty_completion: int = 0
    identical: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0

    @property
    def dropped(self) -> int:
        return self.empty_completion + self.identical

    def as_dict(self, prefix: str = "data/") -> Dict[str, int]:
        """Counts named for a logger, e.g. ``{"data/kept": 998, "data/dropped": 2, ...}``."""
        counts = {"dropped": self.dropped, **asdict(self)}
        return {f"{prefix}{name}": value for name, value in counts.items()}

    def __str__(self) -> str:
        return (f"kept {self.kept}, dropped {self.dropped} (empty completion {self.empty_completion}, "
                f"chosen == rejected {self.identical}); truncated prompts {self.prompt_truncated}, "
                f"truncated completions {self.completion_truncated}")


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation


def _check_lengths(max_length: Optional[int], max_prompt_length: Optional[int]) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be less than max_length ({max_length}), "
                         "or no completion token fits after a full-length prompt")


def _encode(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _prompt_ids(tokenizer, prompts: Sequence[str], max_prompt_length: Optional[int]) -> Tuple[List[List[int]], int]:
    """``[bos] + prompt`` per prompt, keeping the end; and how many were truncated."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    out, truncated = [], 0
    for ids in _encode(tokenizer, prompts):
        if max_prompt_length is not None and len(bos) + len(ids) > max_prompt_length:
            keep = max(max_prompt_length - len(bos), 0)
            ids = ids[len(ids) - keep:] if keep else []
            truncated += 1
        out.append(bos + ids)
    return out, truncated


def _completion_ids(tokenizer, completions: Sequence[str]) -> List[List[int]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; completions end with eos, so set tokenizer.eos_token")
    return [ids + [eos] for ids in _encode(tokenizer, completions)]


def _fit(completion: List[int], prompt_length: int, max_length: Optional[int]) -> Tuple[List[int], bool]:
    if max_length is None or prompt_length + len(completion) <= max_length:
        return completion, False
    return completion[: max(max_length - prompt_length, 0)], True


def _is_empty(completion: List[int], eos: int) -> bool:
    return len(completion) == 0 or completion == [eos]


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, max_length: Optional[int],
                   max_prompt_length: Optional[int]) -> Tuple[List[Dict[str, List[int]]], DropCounts]:
    """Token ids ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` per kept pair, truncated as in the module
    docstring, and the :class:`DropCounts`."""
    _check_lengths(max_length, max_prompt_length)
    prompts, prompt_cut = _prompt_ids(tokenizer, [p.prompt for p in pairs], max_prompt_length)
    chosen = _completion_ids(tokenizer, [p.chosen for p in pairs])
    rejected = _completion_ids(tokenizer, [p.rejected for p in pairs])
    counts = DropCounts(prompt_truncated=prompt_cut)
    eos = tokenizer.eos_token_id
    features = []
    for prompt_ids, chosen_ids, rejected_ids in zip(prompts, chosen, rejected):
        chosen_ids, chosen_cut = _fit(chosen_ids, len(prompt_ids), max_length)
        rejected_ids, rejected_cut = _fit(rejected_ids, len(prompt_ids), max_length)
        counts.completion_truncated += chosen_cut + rejected_cut
        if _is_empty(chosen_ids, eos) or _is_empty(rejected_ids, eos):
            counts.empty_completion += 1
        elif chosen_ids == rejected_ids:
            counts.identical += 1
        else:
            features.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    counts.kept = len(features)
    return features, counts


def tokenize_feedback(examples: Sequence[FeedbackExample], tokenizer, max_length: Optional[int],
                      max_prompt_length: Optional[int]) -> Tuple[List[Dict[str, Any]], DropCounts]:
    """Token ids ``{"prompt_ids", "completion_ids", "desirable"}`` per kept example, and the :class:`DropCounts`."""
    _check_lengths(max_length, max_prompt_length)
    prompts, prompt_cut = _prompt_ids(tokenizer, [e.prompt for e in examples], max_prompt_length)
    completions = _completion_ids(tokenizer, [e.completion for e in examples])
    counts = DropCounts(prompt_truncated=prompt_cut)
    features = []
    for example, prompt_ids, completion_ids in zip(examples, prompts, completions):
        completion_ids, cut = _fit(completion_ids, len(prompt_ids), max_length)
        counts.completion_truncated += cut
        if _is_empty(completion_ids, tokenizer.eos_token_id):
            counts.empty_completion += 1
            continue
        features.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                         "desirable": example.desirable})
    counts.kept = len(features)
    return features, counts


def tokenize_prompts(prompts: Sequence[PromptOnly], tokenizer, max_prompt_length: Optional[int]
                     ) -> List[Dict[str, List[int]]]:
    """``{"prompt_ids"}`` per prompt (``[bos] + prompt``, left-truncated to ``max_prompt_length``)."""
    _check_lengths(None, max_prompt_length)
    ids, _ = _prompt_ids(tokenizer, [p.prompt for p in prompts], max_prompt_length)
    return [{"prompt_ids": x} for x in ids]


# ---------------------------------------------------------------------------------------------------------------
# Collation


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
