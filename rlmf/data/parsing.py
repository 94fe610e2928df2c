"""Row parsing: how a raw row (a dict) becomes one example (:mod:`rlmf.data.formats`).

Accepted preference rows (:func:`parse_pair_row`):

1. ``prompt``, ``chosen``, ``rejected`` strings.
2. ``prompt`` a list of messages, ``chosen`` / ``rejected`` lists of messages starting with an assistant turn
   (TRL's conversational format). If ``chosen`` / ``rejected`` repeat the prompt messages first, those are removed.
3. ``chosen`` / ``rejected`` full conversations and no ``prompt``: the prompt is their shared leading messages.
4. ``chosen`` / ``rejected`` full HH transcripts and no ``prompt``: the prompt is their shared text up to and
   including the last ``"\\n\\nAssistant:"``.

HH transcripts become conversations: a text row whose prompt is an HH transcript (it starts with a role tag such as
``"\n\nHuman:"`` and ends with ``"\n\nAssistant:"``, one turn or many) keeps its strings and also gets its messages,
parsed from the turns by :func:`~rlmf.data.transcripts.parse_transcript`, so an instruct model's chat template
renders it like any chat row. ``transcripts="raw"`` (the config's ``task.transcripts``) keeps such rows as plain text.

Feedback rows (:func:`parse_feedback_row`) are ``prompt``, ``completion`` (strings, or messages as above) and
``label`` (a bool, or 0/1). Prompt rows (:func:`parse_prompt_row`) need only ``prompt``; a preference row also works
(its prompt is used). Other fields are ignored.

Parsers raise :class:`~rlmf.data.formats.DataError` naming the field; the loaders in :mod:`rlmf.data.sources` prefix
the file and line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from rlmf.data.formats import DataError, FeedbackExample, PreferencePair, PromptOnly
from rlmf.data.transcripts import ASSISTANT, ROLE_TAGS, _as_conversation, _completion_text, render_messages


# ---------------------------------------------------------------------------------------------------------------
# Field checks


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _require(row: Mapping[str, Any], name: str, needs: str) -> Any:
    if name not in row:
        found = ", ".join(repr(k) for k in row) or "none"
        raise DataError(f"field {name!r} is missing ({needs}; found fields: {found})")
    if row[name] is None:
        raise DataError(f"field {name!r} is null ({needs})")
    return row[name]


def _check_messages(value: Sequence[Any], name: str) -> List[Dict[str, str]]:
    if len(value) == 0:
        raise DataError(f"field {name!r} is an empty list of messages")
    messages = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, Mapping):
            raise DataError(f"field {where!r} must be a message {{'role': ..., 'content': ...}}, "
                            f"got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                raise DataError(f"field '{where}.{key}' is missing")
            if not isinstance(message[key], str):
                raise DataError(f"field '{where}.{key}' must be a string, got {_type_name(message[key])}")
        if message["role"] not in ROLE_TAGS:
            allowed = ", ".join(repr(r) for r in ROLE_TAGS)
            raise DataError(f"field '{where}.role' must be one of {allowed}, got {message['role']!r}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _text_or_messages(row: Mapping[str, Any], name: str, needs: str):
    """The field as a ``str`` or as a checked list of messages."""
    value = _require(row, name, needs)
    if isinstance(value, str):
        return value
    if _is_messages(value):
        return _check_messages(value, name)
    raise DataError(f"field {name!r} must be a string or a list of messages, got {_type_name(value)}")


def _check_prompt(prompt: str, name: str = "prompt") -> str:
    if not prompt.strip():
        raise DataError(f"field {name!r} is empty")
    return prompt


def _chat_prompt(prompt: List[Dict[str, str]]) -> str:
    """A message-list prompt rendered with the generation prompt appended."""
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"field 'prompt[{len(prompt) - 1}].role' must not be 'assistant' "
                        "(the prompt ends before the reply)")
    if not any(m["content"].strip() for m in prompt):
        raise DataError("field 'prompt' is empty (every message has empty content)")
    return render_messages(prompt, add_generation_prompt=True)


def _chat_prompt_and_replies(prompt, replies: Dict[str, List[Dict[str, str]]]
                             ) -> Tuple[str, Dict[str, str], Dict[str, List[Dict[str, str]]]]:
    """Render a message-list prompt and message-list replies; replies that repeat the prompt first lose it.
    Returns the prompt text, the reply texts and the reply messages (without the repeated prompt)."""
    prompt_text = _chat_prompt(prompt)
    texts, reply_messages = {}, {}
    for name, messages in replies.items():
        first = len(prompt) if len(messages) > len(prompt) and messages[: len(prompt)] == prompt else 0
        if messages[first]["role"] != "assistant":
            raise DataError(f"field '{name}[{first}].role' must be 'assistant' (a completion starts with the "
                            f"assistant's reply), got {messages[first]['role']!r}")
        texts[name] = _completion_text(messages[first:])
        reply_messages[name] = messages[first:]
    return prompt_text, texts, reply_messages


def _mixed(name: str, kind: str, prompt_kind: str) -> DataError:
    return DataError(f"field {name!r} is {kind} but 'prompt' is {prompt_kind}; use strings for all fields "
                     f"or lists of messages for all fields")


# ---------------------------------------------------------------------------------------------------------------
# Row parsers

_PAIR_NEEDS = "preference rows have 'prompt', 'chosen' and 'rejected', or HH-style only 'chosen' and 'rejected'"
_FEEDBACK_NEEDS = "feedback rows have 'prompt', 'completion' and 'label'"
_PROMPT_NEEDS = "prompt rows have 'prompt' (or 'chosen' and 'rejected' to take the prompt from)"


def _parse_weight(row: Mapping[str, Any]) -> float:
    """The optional ``weight`` field: a finite number >= 0 (default 1)."""
    weight = row.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise DataError(f"field 'weight' must be a finite number >= 0, got {_type_name(weight)} {weight!r}")
    return float(weight)


def parse_pair_row(row: Mapping[str, Any], transcripts: str = "chat") -> PreferencePair:
    """A :class:`PreferencePair` from a row in any format listed in the module docstring (with an optional
    ``weight``); :class:`DataError` naming the field otherwise. ``transcripts``: see :data:`TRANSCRIPTS`."""
    pair = _as_conversation(_parse_pair_fields(row), ("chosen", "rejected"), transcripts)
    return dataclasses.replace(pair, weight=_parse_weight(row)) if "weight" in row else pair


def _parse_pair_fields(row: Mapping[str, Any]) -> PreferencePair:
    if not isinstance(row, Mapping):
        raise DataError(f"row must be an object with fields, got {_type_name(row)}")
    if "prompt" in row and row["prompt"] is not None:
        prompt = _text_or_messages(row, "prompt", _PAIR_NEEDS)
        chosen = _text_or_messages(row, "chosen", _PAIR_NEEDS)
        rejected = _text_or_messages(row, "rejected", _PAIR_NEEDS)
        if isinstance(prompt, str):
            for name, value in (("chosen", chosen), ("rejected", rejected)):
                if not isinstance(value, str):
                    raise _mixed(name, "a list of messages", "a string")
            return PreferencePair(_check_prompt(prompt), chosen, rejected)
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(value, str):
                raise _mixed(name, "a string", "a list of messages")
        prompt_text, texts, replies = _chat_prompt_and_replies(prompt, {"chosen": chosen, "rejected": rejected})
        return PreferencePair(prompt_text, texts["chosen"], texts["rejected"], prompt, replies["chosen"],
                              replies["rejected"])

    chosen = _text_or_messages(row, "chosen", _PAIR_NEEDS)
    rejected = _text_or_messages(row, "rejected", _PAIR_NEEDS)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError("fields 'chosen' and 'rejected' must both be strings (HH transcripts) or both be lists "
                        f"of messages (conversations), got {_type_name(chosen)} and {_type_name(rejected)}")
    if isinstance(chosen, str):
        return _split_hh(chosen, rejected)
    return _split_conversations(chosen, rejected)


def _split_hh(chosen: str, rejected: str) -> PreferencePair:
    """HH-RLHF: the prompt is the shared text up to and including the last ``"\\n\\nAssistant:"``."""
    shared = os.path.commonprefix([chosen, rejected])
    end = shared.rfind(ASSISTANT)
    if end < 0:
        raise DataError("fields 'chosen' and 'rejected' have no prompt: without a 'prompt' field they must be "
                        "HH transcripts sharing the text up to and including a final '\\n\\nAssistant:'")
    end += len(ASSISTANT)
    prompt = chosen[:end]
    _check_prompt(prompt)
    return PreferencePair(prompt, chosen[end:], rejected[end:])


def _split_conversations(chosen: List[Dict[str, str]], rejected: List[Dict[str, str]]) -> PreferencePair:
    """Full conversations: the prompt is the longest shared run of leading messages followed by an assistant
    turn in both."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1

    def reply_at(messages, i):
        return i < len(messages) and messages[i]["role"] == "assistant"

    while k > 0 and not (reply_at(chosen, k) and reply_at(rejected, k)):
        k -= 1
    if k == 0:
        raise DataError("fields 'chosen' and 'rejected' have no prompt: without a 'prompt' field they must be "
                        "conversations that share their leading messages up to an assistant reply")
    prompt = render_messages(chosen[:k], add_generation_prompt=True)
    return PreferencePair(prompt, _completion_text(chosen[k:]), _completion_text(rejected[k:]), chosen[:k],
                          chosen[k:], rejected[k:])


