"""rlmf.logprobs scores every architecture exactly as its own forward does.

Each tiny checkpoint (tests/checkpoints.py) is loaded with ``AutoModelForCausalLM`` and our completion log-probs are
compared with ``log_softmax(model(...).logits / T)`` gathered at the labels: tied and untied heads, a head bias,
Gemma soft-capping, Cohere's ``logit_scale`` and Granite's ``logits_scaling``; right- and left-padded rows; two
temperatures; gradients. The probe check must refuse a forward that transforms the logits in an unknown way.
"""

import pytest
import torch
from checkpoints import ARCHITECTURES, padded_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlmf import logprobs as lp
from rlmf.logprobs import LogitTransform, completion_logps, completion_token_logps, logit_transform
from rlmf.logprobs_check import check_logprobs_match_forward, probe_tolerance

EXPECTED = {  # what each forward does between the head and the logits (config values in tests/checkpoints.py)
    "llama": LogitTransform(), "qwen2": LogitTransform(), "gpt2": LogitTransform(), "phi": LogitTransform(),
    "gemma2": LogitTransform(softcap=2.0), "gemma3": LogitTransform(softcap=2.0),
    "cohere": LogitTransform(scale=2.5), "cohere2": LogitTransform(scale=2.5),
    "granite": LogitTransform(scale=1 / 0.4),
}


def load(directory):
    return AutoModelForCausalLM.from_pretrained(directory).float().eval(), AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """``loaded(arch)`` -> ``(model, tokenizer)``, loaded once per module; tests that change a model load their own."""
    cache = {}

    def _loaded(arch):
        if arch not in cache:
            cache[arch] = load(tiny_checkpoint(arch))
        return cache[arch]

    return _loaded


