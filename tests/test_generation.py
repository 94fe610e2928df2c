"""Samples come from the policy: a checkpoint's generation_config never changes what we draw; every stop token ends
a completion; evaluation scores its KL at the temperature it sampled at."""

import json

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlmf.data.formats import PromptOnly
from rlmf.data.tokenization import tokenize_prompts
from rlmf.generation import generate, sample_tokens, stop_token_ids

PROMPT = "Dear Ms. Alvarez, thank you for"


@pytest.fixture(scope="module")
def chatty_checkpoint(tmp_path_factory, tiny_checkpoint):
    """A tiny Llama whose generation_config is an instruct model's: temperature 0.7, repetition penalty 1.3,
    top-k 20, top-p 0.8."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, repetition_penalty=1.3, top_k=20,
                                               top_p=0.8, eos_token_id=tokenizer.eos_token_id)
    directory = tmp_path_factory.mktemp("chatty")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _first_tokens(model, tokenizer, n, temperature, ours=True):
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = ids.repeat(n, 1)
    mask = torch.ones_like(ids)
    torch.manual_seed(0)
    if ours:
        tokens, _ = sample_tokens(model, ids, mask, max_new_tokens=1, do_sample=True, temperature=temperature,
                                  stop_ids=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    else:  # what a plain generate call does with the checkpoint's own settings
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1,
                                pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
    return tokens[:, 0]


def _chi_square_p(tokens, probs):
    """p-value of the observed token counts under ``probs``, rare tokens pooled so every bin expects >= 5."""
    n = len(tokens)
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    expected = probs.double() * n
    order = torch.argsort(expected, descending=True)
    keep = order[expected[order] >= 5]
    rest = order[expected[order] < 5]
    observed = torch.cat([counts[keep], counts[rest].sum().view(1)])
    wanted = torch.cat([expected[keep], expected[rest].sum().view(1)])
    if wanted[-1] < 5:  # fold a too-small pooled bin into the last kept one
        observed, wanted = torch.cat([observed[:-2], observed[-2:].sum().view(1)]), torch.cat(
            [wanted[:-2], wanted[-2:].sum().view(1)])
    return chisquare(observed.numpy(), wanted.numpy() * observed.sum().item() / wanted.sum().item()).pvalue


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_samples_follow_the_policy_softmax_not_the_checkpoint_generation_config(chatty_checkpoint, temperature):
    model = AutoModelForCausalLM.from_pretrained(chatty_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(chatty_checkpoint)
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1].double() / temperature, -1)
    assert probs.max() < 0.9, "the test needs a spread-out distribution"
    n = 6000
    ours = _first_tokens(model, tokenizer, n, temperature)
    assert _chi_square_p(ours, probs) > 1e-3
    # The checkpoint's own settings give a visibly different distribution: the test can tell them apart.
    theirs = _first_tokens(model, tokenizer, n, temperature, ours=False)
    assert _chi_square_p(theirs, probs) < 1e-6
    # ... and the checkpoint's generation_config is left as it was.
    assert model.generation_config.repetition_penalty == 1.3 and model.generation_config.top_k == 20


def test_every_stop_token_of_the_checkpoint_ends_a_completion(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    ids = torch.tensor([tokenize_prompts([PromptOnly(PROMPT)], tokenizer, 64)[0]["prompt_ids"]])  # as generate does
    with torch.no_grad():
        greedy_next = int(model(ids).logits[0, -1].argmax())
    # An end-of-turn token besides eos (Llama-3 style list): the greedy next token, so it is drawn at once.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, greedy_next]
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, greedy_next]
    tokens, keep = sample_tokens(model, ids, torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 temperature=1.0, stop_ids=stop_token_ids(model, tokenizer),
                                 pad_token_id=tokenizer.pad_token_id)
    assert tokens[0, 0] == greedy_next and keep[0].tolist() == [True] + [False] * (tokens.shape[1] - 1)
    texts, token_ids = generate(model, tokenizer, [PROMPT], max_new_tokens=8, do_sample=False,
                                return_token_ids=True)
    assert token_ids[0][1] == [greedy_next], "the completion ends at the first stop token, which it keeps"


def test_evaluation_kl_is_scored_at_the_sampling_temperature(compose, tmp_path, monkeypatch):
    import rlmf.stages.evaluate
    from rlmf.train import run_job

    run_job(compose("experiment=quick", "stage.stages=[sft]"), tmp_path / "run")
    seen = []
    original = rlmf.stages.evaluate.batched_completion_logps

    def spy(model, features, collate, batch_size=32, temperature=1.0, prefix="", **layout):
        seen.append(temperature)
        return original(model, features, collate, batch_size, temperature, prefix, **layout)

    monkeypatch.setattr(rlmf.stages.evaluate, "batched_completion_logps", spy)
    summary = run_job(compose("experiment=quick", "stage.stages=[evaluate]", "generator.temperature=0.7"),
                      tmp_path / "run")
    assert seen and set(seen) == {0.7}
    assert summary["kl/sft"] == 0.0
    assert json.loads((tmp_path / "run" / "evaluate" / "done.json").read_text())["kl/sft"] == 0.0
