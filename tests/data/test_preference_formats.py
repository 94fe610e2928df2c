"""Row formats: every accepted preference / feedback / prompt row shape, and the error for each bad field."""

import pytest

from rlmf.data.formats import DataError, FeedbackExample, PreferencePair, PromptOnly, pairs_to_feedback
from rlmf.data.parsing import parse_feedback_row, parse_pair_row, parse_prompt_row
from rlmf.data.transcripts import parse_transcript, render_messages

HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour.\n\nAssistant:"
EXPECTED = PreferencePair(HH_PROMPT, " Blue.", " I'd rather not.")

USER1 = {"role": "user", "content": "Hi there"}
BOT1 = {"role": "assistant", "content": "Hello! How can I help?"}
USER2 = {"role": "user", "content": "Name a colour."}
CHOSEN = {"role": "assistant", "content": "Blue."}
REJECTED = {"role": "assistant", "content": "I'd rather not."}
CHAT_PROMPT = [USER1, BOT1, USER2]
# The same pair from a chat row: the HH strings, and the messages kept (the replies without the prompt).
EXPECTED_CHAT = PreferencePair(HH_PROMPT, " Blue.", " I'd rather not.", CHAT_PROMPT, [CHOSEN], [REJECTED])


def test_render_messages_is_hh_text():
    assert render_messages([USER1, BOT1]) == "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
    assert render_messages([USER1], add_generation_prompt=True) == "\n\nHuman: Hi there\n\nAssistant:"
    assert render_messages([{"role": "system", "content": "Be brief."}, USER1]) == (
        "\n\nSystem: Be brief.\n\nHuman: Hi there")


