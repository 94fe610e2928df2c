"""Row formats: what one training example looks like.

Three kinds of example, one per family of objectives:

- :class:`PreferencePair` for paired losses (DPO, IPO, SimPO, ORPO, ...): a prompt and two completions.
- :class:`FeedbackExample` for unpaired losses (KTO): a prompt, one completion and a thumbs up/down.
- :class:`PromptOnly` for online sampling: the generator writes the completions.

The string fields are always text. Chat rows (lists of ``{"role", "content"}`` messages) are rendered to text by
:func:`~rlmf.data.transcripts.render_messages` in the Anthropic HH-RLHF convention
(``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), so a chat row and the equivalent HH transcript give the same prompt
and completions: a prompt always ends with ``"\\n\\nAssistant:"`` and a completion is the text after it
(``" Sure, ..."``).

Chat rows also keep their messages, in the optional ``*_messages`` fields (tuples of :class:`Message`; ``None`` for
text rows): ``prompt_messages`` are the messages before the reply, and ``chosen_messages`` / ``rejected_messages`` /
``completion_messages`` the reply's messages (starting with the assistant's turn; the prompt is not repeated). The
strings are the HH rendering of those messages. With a tokenizer that has a ``chat_template``,
:mod:`rlmf.data.rendering` renders a row's messages through the template instead of using the HH strings; everything
else (the discriminator, the tasks) reads the strings. Message fields take part in ``==`` and ``hash``: a chat row
and a text row with the same HH text are different examples, as a chat template tokenises them differently.

How a raw row (a dict) becomes an example is :mod:`rlmf.data.parsing`'s; a row that cannot be used raises
:class:`DataError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file, line or record, and field."""


class Message(NamedTuple):
    """One chat message; a tuple, so examples holding messages stay hashable."""

    role: str
    content: str


Messages = Tuple[Message, ...]


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
