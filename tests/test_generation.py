"""Samples come from the policy: a checkpoint's generation_config never changes what we draw; every stop token ends
a completion; evaluation scores its KL at the temperature it sampled at; both samplers (generator.sampler) draw
from the same distribution, and ours decodes greedily exactly as model.generate does."""

import functools
import json

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from checkpoints import ARCHITECTURES, MASKED_ATTENTION
from decode_checks import TEXTS, assert_step_is_the_forward_bit_for_bit, left_padded
from rlmf.data.formats import PromptOnly
from rlmf.data.tokenization import tokenize_prompts
from rlmf.generation import SAMPLERS, generate, sample_tokens, stop_token_ids
from rlmf.llama_step import inlined_step_refusal, llama_step
from rlmf.sampling import refusal

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


def _first_tokens(model, tokenizer, n, temperature, ours=True, sampler="hf"):
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = ids.repeat(n, 1)
    mask = torch.ones_like(ids)
    torch.manual_seed(0)
    if ours:
        tokens, _ = sample_tokens(model, ids, mask, max_new_tokens=1, do_sample=True, temperature=temperature,
                                  stop_ids=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  sampler=sampler)
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


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_samples_follow_the_policy_softmax_not_the_checkpoint_generation_config(chatty_checkpoint, temperature,
                                                                                sampler):
    model = AutoModelForCausalLM.from_pretrained(chatty_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(chatty_checkpoint)
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1].double() / temperature, -1)
    assert probs.max() < 0.9, "the test needs a spread-out distribution"
    n = 6000
    ours = _first_tokens(model, tokenizer, n, temperature, sampler=sampler)
    assert _chi_square_p(ours, probs) > 1e-3
    # The checkpoint's own settings give a visibly different distribution: the test can tell them apart.
    theirs = _first_tokens(model, tokenizer, n, temperature, ours=False)
    assert _chi_square_p(theirs, probs) < 1e-6
    # ... and the checkpoint's generation_config is left as it was.
    assert model.generation_config.repetition_penalty == 1.3 and model.generation_config.top_k == 20


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_stop_token_of_the_checkpoint_ends_a_completion(tiny_checkpoint, sampler):
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
                                 pad_token_id=tokenizer.pad_token_id, sampler=sampler)
    assert tokens[0, 0] == greedy_next and keep[0].tolist() == [True] + [False] * (tokens.shape[1] - 1)
    texts, token_ids = generate(model, tokenizer, [PROMPT], max_new_tokens=8, do_sample=False,
                                return_token_ids=True, sampler=sampler)
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


# --- the two samplers agree: greedy token for token, sampled in distribution -----------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rlmf_greedy_is_model_generate_token_for_token(tiny_checkpoint, arch):
    """Left-padded prompts of three lengths, a stop token met at different steps by different rows, two completions
    per prompt (one prefill, its cache repeated), rows leaving the batch as they stop; every attention kernel the
    architecture takes. Reference: ``model.generate(do_sample=False)`` itself."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint(arch))
    for attention in MASKED_ATTENTION[arch]:
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch), attn_implementation=attention).eval()
        ids, mask = left_padded(tokenizer, TEXTS)
        settings = dict(do_sample=False, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id)
        free = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=[], **settings)[:, ids.shape[1]:]
        stops = [tokenizer.eos_token_id, int(free[0, 5])]  # row 0 stops at step 6 at the latest, others may earlier
        expected = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=stops, **settings)[:, ids.shape[1]:]
        assert (expected == tokenizer.pad_token_id).any(), "the test needs a row that stops early"
        tokens, keep = sample_tokens(model, ids, mask, temperature=1.0, stop_ids=stops, num_return_sequences=2,
                                     sampler="rlmf", **settings)
        assert torch.equal(tokens, expected.repeat_interleave(2, 0)), (arch, attention)
        if attention == "sdpa":  # and a batch without padding, whose mask generate drops
            one = model.generate(input_ids=ids[2:], attention_mask=mask[2:], eos_token_id=stops, **settings)
            tokens, _ = sample_tokens(model, ids[2:], mask[2:], temperature=1.0, stop_ids=stops, sampler="rlmf",
                                      **settings)
            assert torch.equal(tokens, one[:, ids.shape[1]:])


@pytest.mark.parametrize("attention", MASKED_ATTENTION["llama"])
def test_a_plain_llama_decodes_through_its_forward_written_out_bit_for_bit(tiny_checkpoint, attention):
    """:func:`rlmf.llama_step.llama_step` takes a plain Llama (grouped-query attention here: 4 heads, 2 key-value
    heads) and gives its forward's logits to the last bit, step after step on one cache each, under left padding
    and without a mask. Reference: ``model(..., logits_to_keep=1)`` itself."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), attn_implementation=attention).eval()
    step = llama_step(model)
    assert step is not None, inlined_step_refusal(model)
    assert_step_is_the_forward_bit_for_bit(model, step, tokenizer)


