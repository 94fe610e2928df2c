"""Tokenisation, truncation, drop counting and collation, checked against ids built by hand from the tiny_tokenizer."""

import pytest
import torch

from rlmf.data.collate import FeedbackCollator, PairCollator, PromptCollator
from rlmf.data.formats import FeedbackExample, PreferencePair, PromptOnly
from rlmf.data.sources import load_pairs, write_jsonl
from rlmf.data.tokenization import DropCounts, tokenize_feedback, tokenize_pairs, tokenize_prompts

PROMPT = "\n\nHuman: What is the capital of France?\n\nAssistant:"
PAIRS = [
    PreferencePair(PROMPT, " The capital of France is Paris.", " Lyon."),
    PreferencePair("\n\nHuman: Write a short email.\n\nAssistant:", " Hi Sam, thanks.", " No."),
    PreferencePair("the quick brown fox", " jumps", " sleeps over the lazy dog"),
]


def enc(tiny_tokenizer, text):
    return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_no_truncation_layout(tiny_tokenizer):
    features, counts = tokenize_pairs(PAIRS, tiny_tokenizer, max_length=None, max_prompt_length=None)
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    for pair, f in zip(PAIRS, features):
        assert f["prompt_ids"] == [bos] + enc(tiny_tokenizer, pair.prompt)
        assert f["chosen_ids"] == enc(tiny_tokenizer, pair.chosen) + [eos]
        assert f["rejected_ids"] == enc(tiny_tokenizer, pair.rejected) + [eos]
        assert tiny_tokenizer.decode(f["prompt_ids"] + f["chosen_ids"]) == "<bos>" + pair.prompt + pair.chosen + "<eos>"
    assert counts == DropCounts(kept=3)


def test_prompt_keeps_its_end_and_completions_fit_max_length(tiny_tokenizer):
    max_length, max_prompt_length = 14, 6
    features, counts = tokenize_pairs(PAIRS[:1], tiny_tokenizer, max_length, max_prompt_length)
    (f,) = features
    prompt_tokens = enc(tiny_tokenizer, PROMPT)
    assert f["prompt_ids"] == [tiny_tokenizer.bos_token_id] + prompt_tokens[-5:]
    room = max_length - max_prompt_length
    assert f["chosen_ids"] == (enc(tiny_tokenizer, PAIRS[0].chosen) + [tiny_tokenizer.eos_token_id])[:room]
    assert f["rejected_ids"] == enc(tiny_tokenizer, " Lyon.") + [tiny_tokenizer.eos_token_id]
    assert len(f["rejected_ids"]) <= room  # short enough to keep its eos
    assert counts == DropCounts(kept=1, prompt_truncated=1, completion_truncated=1)


def test_empty_and_identical_pairs_are_dropped_and_counted(tiny_tokenizer):
    shared = " The capital of France is Paris, and"
    pairs = [
        PAIRS[0],
        PreferencePair(PROMPT, "", " Lyon."),                          # empty chosen
        PreferencePair(PROMPT, " Paris.", " Paris."),                  # identical text
        PreferencePair(PROMPT, shared + " yes", shared + " no"),       # identical once truncated
    ]
    max_length = len(enc(tiny_tokenizer, PROMPT)) + 1 + len(enc(tiny_tokenizer, shared))  # bos + prompt + shared part
    features, counts = tokenize_pairs(pairs, tiny_tokenizer, max_length, max_prompt_length=max_length - 1)
    assert [f["prompt_ids"][1:] for f in features] == [enc(tiny_tokenizer, PROMPT)]
    assert counts.kept == 1 and counts.empty_completion == 1 and counts.identical == 2 and counts.dropped == 3
    assert counts.as_dict() == {"data/dropped": 3, "data/kept": 1, "data/empty_completion": 1, "data/identical": 2,
                                "data/prompt_truncated": 0, "data/completion_truncated": counts.completion_truncated,
                                "data/boundary_mismatch": 0}
    assert str(counts).startswith("kept 1, dropped 3 (empty completion 1, chosen == rejected 2)")


def test_prompt_longer_than_max_length_leaves_an_empty_completion(tiny_tokenizer):
    # Without max_prompt_length nothing bounds the prompt, so it can use up the whole budget.
    features, counts = tokenize_pairs(PAIRS[:1], tiny_tokenizer, max_length=4, max_prompt_length=None)
    assert features == [] and counts.empty_completion == 1