def forward_token_logps(model, input_ids, attention_mask, labels, temperature):
    """The reference: ``log_softmax(model(...).logits / T)`` at the shifted labels, 0 elsewhere, [B, L-1]."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]
    targets = labels[:, 1:]
    picked = torch.log_softmax(logits / temperature, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return picked * (targets != -100)


def test_every_architecture_has_a_checkpoint_that_loads_offline(tiny_checkpoint):
    assert set(ARCHITECTURES) == set(EXPECTED)
    model, tokenizer = load(tiny_checkpoint("phi"))
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert 300 <= len(tokenizer) <= 500 and model.config.vocab_size == len(tokenizer)
    # Phi's head is untied and has a bias, which the factory makes non-zero.
    head = model.get_output_embeddings()
    assert head.weight is not model.get_input_embeddings().weight and head.bias.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_logit_transform_is_read_off_the_config(loaded, arch):
    model, _ = loaded(arch)
    got = logit_transform(model)
    assert got.softcap == EXPECTED[arch].softcap and got.scale == pytest.approx(EXPECTED[arch].scale)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logps_match_the_models_own_forward(loaded, arch, side, temperature):
    model, tokenizer = loaded(arch)
    inputs = padded_batch(tokenizer, side)
    with torch.no_grad():
        expected = forward_token_logps(model, *inputs, temperature)
        tokens, mask = completion_token_logps(model, *inputs, temperature=temperature)
        sums, counts = completion_logps(model, *inputs, temperature=temperature)
    assert torch.equal(mask, inputs[2][:, 1:] != -100)
    torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(sums, expected.sum(-1), atol=1e-4, rtol=1e-5)
    assert torch.equal(counts, mask.sum(-1))
    # Left and right padding give the same numbers (positions follow the mask).
    other = padded_batch(tokenizer, "left" if side == "right" else "right")
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(model, *other, temperature=temperature)[0], sums,
                                   atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "phi", "cohere"])
def test_only_labelled_positions_reach_the_head(loaded, arch, monkeypatch):
    """The head (fused kernel or materialised logits) sees one row per completion token, not the padded batch."""
    model, tokenizer = loaded(arch)
    inputs = padded_batch(tokenizer, "left")
    rows = []
    for name in ("logprobs_from_hidden", "logprobs_from_logits"):
        real = getattr(lp, name)
        monkeypatch.setattr(lp, name, lambda x, *a, _real=real, **k: rows.append(x.shape[0]) or _real(x, *a, **k))
    with torch.no_grad():
        completion_logps(model, *inputs)
    assert rows == [int((inputs[2][:, 1:] != -100).sum())]


def test_a_row_without_labels_scores_zero(loaded):
    model, tokenizer = loaded("gemma2")
    input_ids, attention_mask, labels = padded_batch(tokenizer, "right")
    labels[1] = -100
    with torch.no_grad():
        sums, counts = completion_logps(model, input_ids, attention_mask, labels)
    assert sums[1] == 0 and counts[1] == 0 and (sums[[0, 2]] < 0).all()
    labels[:] = -100  # no labelled token at all: an empty selection still works
    sums, counts = completion_logps(model, input_ids, attention_mask, labels)
    assert torch.equal(sums, torch.zeros(3)) and torch.equal(counts, torch.zeros(3, dtype=counts.dtype))


@pytest.mark.parametrize("arch, chunk_rows", [("gemma2", None), ("gemma2", 7), ("granite", None), ("phi", None)])
def test_gradients_match_the_models_own_forward(tiny_checkpoint, monkeypatch, arch, chunk_rows):
    """Soft-cap (materialised logits, in one piece or in checkpointed chunks of ``chunk_rows``), a folded scale and a
    head bias (fused kernel): same parameter gradients.

    The tolerance is relative to each gradient's largest entry (they reach a few hundred): float32 round-off of the
    two summation orders. (float64 would be tighter, but Gemma-2's eager attention gives NaN gradients in float64.)
    """
    model, tokenizer = load(tiny_checkpoint(arch))
    inputs = padded_batch(tokenizer, "left")
    weights = torch.tensor([1.0, -0.5, 2.0])  # any upstream gradient, different per row
    calls = []
    if chunk_rows:
        monkeypatch.setattr(lp, "MATERIALISED_CHUNK_ELEMENTS", chunk_rows * model.config.vocab_size)
        real = lp.logprobs_from_logits
        monkeypatch.setattr(lp, "logprobs_from_logits", lambda x, *a, **k: calls.append(len(x)) or real(x, *a, **k))

    def grads(logps):
        model.zero_grad()
        (logps * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = grads(completion_logps(model, *inputs, temperature=0.7)[0])
    theirs = grads(forward_token_logps(model, *inputs, 0.7).sum(-1))
    assert ours.keys() == theirs.keys() and len(ours) > 10
    if chunk_rows:  # several chunks, each scored forward and again (recomputed) in backward
        n = int((inputs[2][:, 1:] != -100).sum())
        assert max(calls) == chunk_rows and sum(calls) == 2 * n
    for name, expected in theirs.items():
        scale = float(expected.abs().max())
        assert scale > 0 and torch.isfinite(ours[name]).all(), name
        torch.testing.assert_close(ours[name], expected, atol=1e-5 * scale, rtol=0,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_probe_check_passes_and_restores_the_mode(loaded, arch):
    model, _ = loaded(arch)
    model.train()
    try:
        assert check_logprobs_match_forward(model) < 1e-4
        assert check_logprobs_match_forward(model, temperature=0.7) < 1e-4
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert check_logprobs_match_forward(model) < 1e-4 and not model.training


def test_the_probe_tolerance_follows_the_precision(monkeypatch):
    assert probe_tolerance(torch.float32, 30.0) < 2e-4
    assert 0.5 < probe_tolerance(torch.bfloat16, 30.0) < 1.5  # rounding of logits of 30 in bfloat16
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert 0.05 < probe_tolerance(torch.float32, 30.0) < 0.2  # TF32 products


@pytest.mark.parametrize("transform", ["scale", "offset"])
def test_the_probe_check_refuses_an_unknown_transform_in_forward(tiny_checkpoint, transform):
    model, _ = load(tiny_checkpoint("llama"))
    forward = model.forward
    offset = torch.linspace(-1, 1, model.config.vocab_size)

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 1.7 if transform == "scale" else out.logits + offset
        return out

    model.forward = patched
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(model_type='llama'\).*disagrees.*by up to"):
        check_logprobs_match_forward(model)


@pytest.mark.parametrize("arch, attribute, value", [("llama", "final_logit_softcapping", 5.0),
                                                    ("qwen2", "logits_scaling", 2.0),
                                                    ("gemma2", "logit_scale", 0.5)])
def test_unhandled_logit_config_attributes_are_refused(tiny_checkpoint, arch, attribute, value):
    model, tokenizer = load(tiny_checkpoint(arch))
    setattr(model.config, attribute, value)
    for call in (lambda: check_logprobs_match_forward(model),
                 lambda: completion_logps(model, *padded_batch(tokenizer, "right"))):
        with pytest.raises(ValueError, match=rf"{type(model).__name__} .*config\.{attribute}={value}"):
            call()


def test_a_changed_cap_is_followed(tiny_checkpoint):
    """The transform is read from the config at every call, as forward reads it."""
    model, tokenizer = load(tiny_checkpoint("gemma2"))
    model.config.final_logit_softcapping = 5.0
    inputs = padded_batch(tokenizer, "right")
    with torch.no_grad():
        torch.testing.assert_close(completion_token_logps(model, *inputs)[0],
                                   forward_token_logps(model, *inputs, 1.0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch, target_modules", [("gemma2", ["q_proj", "v_proj"]), ("qwen2", ["q_proj", "lm_head"]),
                                                 ("cohere", ["v_proj", "lm_head"])])
def test_peft_wrapped_models(tiny_checkpoint, arch, target_modules):
    """LoRA on the decoder, and on the (untied) LM head itself: then the head is called, not read as a weight."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load(tiny_checkpoint(arch))
    # init_lora_weights=False: non-zero adapters, so an ignored LoRA head would show in the numbers.
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=target_modules, init_lora_weights=False))
    assert check_logprobs_match_forward(peft_model) < 1e-4
    inputs = padded_batch(tokenizer, "left")
    with torch.no_grad():
        torch.testing.assert_close(completion_token_logps(peft_model, *inputs)[0],
                                   forward_token_logps(peft_model, *inputs, 1.0), atol=1e-4, rtol=0)
