"""HH transcripts: the Anthropic HH-RLHF text convention (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) and the
conversations it stands for.

:func:`render_messages` renders chat messages as HH text (what a chat row's strings hold, so a chat row and the
equivalent HH transcript give the same prompt and completions); :func:`parse_transcript` reads the turns of an HH
transcript back as messages.

HH transcripts become conversations: a text row whose prompt is an HH transcript (it starts with a role tag such as
``"\n\nHuman:"`` and ends with ``"\n\nAssistant:"``, one turn or many) keeps its strings and also gets its messages,
parsed from the turns, so an instruct model's chat template renders it like any chat row. ``transcripts="raw"``
(the config's ``task.transcripts``, one of :data:`TRANSCRIPTS`) keeps such rows as plain text.

Row types are :mod:`rlmf.data.formats`'s and row parsing :mod:`rlmf.data.parsing`'s; messages here are
``{"role", "content"}`` mappings, assumed valid (the parsers check them).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Mapping, Optional, Sequence, TypeVar

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLE_TAGS = {"system": "\n\nSystem:", "user": HUMAN, "assistant": ASSISTANT}
# How text rows that are HH transcripts are read: as conversations (messages kept beside the text) or as raw text.
TRANSCRIPTS = ("chat", "raw")
_TAG_PATTERN = re.compile("(" + "|".join(re.escape(tag) for tag in ROLE_TAGS.values()) + ")")
_TAG_ROLES = {tag: role for role, tag in ROLE_TAGS.items()}
T = TypeVar("T")


def render_messages(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> str:
    """Render chat messages as HH-style text: ``"\\n\\nHuman: {user}\\n\\nAssistant: {assistant}..."``.

    Roles are ``system`` (``"\\n\\nSystem: "``), ``user`` (``"\\n\\nHuman: "``) and ``assistant``
    (``"\\n\\nAssistant: "``). ``add_generation_prompt`` appends ``"\\n\\nAssistant:"`` so the text ends where a
    reply begins. Messages are assumed valid (:func:`~rlmf.data.parsing.parse_pair_row` and friends check them).
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
