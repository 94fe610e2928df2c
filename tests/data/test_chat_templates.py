"""Chat rows through the tokenizer's chat template, and the prompt/completion boundary check.

The tokenizer is RLMF's own byte-level BPE (``rlmf.models.train_tokenizer``: bos ``<s>``, eos ``</s>``) with small
Jinja templates set on it. Expected renders are written out by hand, not produced with ``apply_chat_template``.
"""

import logging

import pytest

from rlmf.data.formats import DataError, FeedbackExample, Message, PreferencePair, PromptOnly, pairs_to_feedback
from rlmf.data.parsing import parse_feedback_row, parse_pair_row, parse_prompt_row
from rlmf.data.sources import load_feedback, load_pairs, load_prompts, write_jsonl
from rlmf.data.tokenization import DropCounts, tokenize_feedback, tokenize_pairs, tokenize_prompts

# ChatML-like: every turn ends with "<|im_end|>\n" (not the eos), the generation prompt opens an assistant turn.
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Starts with the bos text and ends every turn with the eos text (Llama/Mistral style).
BOS_EOS = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}\n{% endfor %}"
           "{% if add_generation_prompt %}[assistant]{% endif %}")
# The generation prompt says "assistant" but assistant turns are written as "bot": no prefix relation.
MISMATCHED = ("{% for m in messages %}<|im_start|>{{ 'bot' if m.role == 'assistant' else m.role }}\n"
              "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The generation prompt ends with a space, so " Blue" tokenised at once differs from " " + "Blue".
SPACED = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
          "{% if add_generation_prompt %}assistant: {% endif %}")
STRICT = ("{% if messages[0].role != 'user' %}{{ raise_exception('first message must be the user') }}{% endif %}"
          + CHATML)

TEXTS = [
    "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n",
    "\n\nHuman: Name a colour.\n\nAssistant: Blue.",
    "the quick brown fox jumps over the lazy dog. " * 20,
    "[user] Hi there [assistant] Hello! How can I help?",
]

USER1 = {"role": "user", "content": "Hi there"}
BOT1 = {"role": "assistant", "content": "Hello! How can I help?"}
USER2 = {"role": "user", "content": "Name a colour."}
CHOSEN = {"role": "assistant", "content": "Blue."}
REJECTED = {"role": "assistant", "content": "No."}
TRL_ROW = {"prompt": [USER2], "chosen": [CHOSEN], "rejected": [REJECTED]}
PROMPT_RENDER = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"


def make_tokenizer(template=None):
    from rlmf.models import train_tokenizer

    tokenizer = train_tokenizer(TEXTS, vocab_size=400)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chatml():
    return make_tokenizer(CHATML)


@pytest.fixture(scope="module")
def plain():
    return make_tokenizer()


def enc(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_pair_renders_through_the_template(chatml):
    pair = parse_pair_row(TRL_ROW)
    (f,), counts = tokenize_pairs([pair], chatml, None, None)
    bos, eos = chatml.bos_token_id, chatml.eos_token_id
    # The prompt ends with the generation prompt; the completion is the assistant turn with its end of turn,
    # and as that is not the eos text, the eos is appended.
    assert f["prompt_ids"] == [bos] + enc(chatml, PROMPT_RENDER)
    assert f["chosen_ids"] == enc(chatml, "Blue.<|im_end|>\n") + [eos]
    assert f["rejected_ids"] == enc(chatml, "No.<|im_end|>\n") + [eos]
    assert chatml.decode(f["prompt_ids"] + f["chosen_ids"]) == f"<s>{PROMPT_RENDER}Blue.<|im_end|>\n</s>"
    assert counts == DropCounts(kept=1, boundary_mismatch=0)
    # The strings stay HH text for everything that reads them.
    assert (pair.prompt, pair.chosen) == ("\n\nHuman: Name a colour.\n\nAssistant:", " Blue.")


def test_without_a_template_chat_rows_are_hh_text(plain, chatml):
    pair = parse_pair_row(TRL_ROW)
    assert pair.prompt_messages == (Message("user", "Name a colour."),)
    assert pair.chosen_messages == (Message("assistant", "Blue."),)
    text_pair = PreferencePair(pair.prompt, pair.chosen, pair.rejected)
    hh = [{"prompt_ids": [plain.bos_token_id] + enc(plain, "\n\nHuman: Name a colour.\n\nAssistant:"),
           "chosen_ids": enc(plain, " Blue.") + [plain.eos_token_id],
           "rejected_ids": enc(plain, " No.") + [plain.eos_token_id]}]
    assert tokenize_pairs([pair], plain, None, None)[0] == hh
    # A row without messages is HH text even when the tokenizer has a template.
    assert tokenize_pairs([text_pair], chatml, None, None)[0] == hh
    assert tokenize_prompts([PromptOnly(pair.prompt, pair.prompt_messages)], plain, None) == [
        {"prompt_ids": hh[0]["prompt_ids"]}]


def test_full_conversation_rows(chatml):
    row = {"chosen": [USER1, BOT1, USER2, CHOSEN], "rejected": [USER1, BOT1, USER2, REJECTED]}
    pair = parse_pair_row(row)
    assert pair.prompt_messages == tuple(Message(**m) for m in (USER1, BOT1, USER2))
    (f,), _ = tokenize_pairs([pair], chatml, None, None)
    history = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    assert f["prompt_ids"] == [chatml.bos_token_id] + enc(chatml, history + PROMPT_RENDER)
    assert f["chosen_ids"] == enc(chatml, "Blue.<|im_end|>\n") + [chatml.eos_token_id]

    # One conversation continues the other: the chosen completion spans several messages.
    pair = parse_pair_row({"chosen": [USER1, BOT1, USER2, CHOSEN], "rejected": [USER1, REJECTED]})
    (f,), _ = tokenize_pairs([pair], chatml, None, None)
    assert chatml.decode(f["prompt_ids"]) == "<s><|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert chatml.decode(f["chosen_ids"]) == ("Hello! How can I help?<|im_end|>\n" + PROMPT_RENDER
                                              + "Blue.<|im_end|>\n</s>")


