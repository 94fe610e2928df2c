"""Rendering: which text each example's prompt and completions become before tokenisation.

- a row without messages, or any row when the tokenizer has no ``chat_template``: its strings (HH text for chat rows,
  see :mod:`rlmf.data.transcripts`), and the completion always gets the ``eos`` appended;
- a chat row (``prompt_messages`` set) when the tokenizer has a ``chat_template``: the prompt is
  ``apply_chat_template(prompt_messages, add_generation_prompt=True)`` and the completion is the render of the whole
  conversation (prompt messages + reply messages, no generation prompt) minus that prompt render; if the whole render
  does not start with the prompt render, :class:`~rlmf.data.formats.DataError` names the row and shows both.
  *bos*: a rendered prompt that starts with the tokenizer's bos text has that text removed before tokenising, and
  the bos id is put first as for every prompt, so there is exactly one bos. *eos*: the rendered completion keeps the
  template's own end of turn, and the eos id is appended only when the completion, ignoring trailing whitespace,
  does not already end with the eos text (ChatML-style templates whose end of turn is the eos, e.g.
  ``"...<|im_end|>\\n"`` with eos ``<|im_end|>``, get none; a template ending turns with another token gets the eos
  after it). Prompt-only rows (:func:`~rlmf.data.tokenization.tokenize_prompts`) render their messages the same way
  (with the generation prompt).

Tokenising the rendered text, truncation and the data report are :mod:`rlmf.data.tokenization`'s.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from rlmf.data.formats import DataError, Messages, PromptOnly, messages_to_dicts


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
    """``text`` less a leading bos token text: the bos id is put first by
    :func:`~rlmf.data.tokenization._prompt_ids` anyway."""
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
