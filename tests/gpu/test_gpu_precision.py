"""rlmf.logprobs and rlmf.generation on CUDA, for every tiny architecture of tests/checkpoints.py.

The comparison is the CPU suite's (tests/test_logprobs_architectures.py): our completion log-probs against
``log_softmax(model(...).logits / T)`` gathered at the shifted labels, right- and left-padded rows. On CUDA the plain
heads go through the compiled Triton kernel (``backend="auto"``), the soft-capped ones through the materialised
logits.

Tolerances, per token (``s = max(1, max |logits / T|)`` of the float32 forward):

- float32 weights and compute (TF32 off, tests/gpu/conftest.py): atol 1e-4, as on CPU; gradients 1e-4 of each
  parameter's largest gradient entry (float32 round-off of two summation orders, plus CUDA's atomics).
- ``torch.autocast("cuda", bfloat16)``: against the forward under the same autocast (the decoder's bf16 rounding is
  then shared; what differs is that forward rounds its logits to bf16, <= 2**-8 * s on the label logit and the
  log-sum-exp together; CPU autocast measured up to 0.0033 * s on these models): atol 2**-6 * s. Against the
  float32 forward (bf16 matmuls all through the decoder; CPU autocast measured up to 0.023 * s, Granite): atol
  0.08 * s. A missed logit scale or soft-cap is off by a sizeable fraction of s, far more.
- bfloat16 weights: ``check_logprobs_match_forward`` with its own tolerance for them
  (``rlmf.logprobs_check.probe_tolerance``).
"""

from __future__ import annotations

import math

import pytest
import torch
from checkpoints import ARCHITECTURES, padded_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlmf.logprobs import completion_logps, completion_token_logps
from rlmf.logprobs_check import check_logprobs_match_forward

PROMPTS = ["Dear Ms. Alvarez,", "Please find attached", "We would love to schedule a short call",
           "Numbers like 12 and 345"]


def load(directory, device):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(directory).float().eval().to(device)
    return model, AutoTokenizer.from_pretrained(directory)


def forward_logits(model, input_ids, attention_mask):
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]