def test_trl_replies_that_repeat_the_prompt_match_trl_rows(chatml):
    repeated = {"prompt": [USER2], "chosen": [USER2, CHOSEN], "rejected": [USER2, REJECTED]}
    pair = parse_pair_row(repeated)
    assert pair == parse_pair_row(TRL_ROW) and pair.chosen_messages == (Message("assistant", "Blue."),)
    (f,), _ = tokenize_pairs([pair], chatml, None, None)
    assert (chatml.decode(f["prompt_ids"]), chatml.decode(f["chosen_ids"])) == (
        "<s>" + PROMPT_RENDER, "Blue.<|im_end|>\n</s>")


def test_template_whose_conversation_does_not_extend_the_prompt_names_the_row():
    tokenizer = make_tokenizer(MISMATCHED)
    pairs = [PreferencePair("the quick", " brown", " fox"), parse_pair_row(TRL_ROW)]
    with pytest.raises(DataError) as info:
        tokenize_pairs(pairs, tokenizer, None, None)
    message = str(info.value)
    assert message.startswith("row 1: the chat template's render of the whole conversation does not start with")
    assert repr(PROMPT_RENDER) in message
    assert repr("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>bot\nBlue.<|im_end|>\n") in message


def test_template_errors_name_the_row():
    tokenizer = make_tokenizer(STRICT)
    rows = [TRL_ROW, {"prompt": [{"role": "system", "content": "Be brief."}, USER2], "chosen": [CHOSEN],
                      "rejected": [REJECTED]}]
    with pytest.raises(DataError, match="row 1: the tokenizer's chat template fails on the row's messages: "
                                        ".*first message must be the user"):
        tokenize_pairs([parse_pair_row(r) for r in rows], tokenizer, None, None)


def test_template_with_bos_and_eos_gets_neither_twice():
    tokenizer = make_tokenizer(BOS_EOS)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    (f,), counts = tokenize_pairs([parse_pair_row(TRL_ROW)], tokenizer, None, None)
    assert f["prompt_ids"] == [bos] + enc(tokenizer, "[user] Name a colour.</s>\n[assistant]")
    assert f["prompt_ids"].count(bos) == 1
    # The assistant turn already ends with the eos text (then a newline): no eos is appended.
    assert f["chosen_ids"] == enc(tokenizer, " Blue.</s>\n") and f["chosen_ids"].count(eos) == 1
    assert tokenizer.decode(f["prompt_ids"] + f["chosen_ids"]) == (
        "<s>[user] Name a colour.</s>\n[assistant] Blue.</s>\n")
    assert counts.boundary_mismatch == 0
    (p,) = tokenize_prompts([parse_prompt_row({"prompt": [USER2]})], tokenizer, None)
    assert p["prompt_ids"] == f["prompt_ids"]
    # Left truncation keeps the single bos first.
    (p,) = tokenize_prompts([parse_prompt_row({"prompt": [USER2]})], tokenizer, 3)
    assert p["prompt_ids"] == [bos] + f["prompt_ids"][-2:]