def test_string_pair():
    row = {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5", "id": 7}  # extra fields are ignored
    assert parse_pair_row(row) == PreferencePair("Q: 2+2?\nA:", " 4", " 5")


def test_hh_transcripts_split_at_last_shared_assistant_turn():
    row = {"chosen": HH_PROMPT + " Blue.", "rejected": HH_PROMPT + " I'd rather not."}
    assert parse_pair_row(row, transcripts="raw") == EXPECTED
    assert parse_pair_row(row) == EXPECTED_CHAT  # HH transcripts are read as conversations by default


def test_hh_transcripts_whose_replies_share_a_start():
    # The shared text runs into the replies (" Blue" vs " Blue-green"); the prompt still ends at the marker.
    row = {"chosen": HH_PROMPT + " Blue.", "rejected": HH_PROMPT + " Blue-green."}
    assert parse_pair_row(row, transcripts="raw") == PreferencePair(HH_PROMPT, " Blue.", " Blue-green.")


def test_chat_prompt_with_assistant_replies_matches_hh():
    row = {"prompt": CHAT_PROMPT, "chosen": [CHOSEN], "rejected": [REJECTED]}
    assert parse_pair_row(row) == EXPECTED_CHAT


def test_chat_replies_that_repeat_the_prompt():
    row = {"prompt": CHAT_PROMPT, "chosen": CHAT_PROMPT + [CHOSEN], "rejected": CHAT_PROMPT + [REJECTED]}
    assert parse_pair_row(row) == EXPECTED_CHAT


def test_full_conversations_without_prompt():
    row = {"chosen": CHAT_PROMPT + [CHOSEN], "rejected": CHAT_PROMPT + [REJECTED]}
    assert parse_pair_row(row) == EXPECTED_CHAT


def test_full_conversations_where_one_continues_the_other():
    # rejected stops after the first reply; chosen goes on: the prompt is the first user turn only.
    row = {"chosen": [USER1, BOT1, USER2, CHOSEN], "rejected": [USER1, BOT1]}
    pair = parse_pair_row(row)
    assert pair.prompt == "\n\nHuman: Hi there\n\nAssistant:"
    assert pair.chosen == " Hello! How can I help?\n\nHuman: Name a colour.\n\nAssistant: Blue."
    assert pair.rejected == " Hello! How can I help?"


def test_multi_message_reply():
    row = {"prompt": [USER1], "chosen": [BOT1, USER2, CHOSEN], "rejected": [REJECTED]}
    pair = parse_pair_row(row)
    assert pair.prompt + pair.chosen == render_messages([USER1, BOT1, USER2, CHOSEN])
    assert pair.prompt + pair.rejected == render_messages([USER1, REJECTED])


@pytest.mark.parametrize("label, desirable", [(True, True), (False, False), (1, True), (0, False)])
def test_feedback_row(label, desirable):
    row = {"prompt": "P:", "completion": " c", "label": label}
    assert parse_feedback_row(row) == FeedbackExample("P:", " c", desirable)


def test_feedback_chat_row():
    row = {"prompt": CHAT_PROMPT, "completion": [CHOSEN], "label": True}
    assert parse_feedback_row(row) == FeedbackExample(HH_PROMPT, " Blue.", True, CHAT_PROMPT, [CHOSEN])


def test_prompt_rows():
    assert parse_prompt_row({"prompt": "P:"}) == PromptOnly("P:")
    assert parse_prompt_row({"prompt": CHAT_PROMPT}) == PromptOnly(HH_PROMPT, CHAT_PROMPT)
    assert parse_prompt_row({"chosen": HH_PROMPT + " a", "rejected": HH_PROMPT + " b"}) == PromptOnly(HH_PROMPT,
                                                                                                     CHAT_PROMPT)
    assert parse_prompt_row({"prompt": HH_PROMPT}) == PromptOnly(HH_PROMPT, CHAT_PROMPT)
    assert parse_prompt_row({"prompt": HH_PROMPT}, transcripts="raw") == PromptOnly(HH_PROMPT)


def test_pairs_to_feedback():
    assert pairs_to_feedback([EXPECTED]) == [FeedbackExample(HH_PROMPT, " Blue.", True),
                                             FeedbackExample(HH_PROMPT, " I'd rather not.", False)]


def test_to_row_round_trips():
    assert parse_pair_row(EXPECTED.to_row(), transcripts="raw") == EXPECTED
    assert parse_pair_row(EXPECTED_CHAT.to_row()) == EXPECTED_CHAT
    example = FeedbackExample("P:", " c", False)
    assert parse_feedback_row(example.to_row()) == example
    assert parse_prompt_row(PromptOnly("P:").to_row()) == PromptOnly("P:")


@pytest.mark.parametrize("parse, row, message", [
    (parse_pair_row, {"prompt": "P", "chosen": 3, "rejected": "r"},
     "field 'chosen' must be a string or a list of messages, got int"),
    (parse_pair_row, {"prompt": "P", "chosen": "c"},
     "field 'rejected' is missing (preference rows have 'prompt', 'chosen' and 'rejected', or HH-style only "
     "'chosen' and 'rejected'; found fields: 'prompt', 'chosen')"),
    (parse_pair_row, {"prompt": "P", "chosen": None, "rejected": "r"},
     "field 'chosen' is null (preference rows have 'prompt', 'chosen' and 'rejected', or HH-style only "
     "'chosen' and 'rejected')"),
    (parse_pair_row, {"prompt": "  ", "chosen": "c", "rejected": "r"}, "field 'prompt' is empty"),
    (parse_pair_row, {"prompt": "P", "chosen": [CHOSEN], "rejected": "r"},
     "field 'chosen' is a list of messages but 'prompt' is a string; use strings for all fields or lists of "
     "messages for all fields"),
    (parse_pair_row, {"prompt": [USER1], "chosen": [CHOSEN], "rejected": "r"},
     "field 'rejected' is a string but 'prompt' is a list of messages; use strings for all fields or lists of "
     "messages for all fields"),
    (parse_pair_row, {"prompt": [], "chosen": [CHOSEN], "rejected": [REJECTED]},
     "field 'prompt' is an empty list of messages"),
    (parse_pair_row, {"prompt": [USER1, "hi"], "chosen": [CHOSEN], "rejected": [REJECTED]},
     "field 'prompt[1]' must be a message {'role': ..., 'content': ...}, got str"),
    (parse_pair_row, {"prompt": [{"role": "tool", "content": "x"}], "chosen": [CHOSEN], "rejected": [REJECTED]},
     "field 'prompt[0].role' must be one of 'system', 'user', 'assistant', got 'tool'"),
    (parse_pair_row, {"prompt": [USER1], "chosen": [{"role": "assistant"}], "rejected": [REJECTED]},
     "field 'chosen[0].content' is missing"),
    (parse_pair_row, {"prompt": [USER1], "chosen": [{"role": "assistant", "content": 1}], "rejected": [REJECTED]},
     "field 'chosen[0].content' must be a string, got int"),
    (parse_pair_row, {"prompt": [USER1], "chosen": [USER2], "rejected": [REJECTED]},
     "field 'chosen[0].role' must be 'assistant' (a completion starts with the assistant's reply), got 'user'"),
    (parse_pair_row, {"prompt": [USER1], "chosen": [USER1, USER2], "rejected": [REJECTED]},
     "field 'chosen[1].role' must be 'assistant' (a completion starts with the assistant's reply), got 'user'"),
    (parse_pair_row, {"prompt": [{"role": "user", "content": " "}], "chosen": [CHOSEN], "rejected": [REJECTED]},
     "field 'prompt' is empty (every message has empty content)"),
    (parse_prompt_row, {"prompt": [USER1, BOT1]},
     "field 'prompt[1].role' must not be 'assistant' (the prompt ends before the reply)"),
    (parse_pair_row, {"prompt": [USER1, BOT1], "chosen": [CHOSEN], "rejected": [REJECTED]},
     "field 'prompt[1].role' must not be 'assistant' (the prompt ends before the reply)"),
    (parse_pair_row, {"chosen": "a good answer", "rejected": "a bad answer"},
     "fields 'chosen' and 'rejected' have no prompt: without a 'prompt' field they must be HH transcripts "
     "sharing the text up to and including a final '\\n\\nAssistant:'"),
    (parse_pair_row, {"chosen": [USER1, CHOSEN], "rejected": [USER2, REJECTED]},
     "fields 'chosen' and 'rejected' have no prompt: without a 'prompt' field they must be conversations that "
     "share their leading messages up to an assistant reply"),
    (parse_pair_row, {"chosen": "x", "rejected": [REJECTED]},
     "fields 'chosen' and 'rejected' must both be strings (HH transcripts) or both be lists of messages "
     "(conversations), got str and list"),
    (parse_pair_row, ["P", "c", "r"], "row must be an object with fields, got list"),
    (parse_feedback_row, {"prompt": "P", "completion": "c", "label": 2},
     "field 'label' must be a bool or 0/1, got int 2"),
    (parse_feedback_row, {"prompt": "P", "completion": "c", "label": "yes"},
     "field 'label' must be a bool or 0/1, got str 'yes'"),
    (parse_feedback_row, {"prompt": "P", "completion": "c"},
     "field 'label' is missing (feedback rows have 'prompt', 'completion' and 'label'; found fields: 'prompt', "
     "'completion')"),
    (parse_feedback_row, {"prompt": "", "completion": "c", "label": 1}, "field 'prompt' is empty"),
    (parse_prompt_row, {"prompt": 5}, "field 'prompt' must be a string or a list of messages, got int"),
    (parse_prompt_row, {"text": "P"},
     "field 'prompt' is missing (prompt rows have 'prompt' (or 'chosen' and 'rejected' to take the prompt from); "
     "found fields: 'text')"),
])
def test_bad_rows_name_the_field(parse, row, message):
    with pytest.raises(DataError) as info:
        parse(row)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


# HH transcripts as conversations (task.transcripts=chat, the default)


def test_parse_transcript_turns():
    text = "\n\nSystem: Be brief.\n\nHuman:  Hi \n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:"
    assert parse_transcript(text) == [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello!"},
                                      {"role": "user", "content": "Bye"},
                                      {"role": "assistant", "content": ""}]
    assert parse_transcript("Q: 2+2?\n\nAssistant:") is None  # text before the first tag: not a transcript
    assert parse_transcript("no tags at all") is None


def test_hh_replies_that_go_on_for_several_turns():
    row = {"chosen": HH_PROMPT + " Blue.\n\nHuman: Why?\n\nAssistant: I like it.", "rejected": HH_PROMPT + " No."}
    pair = parse_pair_row(row)
    assert pair.prompt_messages == EXPECTED_CHAT.prompt_messages
    assert [m.content for m in pair.chosen_messages] == ["Blue.", "Why?", "I like it."]
    assert [m.role for m in pair.chosen_messages] == ["assistant", "user", "assistant"]
    assert pair.chosen == " Blue.\n\nHuman: Why?\n\nAssistant: I like it."  # the text stays as it was


def test_hh_prompt_field_and_feedback_rows_become_conversations():
    pair = parse_pair_row({"prompt": HH_PROMPT, "chosen": " Blue.", "rejected": " I'd rather not."})
    assert pair == EXPECTED_CHAT
    example = parse_feedback_row({"prompt": HH_PROMPT, "completion": " Blue.", "label": 1})
    assert example == FeedbackExample(HH_PROMPT, " Blue.", True, CHAT_PROMPT, [CHOSEN])
    assert parse_feedback_row({"prompt": HH_PROMPT, "completion": " Blue.", "label": 1}, transcripts="raw") == \
        FeedbackExample(HH_PROMPT, " Blue.", True)


@pytest.mark.parametrize("prompt", ["Q: 2+2?\nA:", "Write an email.\n\nAssistant:",
                                    "\n\nHuman: Hi\n\nAssistant: Hello\n\nAssistant:"])
def test_text_that_is_not_an_hh_prompt_stays_text(prompt):
    assert parse_pair_row({"prompt": prompt, "chosen": " a", "rejected": " b"}).prompt_messages is None


def test_unknown_transcripts_mode_is_refused():
    with pytest.raises(ValueError, match="transcripts='chatml' is not one of"):
        parse_pair_row({"chosen": HH_PROMPT + " a", "rejected": HH_PROMPT + " b"}, transcripts="chatml")