def forward_token_logps(model, input_ids, attention_mask, labels, temperature):
    """The reference: ``log_softmax(model(...).logits / T)`` at the shifted labels, 0 elsewhere, [B, L-1]."""
    logits = forward_logits(model, input_ids, attention_mask).float()
    targets = labels[:, 1:]
    picked = torch.log_softmax(logits / temperature, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return torch.where(targets != -100, picked, torch.zeros_like(picked))  # no 0 * (whatever a pad row holds)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_float32_logps_match_the_models_own_forward_on_cuda(tiny_checkpoint, device, arch):
    model, tokenizer = load(tiny_checkpoint(arch), device)
    assert next(model.parameters()).device.type == "cuda"
    sums_by_side = {}
    for temperature in (1.0, 0.7):
        for side in ("right", "left"):
            inputs = padded_batch(tokenizer, side, device)
            with torch.no_grad():
                expected = forward_token_logps(model, *inputs, temperature)
                tokens, mask = completion_token_logps(model, *inputs, temperature=temperature)
                sums, counts = completion_logps(model, *inputs, temperature=temperature)
            assert tokens.device.type == "cuda" and tokens.dtype == torch.float32
            assert torch.equal(mask, inputs[2][:, 1:] != -100) and torch.equal(counts, mask.sum(-1))
            torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=0)
            torch.testing.assert_close(sums, expected.sum(-1), atol=1e-4, rtol=1e-5)
            assert (sums < 0).all()
            sums_by_side[side] = sums
        # Positions follow the mask: left and right padding score the same.
        torch.testing.assert_close(sums_by_side["left"], sums_by_side["right"], atol=1e-4, rtol=1e-5)
    # The probe run at load time, here on the GPU.
    assert check_logprobs_match_forward(model) < 1e-4
    assert check_logprobs_match_forward(model, temperature=0.7) < 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_autocast_logps_stay_within_bf16_tolerance(tiny_checkpoint, device, arch):
    model, tokenizer = load(tiny_checkpoint(arch), device)
    for side in ("right", "left"):
        inputs = padded_batch(tokenizer, side, device)
        mask = inputs[2][:, 1:] != -100
        with torch.no_grad():
            reference = forward_token_logps(model, *inputs, 1.0)
            s = max(1.0, float(forward_logits(model, *inputs[:2]).abs().max()))
            exact, _ = completion_token_logps(model, *inputs)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ours, ours_mask = completion_token_logps(model, *inputs)
                sums, _ = completion_logps(model, *inputs)
                theirs = forward_token_logps(model, *inputs, 1.0)
        assert torch.equal(ours_mask, mask)
        assert torch.isfinite(ours).all() and torch.isfinite(sums).all() and (sums < 0).all()
        assert ours.dtype == torch.float32
        assert not torch.equal(ours, exact), "autocast changed nothing: the bf16 path was not exercised"
        torch.testing.assert_close(ours, theirs, atol=2**-6 * s, rtol=0,
                                   msg=lambda m: f"vs forward under the same autocast (s={s:.1f}): {m}")
        torch.testing.assert_close(ours, reference, atol=0.08 * s, rtol=0,
                                   msg=lambda m: f"vs float32 forward (s={s:.1f}): {m}")
        torch.testing.assert_close(sums, ours.sum(-1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_weights_pass_the_probe_check_on_cuda(tiny_checkpoint, device, arch):
    model, _ = load(tiny_checkpoint(arch), device)
    model.to(torch.bfloat16)
    worst = check_logprobs_match_forward(model)  # raises past its tolerance for bf16 logits of this size
    assert math.isfinite(worst)


@pytest.mark.parametrize("arch", ["gemma2", "granite", "phi"])
def test_float32_gradients_match_the_models_own_forward_on_cuda(tiny_checkpoint, device, arch):
    """Soft-cap (materialised logits), a folded scale and a head bias (Triton kernel backward): same gradients."""
    model, tokenizer = load(tiny_checkpoint(arch), device)
    inputs = padded_batch(tokenizer, "left", device)
    weights = torch.tensor([1.0, -0.5, 2.0], device=device)

    def grads(logps):
        model.zero_grad()
        (logps * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = grads(completion_logps(model, *inputs, temperature=0.7)[0])
    theirs = grads(forward_token_logps(model, *inputs, 0.7).sum(-1))
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name, expected in theirs.items():
        scale = float(expected.abs().max())
        assert scale > 0 and torch.isfinite(ours[name]).all(), name
        torch.testing.assert_close(ours[name], expected, atol=1e-4 * scale, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_generate_on_cuda_returns_strings_and_scoreable_tokens(tiny_checkpoint, device, arch):
    from rlmf.data.collate import FeedbackCollator
    from rlmf.generation import generate
    from rlmf.logprobs import batched_completion_logps
    from rlmf.models import load_generator
    from rlmf.placement import put

    model, tokenizer = load_generator(tiny_checkpoint(arch))
    put(model, device)
    assert next(model.parameters()).device.type == "cuda" and not model.training
    sampled, ids = generate(model, tokenizer, PROMPTS, max_new_tokens=8, do_sample=True, seed=3,
                            num_return_sequences=2, batch_size=3, return_token_ids=True)
    assert isinstance(sampled, list) and len(sampled) == 2 * len(PROMPTS)
    assert all(isinstance(text, str) for text in sampled) and any(text.strip() for text in sampled)
    assert len(ids) == len(sampled) and all(0 < len(c) <= 8 for _, c in ids)
    assert all(isinstance(t, int) and 0 <= t < len(tokenizer) for _, c in ids for t in c)
    again = generate(model, tokenizer, PROMPTS, max_new_tokens=8, do_sample=True, seed=3, num_return_sequences=2,
                     batch_size=3)
    assert again == sampled, "the same seed must draw the same samples on the GPU"

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=8, do_sample=False)
    assert len(greedy) == len(PROMPTS) and all(isinstance(text, str) for text in greedy)

    # The very tokens drawn are scored on the GPU, as the evaluation KL does.
    features = [{"prompt_ids": p, "completion_ids": c, "desirable": True} for p, c in ids]
    logps = batched_completion_logps(model, features, FeedbackCollator(tokenizer.pad_token_id), batch_size=3)
    assert logps.shape == (len(features),) and logps.device.type == "cpu"
    assert torch.isfinite(logps).all() and (logps < 0).all()