def test_boundary_mismatch_is_counted_and_warned(plain, caplog):
    pairs = [
        PreferencePair("the quick", " brown fox", " lazy dog"),
        PreferencePair("the qu", "ick brown fox", " jumps"),  # prompt ends mid-word: joint "the quick" merges
        PreferencePair("the lazy", " dog", " fox"),
    ]
    assert enc(plain, "the qu") + enc(plain, "ick") != enc(plain, "the quick")  # the tokenizer does merge it
    with caplog.at_level(logging.WARNING, logger="rlmf.data.tokenization"):
        features, counts = tokenize_pairs(pairs, plain, None, None)
    assert counts.boundary_mismatch == 1 and counts.kept == 3 and counts.dropped == 0
    assert counts.as_dict()["data/boundary_mismatch"] == 1 and counts.as_dict()["data/dropped"] == 0
    assert str(counts).endswith("prompt/completion boundary differs from joint tokenisation in 1 rows")
    # The ids are kept as tokenised separately.
    assert features[1]["chosen_ids"] == enc(plain, "ick brown fox") + [plain.eos_token_id]
    (record,) = [r for r in caplog.records if r.name == "rlmf.data.tokenization"]
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "tokenize_pairs: 1 of 3 rows tokenise differently at the prompt/completion boundary" in message
    assert "row 1: chosen separately [" in message and "row 0" not in message and "row 2" not in message
    assert "rejected" not in message  # " jumps" after "the qu" does not merge
    assert "' qu' | 'ick'" in message and "' quick'" in message


def test_boundary_warning_names_at_most_three_rows(plain, caplog):
    examples = [FeedbackExample("the qu", "ick", True), FeedbackExample("the quick ", "brown", False),
                FeedbackExample("the quick", " brown", True), FeedbackExample("the la", "zy dog", False),
                FeedbackExample("the quick brown ", "fox", True)]
    with caplog.at_level(logging.WARNING, logger="rlmf.data.tokenization"):
        _, counts = tokenize_feedback(examples, plain, None, None)
    assert counts.boundary_mismatch == 4 and counts.kept == 5
    (record,) = [r for r in caplog.records if r.name == "rlmf.data.tokenization"]
    message = record.getMessage()
    assert message.startswith("tokenize_feedback: 4 of 5 rows")
    assert all(f"row {i}: completion" in message for i in (0, 1, 3)) and "row 4" not in message
    assert message.endswith(", ...")


def test_boundary_check_covers_template_renders(caplog):
    tokenizer = make_tokenizer(SPACED)
    with caplog.at_level(logging.WARNING, logger="rlmf.data.tokenization"):
        (f,), counts = tokenize_pairs([parse_pair_row(TRL_ROW)], tokenizer, None, None)
    assert tokenizer.decode(f["prompt_ids"]) == "<s>user: Name a colour.\nassistant: "
    assert counts.boundary_mismatch == 1
    assert "row 0: chosen separately" in caplog.text and "row 0: chosen" in caplog.text


def test_no_warning_when_boundaries_match(chatml, caplog):
    with caplog.at_level(logging.WARNING, logger="rlmf.data.tokenization"):
        _, counts = tokenize_pairs([parse_pair_row(TRL_ROW), PreferencePair("the quick", " brown", " fox")],
                                   chatml, None, None)
    assert counts.boundary_mismatch == 0 and caplog.records == []


def test_feedback_rows_through_the_template(chatml):
    pair = parse_pair_row(TRL_ROW)
    examples = pairs_to_feedback([pair])
    assert examples[0].completion_messages == pair.chosen_messages
    assert examples[1].completion_messages == pair.rejected_messages
    assert examples[1].prompt_messages == pair.prompt_messages
    features, counts = tokenize_feedback(examples, chatml, None, None)
    (paired,), _ = tokenize_pairs([pair], chatml, None, None)
    assert [f["completion_ids"] for f in features] == [paired["chosen_ids"], paired["rejected_ids"]]
    assert all(f["prompt_ids"] == paired["prompt_ids"] for f in features)
    row = parse_feedback_row({"prompt": [USER2], "completion": [CHOSEN], "label": 1})
    assert tokenize_feedback([row], chatml, None, None)[0][0]["completion_ids"] == paired["chosen_ids"]
    assert counts == DropCounts(kept=2, boundary_mismatch=0)


def test_prompt_rows_through_the_template(chatml):
    prompts = [parse_prompt_row({"prompt": [USER2]}),
               parse_prompt_row({"chosen": [USER1, BOT1, USER2, CHOSEN], "rejected": [USER1, BOT1, USER2, REJECTED]}),
               PromptOnly("the quick")]
    assert prompts[0].prompt_messages == (Message("user", "Name a colour."),)
    assert len(prompts[1].prompt_messages) == 3
    features = tokenize_prompts(prompts, chatml, None)
    bos = chatml.bos_token_id
    assert features[0]["prompt_ids"] == [bos] + enc(chatml, PROMPT_RENDER)
    assert chatml.decode(features[1]["prompt_ids"]).endswith(PROMPT_RENDER)
    assert features[2]["prompt_ids"] == [bos] + enc(chatml, "the quick")