def test_length_arguments_are_checked(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"max_prompt_length \(8\) must be less than max_length \(8\)"):
        tokenize_pairs(PAIRS, tiny_tokenizer, 8, 8)
    with pytest.raises(ValueError, match="max_length must be a positive int or None, got 0"):
        tokenize_pairs(PAIRS, tiny_tokenizer, 0, None)


def test_tokenizer_without_bos(tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast

    no_bos = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<eos>",
                                     pad_token="<pad>")
    assert no_bos.bos_token_id is None
    features, _ = tokenize_pairs(PAIRS[:1], no_bos, None, 4)
    assert features[0]["prompt_ids"] == enc(tiny_tokenizer, PROMPT)[-4:]


def test_pair_collator(tiny_tokenizer):
    features, _ = tokenize_pairs(PAIRS, tiny_tokenizer, 64, 32)
    batch = PairCollator(tiny_tokenizer.pad_token_id)(features)
    B = len(features)
    rows = ([f["prompt_ids"] + f["chosen_ids"] for f in features]
            + [f["prompt_ids"] + f["rejected_ids"] for f in features])
    T = max(len(r) for r in rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (2 * B, T)
    for i, row in enumerate(rows):
        f = features[i % B]
        completion = f["chosen_ids"] if i < B else f["rejected_ids"]
        pad = T - len(row)
        assert batch["input_ids"][i].tolist() == row + [tiny_tokenizer.pad_token_id] * pad
        assert batch["attention_mask"][i].tolist() == [1] * len(row) + [0] * pad
        assert batch["labels"][i].tolist() == [-100] * len(f["prompt_ids"]) + completion + [-100] * pad
    assert batch["chosen_lengths"].tolist() == [len(f["chosen_ids"]) for f in features]
    assert batch["rejected_lengths"].tolist() == [len(f["rejected_ids"]) for f in features]
    assert batch["prompt_lengths"].tolist() == [len(f["prompt_ids"]) for f in features]
    assert all(v.dtype == torch.long for v in batch.values())
    # Every completion token, and nothing else, is a label.
    label_counts = (batch["labels"] != -100).sum(1)
    assert torch.equal(label_counts, torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]]))


def test_feedback_collator(tiny_tokenizer):
    examples = [FeedbackExample(PROMPT, " Paris.", True), FeedbackExample("the quick", "", False),
                FeedbackExample("the quick", " brown fox", False)]
    features, counts = tokenize_feedback(examples, tiny_tokenizer, 64, 32)
    assert counts == DropCounts(kept=2, empty_completion=1)
    batch = FeedbackCollator(tiny_tokenizer.pad_token_id)(features)
    assert batch["input_ids"].shape[0] == 2
    assert batch["desirable"].tolist() == [True, False] and batch["desirable"].dtype == torch.bool
    expected_lengths = [len(enc(tiny_tokenizer, text)) + 1 for text in (" Paris.", " brown fox")]  # + eos
    assert batch["completion_lengths"].tolist() == expected_lengths
    prompt_ids, completion_ids = features[1]["prompt_ids"], features[1]["completion_ids"]
    expected = [-100] * len(prompt_ids) + completion_ids
    assert batch["labels"][1, : len(expected)].tolist() == expected


def test_prompt_collator_pads_on_the_left(tiny_tokenizer):
    features = tokenize_prompts([PromptOnly(PROMPT), PromptOnly("the quick")], tiny_tokenizer, max_prompt_length=64)
    batch = PromptCollator(tiny_tokenizer.pad_token_id)(features)
    long, short = features[0]["prompt_ids"], features[1]["prompt_ids"]
    pad = len(long) - len(short)
    assert batch["input_ids"].tolist() == [long, [tiny_tokenizer.pad_token_id] * pad + short]
    assert batch["attention_mask"].tolist() == [[1] * len(long), [0] * pad + [1] * len(short)]


def test_collators_need_a_pad_id():
    with pytest.raises(ValueError, match="pad_token_id is None"):
        PairCollator(None)


def test_file_to_batch(tiny_tokenizer, tmp_path):
    path = tmp_path / "hh.jsonl"
    write_jsonl(path, [{"chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected} for p in PAIRS[:2]])
    pairs, _ = load_pairs(path, transcripts="raw")
    assert pairs == PAIRS[:2]
    features, _ = tokenize_pairs(pairs, tiny_tokenizer, 128, 64)
    batch = PairCollator(tiny_tokenizer.pad_token_id)(features)
    chosen_tokens = batch["labels"][0][batch["labels"][0] != -100]
    assert tiny_tokenizer.decode(chosen_tokens) == PAIRS[0].chosen + "<eos>"
