"""Tokenisation and truncation of examples into token ids, with counts of what changed and the data report.

Token layout of one sequence: ``[bos] prompt_tokens completion_tokens [eos]`` (``bos`` only if the tokenizer has one;
prompt and completion are tokenised separately, without the tokenizer's own special tokens). Which text is
tokenised (a row's strings, or its messages through the tokenizer's chat template) and when the ``eos`` is appended
is :mod:`rlmf.data.rendering`'s.

Boundary check: a prompt and completion tokenised separately need not give the tokens of the joined text (BPE merges
across the boundary when the prompt ends mid-word or with a space). Every row given to :func:`tokenize_pairs` /
:func:`tokenize_feedback` (before truncation and drops) is checked: ``tokens(prompt) + tokens(completion)`` against
``tokens(prompt + completion)``, special tokens not added. Mismatching rows are counted in
:attr:`DropCounts.boundary_mismatch` (a count of rows, not a drop) and one warning per call names up to
:data:`BOUNDARY_EXAMPLES` rows with the differing tokens, decoded, around the boundary. The ids are kept as tokenised
separately: that is what training sees and what generation starts from.

Truncation, on token ids:

1. the prompt keeps its END: it is left-truncated to ``max_prompt_length`` tokens (the bos, if any, stays first and
   counts toward the limit);
2. each completion (eos included) is right-truncated so that ``len(prompt) + len(completion) <= max_length``.

After truncation a pair is dropped when a completion has no tokens left besides the eos (``empty_completion``), or
when chosen and rejected are the same token ids (``identical``: every pairwise loss is zero on it). Feedback examples
are dropped for an empty completion. :class:`DropCounts` counts both, and :func:`log_data_report` logs them.

The features made here are batched by the collators in :mod:`rlmf.data.collate`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from rlmf.data.formats import FeedbackExample, PreferencePair, PromptOnly
from rlmf.data.rendering import _prompt_texts, _texts, describe_rendering

log = logging.getLogger(__name__)

BOUNDARY_EXAMPLES = 3  # rows named in the boundary-mismatch warning


@dataclass
class DropCounts:
    """How tokenisation changed the data: ``kept`` examples; drops by reason (``empty_completion``,
    ``identical``); ``prompt_truncated`` prompts and ``completion_truncated`` completions (a pair has two) that
    lost tokens; ``boundary_mismatch`` rows (of all given, kept or not) whose prompt and completion tokenised
    separately differ from their joined text tokenised at once (reported, not dropped)."""

    kept: int = 0
    empty_completion: int = 0
    identical: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    boundary_mismatch: int = 0

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
                f"truncated completions {self.completion_truncated}; prompt/completion boundary differs from "
                f"joint tokenisation in {self.boundary_mismatch} rows")


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


# Token ids


def _prompt_ids(tokenizer, prompt_tokens: Sequence[List[int]], max_prompt_length: Optional[int]
                ) -> Tuple[List[List[int]], int]:
    """``[bos] + prompt`` per prompt, keeping the end; and how many were truncated."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    out, truncated = [], 0
    for ids in prompt_tokens:
        if max_prompt_length is not None and len(bos) + len(ids) > max_prompt_length:
            keep = max(max_prompt_length - len(bos), 0)
            ids = ids[len(ids) - keep:] if keep else []
            truncated += 1
        out.append(bos + ids)
    return out, truncated


