"""Pair encoding and the discriminator's collators, on the MiniLM tokenizer (local files, offline)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoTokenizer

from rlmf.data.reward_collate import PairRewardCollator, ThumbsRewardCollator, encode_prompt_completion
from rlmf.modules.discriminator import minilm_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def decoded_sides(tokenizer, encoding, row):
    """The (prompt, completion) text of one encoded row, split on the type ids."""
    ids = encoding["input_ids"][row][encoding["attention_mask"][row].bool()]
    types = encoding["token_type_ids"][row][encoding["attention_mask"][row].bool()]
    decode = lambda side: tokenizer.decode(ids[types == side], skip_special_tokens=True)
    return decode(0), decode(1)


def test_short_pairs_match_a_plain_tokenizer_call(tokenizer):
    prompts, completions = ["hello there", "a question?"], ["hi!", "an answer that is a bit longer"]
    expected = tokenizer(prompts, completions, padding="longest", return_tensors="pt")
    encoding = encode_prompt_completion(tokenizer, prompts, completions, max_length=64)
    assert set(encoding) == set(expected)
    for key in expected:
        assert torch.equal(encoding[key], expected[key])


def test_long_prompt_loses_its_beginning_not_the_completion(tokenizer):
    prompt = " ".join(f"word{i}" for i in range(200)) + " the end of the prompt"
    encoding = encode_prompt_completion(tokenizer, [prompt], ["the whole completion survives"], max_length=32)
    # cutting inside a word ("word1|##23") can re-tokenize one token shorter; never longer
    assert 30 <= encoding["input_ids"].shape[1] <= 32
    kept_prompt, kept_completion = decoded_sides(tokenizer, encoding, 0)
    assert kept_completion == "the whole completion survives"
    assert kept_prompt.endswith("the end of the prompt") and "word0 " not in kept_prompt


def test_long_completion_is_cut_at_its_end_and_prompt_keeps_a_share(tokenizer):
    completion = "the start of the completion " + " ".join(["filler"] * 300)
    # the short prompt would make a plain truncation="only_first" call raise
    encoding = encode_prompt_completion(tokenizer, ["a short prompt"], [completion], max_length=40)
    assert encoding["input_ids"].shape[1] == 40
    kept_prompt, kept_completion = decoded_sides(tokenizer, encoding, 0)
    assert kept_prompt == "a short prompt"
    assert kept_completion.startswith("the start of the completion")

    both_long = encode_prompt_completion(tokenizer, [" ".join(["context"] * 300)], [completion], max_length=40)
    kept_prompt, kept_completion = decoded_sides(tokenizer, both_long, 0)
    assert both_long["input_ids"].shape[1] == 40
    assert len(kept_prompt.split()) == int((40 - 3) * 0.25)
    assert kept_completion.startswith("the start of the completion")


@dataclass
class Pair:  # stands in for rlmf.data.formats.PreferencePair
    prompt: str
    chosen: str
    rejected: str


def test_pair_collator_accepts_dicts_and_objects(tokenizer):
    rows = [{"prompt": "p1", "chosen": "good", "rejected": "bad"}, Pair("p2", "fine reply", "rude reply here")]
    batch = PairRewardCollator(tokenizer, max_length=16)(rows)
    assert set(batch) == {"chosen", "rejected"}
    assert batch["chosen"]["input_ids"].shape[0] == batch["rejected"]["input_ids"].shape[0] == 2
    assert decoded_sides(tokenizer, batch["chosen"], 1) == ("p2", "fine reply")
    assert decoded_sides(tokenizer, batch["rejected"], 0) == ("p1", "bad")
    with pytest.raises(KeyError, match="prompt, chosen, rejected"):
        PairRewardCollator(tokenizer, max_length=16)([{"prompt": "p", "chosen": "c"}])


def test_thumbs_collator(tokenizer):
    rows = [{"prompt": "p", "completion": "yes", "desirable": True}, {"prompt": "q", "completion": "no", "desirable": False}]
    batch = ThumbsRewardCollator(tokenizer, max_length=16)(rows)
    assert batch["desirable"].dtype == torch.float32 and batch["desirable"].tolist() == [1.0, 0.0]
    assert decoded_sides(tokenizer, batch["inputs"], 1) == ("q", "no")
