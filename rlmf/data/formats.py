"""Row formats: what one training example looks like, and how a raw row (a dict) becomes one.

Three kinds of example, one per family of objectives:

- :class:`PreferencePair` for paired losses (DPO, IPO, SimPO, ORPO, ...): a prompt and two completions.
- :class:`FeedbackExample` for unpaired losses (KTO): a prompt, one completion and a thumbs up/down.
- :class:`PromptOnly` for online sampling: the generator writes the completions.

The string fields are always text. Chat rows (lists of ``{"role", "content"}`` messages) are rendered to text by
:func:`render_messages` in the Anthropic HH-RLHF convention (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), so a chat
row and the equivalent HH transcript give the same prompt and completions: a prompt always ends with
``"\\n\\nAssistant:"`` and a completion is the text after it (``" Sure, ..."``).

Chat rows also keep their messages, in the optional ``*_messages`` fields (tuples of :class:`Message`; ``None`` for
text rows): ``prompt_messages`` are the messages before the reply, and ``chosen_messages`` / ``rejected_messages`` /
``completion_messages`` the reply's messages (starting with the assistant's turn; the prompt is not repeated). The
strings are the HH rendering of those messages. With a tokenizer that has a ``chat_template``,
:mod:`rlmf.data.collate` renders a row's messages through the template instead of using the HH strings; everything
else (the discriminator, the tasks) reads the strings. Message fields take part in ``==`` and ``hash``: a chat row
and a text row with the same HH text are different examples, as a chat template tokenises them differently.

Accepted preference rows (:func:`parse_pair_row`):

1. ``prompt``, ``chosen``, ``rejected`` strings.
2. ``prompt`` a list of messages, ``chosen`` / ``rejected`` lists of messages starting with an assistant turn
   (TRL's conversational format). If ``chosen`` / ``rejected`` repeat the prompt messages first, those are removed.
3. ``chosen`` / ``rejected`` full conversations and no ``prompt``: the prompt is their shared leading messages.
4. ``chosen`` / ``rejected`` full HH transcripts and no ``prompt``: the prompt is their shared text up to and
   including the last ``"\\n\\nAssistant:"``.

HH transcripts become conversations: a text row whose prompt is an HH transcript (it starts with a role tag such as
``"\n\nHuman:"`` and ends with ``"\n\nAssistant:"``, one turn or many) keeps its strings and also gets its messages,
parsed from the turns by :func:`parse_transcript`, so an instruct model's chat template renders it like any chat row.
``transcripts="raw"`` (the config's ``task.transcripts``) keeps such rows as plain text.

Feedback rows (:func:`parse_feedback_row`) are ``prompt``, ``completion`` (strings, or messages as above) and
``label`` (a bool, or 0/1). Prompt rows (:func:`parse_prompt_row`) need only ``prompt``; a preference row also works
(its prompt is used). Other fields are ignored.

Parsers raise :class:`DataError` naming the field; the loaders in :mod:`rlmf.data.sources` prefix the file and line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, TypeVar

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLE_TAGS = {"system": "\n\nSystem:", "user": HUMAN, "assistant": ASSISTANT}
# How text rows that are HH transcripts are read: as conversations (messages kept beside the text) or as raw text.
TRANSCRIPTS = ("chat", "raw")
_TAG_PATTERN = re.compile("(" + "|".join(re.escape(tag) for tag in ROLE_TAGS.values()) + ")")
_TAG_ROLES = {tag: role for role, tag in ROLE_TAGS.items()}


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file, line or record, and field."""


class Message(NamedTuple):
    """One chat message; a tuple, so examples holding messages stay hashable."""

    role: str
    content: str


Messages = Tuple[Message, ...]
T = TypeVar("T")


def messages_to_dicts(messages: Sequence[Message]) -> List[Dict[str, str]]:
    """``[{"role": ..., "content": ...}, ...]``, as ``tokenizer.apply_chat_template`` and JSON rows take them."""
    return [{"role": m.role, "content": m.content} for m in messages]