def _parse_label(row: Mapping[str, Any]) -> bool:
    label = _require(row, "label", _FEEDBACK_NEEDS)
    if isinstance(label, bool):
        return label
    if isinstance(label, int) and label in (0, 1):
        return bool(label)
    shown = f"{_type_name(label)} {label!r}" if isinstance(label, (int, float, str)) else _type_name(label)
    raise DataError(f"field 'label' must be a bool or 0/1, got {shown}")


def parse_feedback_row(row: Mapping[str, Any], transcripts: str = "chat") -> FeedbackExample:
    """A :class:`FeedbackExample` from a ``prompt`` / ``completion`` / ``label`` row (strings, or messages with a
    completion starting at the assistant's reply), with an optional ``weight``; ``transcripts``: see
    :data:`TRANSCRIPTS`."""
    example = _as_conversation(_parse_feedback_fields(row), ("completion",), transcripts)
    return dataclasses.replace(example, weight=_parse_weight(row)) if "weight" in row else example


def _parse_feedback_fields(row: Mapping[str, Any]) -> FeedbackExample:
    if not isinstance(row, Mapping):
        raise DataError(f"row must be an object with fields, got {_type_name(row)}")
    prompt = _text_or_messages(row, "prompt", _FEEDBACK_NEEDS)
    completion = _text_or_messages(row, "completion", _FEEDBACK_NEEDS)
    desirable = _parse_label(row)
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise _mixed("completion", "a list of messages", "a string")
        return FeedbackExample(_check_prompt(prompt), completion, desirable)
    if isinstance(completion, str):
        raise _mixed("completion", "a string", "a list of messages")
    prompt_text, texts, replies = _chat_prompt_and_replies(prompt, {"completion": completion})
    return FeedbackExample(prompt_text, texts["completion"], desirable, prompt, replies["completion"])


def parse_prompt_row(row: Mapping[str, Any], transcripts: str = "chat") -> PromptOnly:
    """A :class:`PromptOnly` from a row with ``prompt`` (a string, or messages rendered with the generation prompt
    appended and kept), or from a preference row without one (HH transcripts or conversations); ``transcripts``:
    see :data:`TRANSCRIPTS`."""
    if not isinstance(row, Mapping):
        raise DataError(f"row must be an object with fields, got {_type_name(row)}")
    if ("prompt" not in row or row["prompt"] is None) and "chosen" in row:
        pair = parse_pair_row(row, transcripts)
        return PromptOnly(pair.prompt, pair.prompt_messages)
    prompt = _text_or_messages(row, "prompt", _PROMPT_NEEDS)
    if isinstance(prompt, str):
        return _as_conversation(PromptOnly(_check_prompt(prompt)), (), transcripts)
    return PromptOnly(_chat_prompt(prompt), prompt)