def test_messages_round_trip_through_jsonl(tmp_path):
    pair = parse_pair_row({"chosen": [USER1, BOT1, USER2, CHOSEN], "rejected": [USER1, REJECTED]})
    assert hash(pair) == hash(parse_pair_row(pair.to_row()))
    write_jsonl(tmp_path / "pairs.jsonl", [pair])
    assert load_pairs(tmp_path / "pairs.jsonl")[0] == [pair]
    (example, _) = pairs_to_feedback([pair])
    write_jsonl(tmp_path / "fb.jsonl", [example])
    assert load_feedback(tmp_path / "fb.jsonl")[0] == [example]
    prompt = parse_prompt_row({"prompt": [USER2]})
    write_jsonl(tmp_path / "prompts.jsonl", [prompt])
    assert load_prompts(tmp_path / "prompts.jsonl")[0] == [prompt]
    # A chat row and a text row with the same HH text are different examples.
    assert pair != PreferencePair(pair.prompt, pair.chosen, pair.rejected)


def test_message_fields_are_all_or_none():
    with pytest.raises(ValueError, match="the message fields must be all set or all None"):
        PreferencePair("p", "c", "r", prompt_messages=[USER2])
    with pytest.raises(ValueError, match="must be a non-empty sequence of messages"):
        FeedbackExample("p", "c", True, [USER2], [])
    example = FeedbackExample("p", "c", True, [USER2], [CHOSEN])
    assert example.completion_messages == (Message("assistant", "Blue."),) and hash(example)


def test_drop_counts_do_not_count_boundary_mismatches_as_drops():
    counts = DropCounts(kept=2, empty_completion=1, identical=1, boundary_mismatch=5)
    assert counts.dropped == 2
    assert counts.as_dict()["data/boundary_mismatch"] == 5


# HH transcripts through the template, and the data report


def test_hh_transcript_renders_like_the_same_chat_row(chatml):
    """An HH transcript row tokenises exactly as the TRL chat row with the same turns (the template applies)."""
    hh = parse_pair_row({"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.",
                         "rejected": "\n\nHuman: Name a colour.\n\nAssistant: No."})
    assert tokenize_pairs([hh], chatml, None, None)[0] == tokenize_pairs([parse_pair_row(TRL_ROW)], chatml, None,
                                                                         None)[0]
    raw = parse_pair_row({"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.",
                          "rejected": "\n\nHuman: Name a colour.\n\nAssistant: No."}, transcripts="raw")
    (f,), _ = tokenize_pairs([raw], chatml, None, None)
    assert f["prompt_ids"] == [chatml.bos_token_id] + enc(chatml, "\n\nHuman: Name a colour.\n\nAssistant:")


def test_data_report_names_the_rendering_and_shows_a_prompt(chatml, plain, caplog):
    from rlmf.data.rendering import describe_rendering

    chat = [parse_pair_row(TRL_ROW)]
    assert describe_rendering(chat, chatml) == f"prompts rendered with the tokenizer's chat template; the first: " \
                                               f"{'<s>' + PROMPT_RENDER!r}"
    assert describe_rendering(chat, plain).startswith("prompts rendered with HH text (the tokenizer has no chat "
                                                      "template); the first: '<s>\\n\\nHuman: Name a colour.")
    text = [PreferencePair("Q: colour?\nA:", " Blue", " No")]
    assert describe_rendering(text, chatml) == "prompts rendered with the rows' own text (no messages); the first: " \
                                               "'<s>Q: colour?\\nA:'"


def test_data_report_warns_when_more_than_a_tenth_is_truncated(plain, caplog):
    from rlmf.data.tokenization import log_data_report

    long_prompt = PreferencePair("\n\nHuman: " + "word " * 40 + "\n\nAssistant:", " Blue.", " No.")
    short = PreferencePair("\n\nHuman: Hi\n\nAssistant:", " Blue.", " No.")
    for n_long, warned in ((1, False), (2, True)):  # 1 of 10 is not more than a tenth; 2 of 10 is
        rows = [long_prompt] * n_long + [short] * (10 - n_long)
        _, counts = tokenize_pairs(rows, plain, 64, 16)
        assert counts.prompt_truncated == n_long
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rlmf.data.tokenization"):
            log_data_report("alignment data", rows, plain, counts)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == ([f"alignment data: 2 of 10 prompts (20%) were truncated; raise "
                             "generator.max_prompt_length if they matter"] if warned else [])
        assert any("prompts rendered with the rows' own text" in r.getMessage() for r in caplog.records)