def _check_eos(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; completions end with eos, so set tokenizer.eos_token")
    return eos


def _completion_ids(tokenizer, completion_tokens: Sequence[List[int]], add_eos: Sequence[bool]) -> List[List[int]]:
    eos = _check_eos(tokenizer)
    return [ids + [eos] if end else list(ids) for ids, end in zip(completion_tokens, add_eos)]


# Boundary check


def _token_texts(tokenizer, ids: Sequence[int]) -> str:
    return " ".join(repr(tokenizer.decode([i])) for i in ids)


def _boundary_diff(tokenizer, separate: List[int], joint: List[int], boundary: int, context: int = 2,
                   most: int = 8) -> str:
    """The tokens where ``separate`` (prompt + completion, the prompt's ``boundary`` tokens first) and ``joint``
    differ, with ``context`` equal tokens either side, decoded one by one; ``|`` marks the boundary."""
    first = 0
    while first < min(len(separate), len(joint)) and separate[first] == joint[first]:
        first += 1
    same_end = 0
    while (same_end < min(len(separate), len(joint)) - first
           and separate[len(separate) - 1 - same_end] == joint[len(joint) - 1 - same_end]):
        same_end += 1
    start = max(0, min(first, boundary) - context)

    def window(ids: List[int], stop: int, mark: Optional[int]) -> str:
        stop = min(len(ids), stop + context)
        cut = stop > start + most
        stop = min(stop, start + most)
        if mark is None or not start <= mark <= stop:
            text = _token_texts(tokenizer, ids[start:stop])
        else:
            text = " ".join(t for t in (_token_texts(tokenizer, ids[start:mark]), "|",
                                        _token_texts(tokenizer, ids[mark:stop])) if t)
        return ("... " if start else "") + text + (" ..." if cut or stop < len(ids) else "")

    separately = window(separate, max(len(separate) - same_end, boundary), boundary)
    jointly = window(joint, len(joint) - same_end, None)
    return f"separately [{separately}], as one text [{jointly}]"


def _check_boundaries(tokenizer, prompt_texts: Sequence[str], prompt_tokens: Sequence[List[int]],
                      completions: Dict[str, Tuple[Sequence[str], Sequence[List[int]]]], caller: str) -> int:
    """Count the rows whose prompt + completion tokens (for any completion field) differ from the joined text's
    tokens, and warn once naming the first :data:`BOUNDARY_EXAMPLES` of them."""
    mismatched: Dict[str, Dict[int, Tuple[List[int], List[int], int]]] = {}
    for name, (texts, tokens) in completions.items():
        joints = _encode(tokenizer, [p + c for p, c in zip(prompt_texts, texts)])
        for index, (prompt_ids, completion_ids, joint) in enumerate(zip(prompt_tokens, tokens, joints)):
            separate = list(prompt_ids) + list(completion_ids)
            if separate != joint:
                mismatched.setdefault(name, {})[index] = (separate, joint, len(prompt_ids))
    rows = sorted(set().union(*(m.keys() for m in mismatched.values())))
    if rows:
        shown = []
        for index in rows[:BOUNDARY_EXAMPLES]:
            details = [f"{name} " + _boundary_diff(tokenizer, *by_row[index])
                       for name, by_row in mismatched.items() if index in by_row]
            shown.append(f"row {index}: " + ", ".join(details))
        more = ", ..." if len(rows) > BOUNDARY_EXAMPLES else ""
        log.warning("%s: %d of %d rows tokenise differently at the prompt/completion boundary than as one text "
                    "(kept as tokenised separately, which is what training sees; a prompt ending mid-word or with "
                    "a space usually causes it): %s%s", caller, len(rows), len(prompt_texts), "; ".join(shown), more)
    return len(rows)


# Public tokenisation


def _fit(completion: List[int], prompt_length: int, max_length: Optional[int]) -> Tuple[List[int], bool]:
    if max_length is None or prompt_length + len(completion) <= max_length:
        return completion, False
    return completion[: max(max_length - prompt_length, 0)], True


def _is_empty(completion: List[int], eos: int) -> bool:
    return len(completion) == 0 or completion == [eos]


def _tokenize_rows(rows: Sequence[Any], tokenizer, fields: Sequence[str], max_prompt_length: Optional[int],
                   caller: str) -> Tuple[List[List[int]], Dict[str, List[List[int]]], DropCounts]:
    """Prompt ids and, per completion field, completion ids (untruncated) for every row; the counts so far."""
    _check_eos(tokenizer)
    prompt_texts, completion_texts, add_eos = _texts(rows, tokenizer, fields)
    prompt_tokens = _encode(tokenizer, prompt_texts)
    completion_tokens = {name: _encode(tokenizer, completion_texts[name]) for name in fields}
    mismatches = _check_boundaries(tokenizer, prompt_texts, prompt_tokens,
                                   {name: (completion_texts[name], completion_tokens[name]) for name in fields},
                                   caller)
    prompts, prompt_cut = _prompt_ids(tokenizer, prompt_tokens, max_prompt_length)
    completions = {name: _completion_ids(tokenizer, completion_tokens[name], add_eos[name]) for name in fields}
    return prompts, completions, DropCounts(prompt_truncated=prompt_cut, boundary_mismatch=mismatches)


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, max_length: Optional[int],
                   max_prompt_length: Optional[int]) -> Tuple[List[Dict[str, List[int]]], DropCounts]:
    """Token ids ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` per kept pair, rendered and truncated as in the
    module docstring, and the :class:`DropCounts` (with the boundary check's count)."""
    _check_lengths(max_length, max_prompt_length)
    prompts, completions, counts = _tokenize_rows(pairs, tokenizer, ("chosen", "rejected"), max_prompt_length,
                                                  "tokenize_pairs")
    eos = tokenizer.eos_token_id
    features = []
    for pair, prompt_ids, chosen_ids, rejected_ids in zip(pairs, prompts, completions["chosen"],
                                                          completions["rejected"]):
        chosen_ids, chosen_cut = _fit(chosen_ids, len(prompt_ids), max_length)
        rejected_ids, rejected_cut = _fit(rejected_ids, len(prompt_ids), max_length)
        counts.completion_truncated += chosen_cut + rejected_cut
        if _is_empty(chosen_ids, eos) or _is_empty(rejected_ids, eos):
            counts.empty_completion += 1
        elif chosen_ids == rejected_ids:
            counts.identical += 1
        else:
            features.append(_weighted({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids,
                                       "rejected_ids": rejected_ids}, pair))
    counts.kept = len(features)
    return features, counts


