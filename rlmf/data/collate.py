"""Tokenisation, truncation and collation of examples into generator batches.

Token layout of one sequence: ``[bos] prompt_tokens completion_tokens [eos]`` (``bos`` only if the tokenizer has one;
prompt and completion are tokenised separately, without the tokenizer's own special tokens).

Which text is tokenised:

- a row without messages, or any row when the tokenizer has no ``chat_template``: its strings (HH text for chat rows,
  see :mod:`rlmf.data.formats`), and the completion always gets the ``eos`` appended;
- a chat row (``prompt_messages`` set) when the tokenizer has a ``chat_template``: the prompt is
  ``apply_chat_template(prompt_messages, add_generation_prompt=True)`` and the completion is the render of the whole
  conversation (prompt messages + reply messages, no generation prompt) minus that prompt render; if the whole render
  does not start with the prompt render, :class:`~rlmf.data.formats.DataError` names the row and shows both.
  *bos*: a rendered prompt that starts with the tokenizer's bos text has that text removed before tokenising, and
  the bos id is put first as for every prompt, so there is exactly one bos. *eos*: the rendered completion keeps the
  template's own end of turn, and the eos id is appended only when the completion, ignoring trailing whitespace,
  does not already end with the eos text (ChatML-style templates whose end of turn is the eos, e.g.
  ``"...<|im_end|>\\n"`` with eos ``<|im_end|>``, get none; a template ending turns with another token gets the eos
  after it). :func:`tokenize_prompts` renders prompt messages the same way (with the generation prompt).

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

import logging
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from rlmf.data.formats import DataError, FeedbackExample, Messages, PreferencePair, PromptOnly, messages_to_dicts

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
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


# Rendering: which text each row tokenises (module docstring)


def uses_chat_template(tokenizer) -> bool:
    """Whether chat rows are rendered through ``tokenizer``'s chat template (it has a non-empty one)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _apply_template(tokenizer, messages: Messages, add_generation_prompt: bool, index: int) -> str:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages_to_dicts(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise DataError(f"row {index}: the tokenizer's chat template fails on the row's messages: "
                        f"{type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise DataError(f"row {index}: the tokenizer's chat template rendered {type(text).__name__}, not text")
    return text


def _without_bos_text(tokenizer, text: str) -> str:
    """``text`` less a leading bos token text: the bos id is put first by :func:`_prompt_ids` anyway."""
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else None
    return text[len(bos):] if bos and text.startswith(bos) else text


def _chat_texts(tokenizer, prompt_messages: Messages, replies: Sequence[Messages], index: int
                ) -> Tuple[str, List[str]]:
    """The template's prompt render (generation prompt added, bos text removed) and, per reply, the render of the
    whole conversation minus that prompt render."""
    prompt = _apply_template(tokenizer, prompt_messages, True, index)
    completions = []
    for reply in replies:
        full = _apply_template(tokenizer, tuple(prompt_messages) + tuple(reply), False, index)
        if not full.startswith(prompt):
            raise DataError(f"row {index}: the chat template's render of the whole conversation does not start "
                            "with its render of the prompt (with the generation prompt), so the completion cannot "
                            f"be split off; prompt render: {prompt!r}; conversation render: {full!r}")
        completions.append(full[len(prompt):])
    return _without_bos_text(tokenizer, prompt), completions


def _ends_with_eos(tokenizer, text: str) -> bool:
    eos = tokenizer.eos_token
    return bool(eos) and text.rstrip().endswith(eos)


def _texts(rows: Sequence[Any], tokenizer, fields: Sequence[str]
           ) -> Tuple[List[str], Dict[str, List[str]], Dict[str, List[bool]]]:
    """Per row: the prompt text, each completion field's text and whether it gets an eos appended."""
    template = uses_chat_template(tokenizer)
    prompts: List[str] = []
    completions: Dict[str, List[str]] = {name: [] for name in fields}
    add_eos: Dict[str, List[bool]] = {name: [] for name in fields}
    for index, row in enumerate(rows):
        if template and row.prompt_messages is not None:
            prompt, texts = _chat_texts(tokenizer, row.prompt_messages,
                                        [getattr(row, f"{name}_messages") for name in fields], index)
            ends = [not _ends_with_eos(tokenizer, text) for text in texts]
        else:
            prompt, texts, ends = row.prompt, [getattr(row, name) for name in fields], [True] * len(fields)
        prompts.append(prompt)
        for name, text, end in zip(fields, texts, ends):
            completions[name].append(text)
            add_eos[name].append(end)
    return prompts, completions, add_eos


def _prompt_texts(prompts: Sequence[PromptOnly], tokenizer) -> List[str]:
    if not uses_chat_template(tokenizer):
        return [p.prompt for p in prompts]
    return [p.prompt if p.prompt_messages is None
            else _without_bos_text(tokenizer, _apply_template(tokenizer, p.prompt_messages, True, index))
            for index, p in enumerate(prompts)]


def describe_rendering(rows: Sequence[Any], tokenizer) -> str:
    """For the data report: which text the rows' prompts become (the chat template, HH text or the rows' own
    text) and the first prompt as the model reads it (the bos text first, where the tokenizer has one)."""
    if not rows:
        return "no rows"
    chat = any(row.prompt_messages is not None for row in rows)
    how = ("the tokenizer's chat template" if chat and uses_chat_template(tokenizer)
           else "HH text (the tokenizer has no chat template)" if chat else "the rows' own text (no messages)")
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else ""
    first = bos + _prompt_texts([PromptOnly(rows[0].prompt, rows[0].prompt_messages)], tokenizer)[0]
    return f"prompts rendered with {how}; the first: {first!r}"


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


def _weights(features: Sequence[Dict[str, Any]]) -> Optional[torch.Tensor]:
    """``[B]`` float32 per-example weights when any feature carries one (the others weigh 1), else None."""
    if not any("weight" in f for f in features):
        return None
    return torch.tensor([float(f.get("weight", 1.0)) for f in features], dtype=torch.float32)


def tokenize_prompts(prompts: Sequence[PromptOnly], tokenizer, max_prompt_length: Optional[int]
                     ) -> List[Dict[str, List[int]]]:
    """``{"prompt_ids"}`` per prompt (``[bos] + prompt``, left-truncated to ``max_prompt_length``); chat prompts
    go through the tokenizer's chat template with the generation prompt, when it has one."""
    _check_lengths(None, max_prompt_length)
    ids, _ = _prompt_ids(tokenizer, _encode(tokenizer, _prompt_texts(prompts, tokenizer)), max_prompt_length)
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