def _freeze_messages(example: Any, names: Sequence[str]) -> None:
    """Store the ``names`` fields of a frozen example as tuples of :class:`Message` (from any sequence of
    messages or ``{"role", "content"}`` mappings); they must be all set or all ``None``."""
    values = [getattr(example, name) for name in names]
    if all(v is None for v in values):
        return
    if any(v is None for v in values):
        given = ", ".join(f"{n}={'set' if v is not None else 'None'}" for n, v in zip(names, values))
        raise ValueError(f"{type(example).__name__}: the message fields must be all set or all None ({given})")
    for name, value in zip(names, values):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
            raise ValueError(f"{type(example).__name__}.{name} must be a non-empty sequence of messages")
        messages = []
        for m in value:
            if isinstance(m, Message):
                messages.append(m)
            elif isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str):
                messages.append(Message(m["role"], m["content"]))
            else:
                raise ValueError(f"{type(example).__name__}.{name} holds {m!r}, not a message "
                                 "{'role': str, 'content': str}")
        object.__setattr__(example, name, tuple(messages))


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred (``chosen``) and a dispreferred (``rejected``) completion; for chat rows also
    their messages (see the module docstring)."""

    prompt: str
    chosen: str
    rejected: str
    prompt_messages: Optional[Messages] = None
    chosen_messages: Optional[Messages] = None
    rejected_messages: Optional[Messages] = None
    weight: float = 1.0  # how much the pair counts in the loss (e.g. the evidence behind it); 1: as any other

    def __post_init__(self) -> None:
        _freeze_messages(self, ("prompt_messages", "chosen_messages", "rejected_messages"))

    def to_row(self) -> Dict[str, Any]:
        """Strings for a text row; messages (TRL's conversational format) for a chat row, so both read back the
        same."""
        if self.prompt_messages is not None:
            row = {"prompt": messages_to_dicts(self.prompt_messages),
                   "chosen": messages_to_dicts(self.chosen_messages),
                   "rejected": messages_to_dicts(self.rejected_messages)}
        else:
            row = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        return _with_weight(row, self.weight)


@dataclass(frozen=True)
class FeedbackExample:
    """One prompt and completion with binary feedback: ``desirable`` is the thumbs up (KTO's y_desirable); for
    chat rows also their messages."""

    prompt: str
    completion: str
    desirable: bool
    prompt_messages: Optional[Messages] = None
    completion_messages: Optional[Messages] = None
    weight: float = 1.0  # how much the row counts in the loss; 1: as any other

    def __post_init__(self) -> None:
        _freeze_messages(self, ("prompt_messages", "completion_messages"))

    def to_row(self) -> Dict[str, Any]:
        if self.prompt_messages is not None:
            row = {"prompt": messages_to_dicts(self.prompt_messages),
                   "completion": messages_to_dicts(self.completion_messages), "label": self.desirable}
        else:
            row = {"prompt": self.prompt, "completion": self.completion, "label": self.desirable}
        return _with_weight(row, self.weight)


def _with_weight(row: Dict[str, Any], weight: float) -> Dict[str, Any]:
    """A row's ``weight`` field, written only when it is not the default 1 (so unweighted files stay as they were)."""
    if weight != 1.0:
        row["weight"] = weight
    return row


@dataclass(frozen=True)
class PromptOnly:
    """A prompt for online sampling; for chat rows also its messages (rendered with the generation prompt)."""

    prompt: str
    prompt_messages: Optional[Messages] = None

    def __post_init__(self) -> None:
        _freeze_messages(self, ("prompt_messages",))

    def to_row(self) -> Dict[str, Any]:
        if self.prompt_messages is not None:
            return {"prompt": messages_to_dicts(self.prompt_messages)}
        return {"prompt": self.prompt}


def pairs_to_feedback(pairs: Sequence[PreferencePair]) -> List[FeedbackExample]:
    """Unpair preferences for KTO, as in the KTO paper: each chosen is desirable, each rejected undesirable
    (messages are carried along)."""
    out: List[FeedbackExample] = []
    for pair in pairs:
        out.append(FeedbackExample(pair.prompt, pair.chosen, True, pair.prompt_messages, pair.chosen_messages,
                                   pair.weight))
        out.append(FeedbackExample(pair.prompt, pair.rejected, False, pair.prompt_messages, pair.rejected_messages,
                                   pair.weight))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Chat rendering


def render_messages(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> str:
    """Render chat messages as HH-style text: ``"\\n\\nHuman: {user}\\n\\nAssistant: {assistant}..."``.

    Roles are ``system`` (``"\\n\\nSystem: "``), ``user`` (``"\\n\\nHuman: "``) and ``assistant``
    (``"\\n\\nAssistant: "``). ``add_generation_prompt`` appends ``"\\n\\nAssistant:"`` so the text ends where a
    reply begins. Messages are assumed valid (:func:`parse_pair_row` and friends check them).
    """
    text = "".join(f"{ROLE_TAGS[m['role']]} {m['content']}" for m in messages)
    return text + ASSISTANT if add_generation_prompt else text


def parse_transcript(text: str) -> Optional[List[Dict[str, str]]]:
    """The turns of an HH-style transcript as messages, or ``None`` when ``text`` does not start with a role tag.

    ``"\\n\\nHuman: Hi\\n\\nAssistant: Hello"`` -> ``[{"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"}]``: tags as in :data:`ROLE_TAGS`, contents stripped of surrounding
    whitespace (a prompt's final ``"\\n\\nAssistant:"`` is a last, empty assistant turn).
    """
    parts = _TAG_PATTERN.split(text)
    if parts[0].strip() or len(parts) < 3:  # text before the first tag, or no tag at all: not a transcript
        return None
    return [{"role": _TAG_ROLES[tag], "content": content.strip()} for tag, content in zip(parts[1::2], parts[2::2])]


def _as_conversation(example: T, completion_fields: Sequence[str], transcripts: str) -> T:
    """A text example whose prompt is an HH transcript waiting for the assistant's reply, with its messages parsed
    from the turns (``transcripts == "chat"``); any other example as it is."""
    if transcripts not in TRANSCRIPTS:
        raise ValueError(f"transcripts={transcripts!r} is not one of {TRANSCRIPTS}")
    if transcripts == "raw" or example.prompt_messages is not None or not example.prompt.endswith(ASSISTANT):
        return example
    prompt_messages = (parse_transcript(example.prompt) or [])[:-1]  # less the empty turn the reply fills
    if not prompt_messages or prompt_messages[-1]["role"] == "assistant":
        return example
    replies = {f"{name}_messages": parse_transcript(ASSISTANT + getattr(example, name)) for name in completion_fields}
    return dataclasses.replace(example, prompt_messages=prompt_messages, **replies)


def _completion_text(messages: Sequence[Mapping[str, str]]) -> str:
    """The text a reply adds after a prompt that ends with ``"\\n\\nAssistant:"`` (messages[0] is the assistant)."""
    return render_messages(messages)[len(ASSISTANT):]


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