def tokenize_feedback(examples: Sequence[FeedbackExample], tokenizer, max_length: Optional[int],
                      max_prompt_length: Optional[int]) -> Tuple[List[Dict[str, Any]], DropCounts]:
    """Token ids ``{"prompt_ids", "completion_ids", "desirable"}`` per kept example, and the :class:`DropCounts`
    (with the boundary check's count)."""
    _check_lengths(max_length, max_prompt_length)
    prompts, completions, counts = _tokenize_rows(examples, tokenizer, ("completion",), max_prompt_length,
                                                  "tokenize_feedback")
    features = []
    for example, prompt_ids, completion_ids in zip(examples, prompts, completions["completion"]):
        completion_ids, cut = _fit(completion_ids, len(prompt_ids), max_length)
        counts.completion_truncated += cut
        if _is_empty(completion_ids, tokenizer.eos_token_id):
            counts.empty_completion += 1
            continue
        features.append(_weighted({"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                                   "desirable": example.desirable}, example))
    counts.kept = len(features)
    return features, counts


def _weighted(feature: Dict[str, Any], example: Any) -> Dict[str, Any]:
    """The feature with the example's ``weight`` when it is not 1 (unweighted data keeps its features as they were)."""
    weight = getattr(example, "weight", 1.0)
    if weight != 1.0:
        feature["weight"] = weight
    return feature


def tokenize_prompts(prompts: Sequence[PromptOnly], tokenizer, max_prompt_length: Optional[int]
                     ) -> List[Dict[str, List[int]]]:
    """``{"prompt_ids"}`` per prompt (``[bos] + prompt``, left-truncated to ``max_prompt_length``); chat prompts
    go through the tokenizer's chat template with the generation prompt, when it has one."""
    _check_lengths(None, max_prompt_length)
    ids, _ = _prompt_ids(tokenizer, _encode(tokenizer, _prompt_texts(prompts, tokenizer)), max_prompt_length)
    return [{"prompt_ids": x} for x in ids]


# Data report

TRUNCATION_WARNING = 0.1  # the data report warns when more than this fraction of prompts or completions lose tokens


def log_data_report(what: str, rows: Sequence[Any], tokenizer, counts: DropCounts) -> None:
    """Log what tokenisation did to ``rows`` (:class:`DropCounts`, the rendering and one rendered prompt), and warn
    when more than :data:`TRUNCATION_WARNING` of the prompts or of the completions were truncated."""
    log.info("%s: %s", what, counts)
    log.info("%s: %s", what, describe_rendering(rows, tokenizer))
    n_rows = len(rows)
    n_completions = n_rows * (2 if rows and isinstance(rows[0], PreferencePair) else 1)
    for kind, cut, total, limit in (("prompts", counts.prompt_truncated, n_rows, "generator.max_prompt_length"),
                                    ("completions", counts.completion_truncated, n_completions,
                                     "generator.max_length")):
        if total and cut / total > TRUNCATION_WARNING:
            log.warning("%s: %d of %d %s (%.0f%%) were truncated; raise %s if they matter", what, cut, total, kind,
                        100 * cut / total, limit)