def test_the_written_out_step_refuses_what_it_would_get_wrong(tiny_checkpoint):
    """Another architecture, a training-mode model, a hook on a module whose forward the step skips and a replaced
    forward each keep the model's own forward."""
    other = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("qwen2")).eval()
    assert llama_step(other) is None and "not a plain LlamaForCausalLM" in inlined_step_refusal(other)
    llama = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama")).eval()
    assert llama_step(llama) is not None
    assert "training" in inlined_step_refusal(llama.train())
    llama.eval()
    handle = llama.model.layers[0].self_attn.register_forward_hook(lambda module, args, out: out)
    assert "hook" in inlined_step_refusal(llama)
    handle.remove()
    llama.model.layers[1].forward = lambda *args, **kwargs: args[0]
    assert "replaced" in inlined_step_refusal(llama)
    del llama.model.layers[1].forward
    assert inlined_step_refusal(llama) is None


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_later_tokens_follow_the_policy_after_a_shared_left_padded_prompt(chatty_checkpoint, sampler):
    """The second token of a left-padded prompt's completions, among those whose first token was the likeliest,
    against the model's softmax at the temperature after that prompt and token (the prompt run alone, unpadded):
    what the shared, repeated prefill cache and the positions under left padding must give."""
    model = AutoModelForCausalLM.from_pretrained(chatty_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(chatty_checkpoint)
    ids, mask = left_padded(tokenizer, [PROMPT, "Dear Ms."])
    assert mask[1, 0] == 0, "the second prompt is the padded one"
    n, temperature = 6000, 0.7
    torch.manual_seed(1)
    tokens, _ = sample_tokens(model, ids, mask, max_new_tokens=2, do_sample=True, temperature=temperature,
                              stop_ids=[], pad_token_id=tokenizer.pad_token_id, num_return_sequences=n,
                              sampler=sampler)
    short = tokens[n:]  # the padded prompt's completions
    first = int(torch.mode(short[:, 0]).values)
    second = short[short[:, 0] == first, 1]
    assert len(second) > 600, "the test needs many completions that share their first token"
    prompt = ids[1, mask[1].bool()]
    with torch.no_grad():
        logits = model(torch.cat([prompt, torch.tensor([first])])[None]).logits[0, -1]
    assert _chi_square_p(second, torch.softmax(logits.double() / temperature, -1)) > 1e-3


def test_rlmf_stopped_rows_leave_the_batch(tiny_checkpoint):
    """Sampled completions end at their first stop token (padding after it; the output as long as the longest), and
    from the step after it the row is no longer run through the model."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama")).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    ids, mask = left_padded(tokenizer, TEXTS)
    with torch.no_grad():
        likely = torch.topk(model(input_ids=ids, attention_mask=mask).logits[:, -1], 3).indices.flatten().tolist()
    stops = sorted(set(likely) | {tokenizer.eos_token_id})  # most rows stop within a few steps
    rows_run = []
    forward = model.forward

    @functools.wraps(forward)  # the sampler reads the forward's signature
    def counting(*args, **kwargs):
        rows_run.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    model.forward = counting
    torch.manual_seed(0)
    tokens, keep = sample_tokens(model, ids, mask, max_new_tokens=16, do_sample=True, temperature=1.0,
                                 stop_ids=stops, pad_token_id=tokenizer.pad_token_id, num_return_sequences=8,
                                 sampler="rlmf")
    lengths = keep.sum(-1)
    is_stop = torch.isin(tokens, torch.tensor(stops))
    for row, length in zip(range(tokens.shape[0]), lengths.tolist()):
        assert not is_stop[row, : length - 1].any() and (is_stop[row, length - 1] or length == 16)
        assert (tokens[row, length:] == tokenizer.pad_token_id).all()
    assert tokens.shape[1] == int(lengths.max()), "the output is as long as the longest completion"
    assert int(lengths.min()) < tokens.shape[1], "rows stop at different steps"
    # The prefill runs each prompt once; step s runs the rows that have not stopped within their first s tokens.
    assert rows_run[0] == len(TEXTS)
    live = [int((lengths > s).sum()) for s in range(1, tokens.shape[1])]
    assert rows_run[1:] == live


def test_rlmf_samples_are_seeded_and_fall_back_to_generate_for_a_model_it_refuses(tiny_checkpoint, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    model.train()
    draws = [generate(model, tokenizer, TEXTS, max_new_tokens=8, do_sample=True, seed=3, num_return_sequences=2,
                      sampler="rlmf") for _ in range(2)]
    assert draws[0] == draws[1] and model.training, "seeded, and the model is left in its mode"

    class NoCache(type(model)):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    refused = NoCache.from_pretrained(tiny_checkpoint("llama"))
    assert refusal(refused) == "NoCache.forward takes no cache or position_ids"
    greedy = dict(max_new_tokens=8, do_sample=False)
    fallback = generate(refused, tokenizer, TEXTS, sampler="rlmf", **greedy)
    assert fallback == generate(refused, tokenizer, TEXTS, sampler="hf", **greedy)
    assert "generator.sampler=rlmf: NoCache.forward takes no cache" in caplog.text


@pytest.mark.parametrize("algo", ["grpo", "hypo"])
def test_generator_sampler_reaches_every_sampling_call_site(compose, tmp_path, monkeypatch, algo):
    """generator.sampler=rlmf: the feedback samples, the align stage's rollouts (grpo) or online samples (hypo) and
    the evaluation's samples and greedy completions all run our decode loop; model.generate is never called."""
    import rlmf.generation
    from rlmf.train import run_job

    calls = []
    decode = rlmf.generation.decode

    def counted(*args, **kwargs):
        calls.append(kwargs["do_sample"])
        return decode(*args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError("model.generate ran under generator.sampler=rlmf")

    monkeypatch.setattr(rlmf.generation, "decode", counted)
    monkeypatch.setattr(rlmf.generation, "_generate", refused)
    summary = run_job(compose("experiment=quick", f"algo={algo}", "generator.sampler=rlmf",
                              "algo.optim.max_steps=2"), tmp_path / "run")
    assert "gold/reply_rate/aligned" in summary and "gold/reply_rate_greedy/aligned" in summary
    assert True in calls and False in calls
