"""bf16 under CPU autocast (what ``trainer.precision=bf16-mixed`` runs): no NaN or inf in any value or gradient.

- Every registered loss (``rlmf.losses.LOSSES``) on the edge-case grid of test_losses_gradcheck_edges.py (batch of
  1, lengths of 1, empty completions, extreme beta, summed log-probs of -1e4, mean log-probs at and near 0 and below
  -50, chosen equal to rejected), with float32 inputs (what the log-prob kernels hand the losses under autocast) and
  with bfloat16 inputs; plus the discriminator's reward losses on bf16 rewards.
- The log-prob kernels (``logprobs_from_hidden``, ``logprobs_from_logits``), backends torch and triton (the Triton
  interpreter on CPU), on a small version of tests/kernels' cases, with bf16 hidden/weight/bias/logits, and with
  float32 hidden/weight under the same autocast.

The forward runs inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` and the backward after it, as Lightning does.
Accuracy is tests/kernels' and test_losses_gradcheck_edges.py's business; here only finiteness (and dtypes) count.
"""

from __future__ import annotations

import pytest
import torch
from test_losses_gradcheck_edges import ALL_LOSSES, PAIRED, scale_hyperparameters

from rlmf.kernels import logprobs_from_hidden, logprobs_from_logits
from rlmf.losses import get_loss, loss_inputs
from rlmf.losses.reward import bradley_terry_loss, thumbs_loss

BF16 = torch.bfloat16
NOT_DIFFERENTIABLE = {"policy_kl_logps", "reference_kl_logps"}  # KTO's detached reference point


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def _set_mean_logps(per_token):
    def tweak(inputs):
        for key, value in inputs.items():
            if key.endswith("_logps"):
                inputs[key] = torch.full_like(value, -per_token)
    return tweak


def _empty_completion(inputs):
    for lengths_key, logps_key in (("lengths", "policy_logps"), ("chosen_lengths", "policy_chosen_logps"),
                                   ("rejected_lengths", "policy_rejected_logps")):
        if lengths_key in inputs:
            inputs[lengths_key][0] = 0
            inputs[logps_key][0] = 0.0


def _equal_pair(inputs):
    inputs["policy_rejected_logps"] = inputs["policy_chosen_logps"].clone()
    for a, b in (("reference_rejected_logps", "reference_chosen_logps"), ("rejected_lengths", "chosen_lengths")):
        if a in inputs:
            inputs[a] = inputs[b].clone()


def edge_cases(name):
    """``(id, make_inputs kwargs, hyperparameter scale, tweak)``: the grid of test_losses_gradcheck_edges.py."""
    cases = [
        ("default", {}, 1.0, None),
        ("batch_of_one", {"batch_size": 1}, 1.0, None),
        ("lengths_of_one", {"max_length": 1}, 1.0, None),
        ("beta_small", {}, 1e-3, None),
        ("beta_large", {}, 1e3, None),
        ("huge_logps_beta_small", {"per_token_scale": 1500.0, "max_length": 8}, 1e-3, None),
        ("huge_logps_beta_large", {"per_token_scale": 1500.0, "max_length": 8}, 1e3, None),
        ("mean_logps_zero", {}, 1.0, _set_mean_logps(0.0)),
        ("mean_logps_1e-12", {}, 1.0, _set_mean_logps(1e-12)),
        ("mean_logps_1e-6", {}, 1.0, _set_mean_logps(1e-6)),
        ("mean_logps_below_-50", {"per_token_scale": 60.0}, 1.0, None),
    ]
    if any(i.endswith("lengths") for i in loss_inputs(name)):
        cases.append(("empty_completion", {}, 1.0, _empty_completion))
    if name in PAIRED or name == "hypo":
        cases.append(("chosen_equals_rejected", {}, 1.0, _equal_pair))
    return cases


def check_finite(what, loss, metrics, inputs):
    assert torch.isfinite(loss).all(), f"{what}: loss {loss}"
    for metric, value in metrics.items():
        assert torch.isfinite(value).all(), f"{what}: metric {metric} = {value}"
    keys = [k for k, v in inputs.items() if v.requires_grad]
    grads = torch.autograd.grad(loss, [inputs[k] for k in keys], allow_unused=True)
    for key, grad in zip(keys, grads):
        if grad is not None:
            assert torch.isfinite(grad).all(), f"{what}: d loss / d {key} = {grad}"
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["float32_inputs", "bf16_inputs"])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_every_loss_is_finite_under_bf16_autocast(name, dtype, make_inputs):
    checked = 0
    for case, kwargs, scale, tweak in edge_cases(name):
        # Built in float64 (the edge values exactly as in the float64 tests), then rounded to the dtype under test.
        inputs = make_inputs(name, **kwargs)
        if tweak is not None:
            tweak(inputs)
        inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        inputs = {k: v.detach().requires_grad_(v.is_floating_point() and k not in NOT_DIFFERENTIABLE)
                  for k, v in inputs.items()}
        with autocast():
            result = get_loss(name)(**inputs, **scale_hyperparameters(name, scale))
        assert result.loss.dim() == 0
        check_finite(f"{name} [{case}, {dtype}]", result.loss, result.metrics, inputs)
        checked += 1
    assert checked >= 11


@pytest.mark.parametrize("margin", [0.0, 2.0])
def test_reward_losses_are_finite_on_bf16_rewards(margin):
    """The discriminator's scalar head gives bf16 rewards under autocast: ties, huge gaps, a batch of one."""
    for chosen, rejected in (([1.5, -0.3, 2.0], [0.5, 0.7, 2.0]), ([300.0, -300.0], [-300.0, 300.0]), ([0.0], [0.0])):
        chosen = torch.tensor(chosen, dtype=BF16, requires_grad=True)
        rejected = torch.tensor(rejected, dtype=BF16, requires_grad=True)
        with autocast():
            result = bradley_terry_loss(chosen, rejected, margin=margin)
        check_finite("bradley_terry", result.loss, result.metrics, {"chosen": chosen, "rejected": rejected})
    rewards = torch.tensor([300.0, -300.0, 0.0, 1e-3], dtype=BF16, requires_grad=True)
    with autocast():
        result = thumbs_loss(rewards, torch.tensor([False, True, True, False]))
    check_finite("thumbs", result.loss, result.metrics, {"rewards": rewards})


# ------------------------------------------------------------------------------------------------ the kernels

BACKENDS = ("torch", "triton")
DEVICE = {"torch": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}

# name: (N, H, V, logit scale, temperature, bias, ignored rows): small versions of tests/kernels' cases.
HIDDEN_CASES = {
    "vocab_1": (3, 16, 1, 1.0, 1.0, False, "some"),
    "odd_shapes_bias": (19, 20, 45, 2.0, 1.3, True, "some"),
    "large_logits": (9, 24, 37, 1e3, 1.0, True, "some"),  # bf16 logits of ~1e3: inaccurate, but finite
    "peaked": (8, 16, 40, 60.0, 0.5, False, "none"),  # softmax p = 1 up to bf16 rounding: log p and entropy at 0
    "all_ignored": (6, 16, 29, 1.0, 1.0, True, "all"),
}
# name: (N, V, logit scale, temperature, ignored rows, -inf entries)
LOGITS_CASES = {
    "vocab_1": (5, 1, 1.0, 1.0, "some", False),
    "temperature": (6, 50, 2.0, 0.6, "none", False),
    "large_logits": (4, 40, 1e3, 1.0, "some", False),
    "all_ignored": (5, 20, 1.0, 1.0, "all", False),
    "minus_inf_logits": (5, 24, 2.0, 1.0, "some", True),
}


def _labels(n, v, ignored, generator):
    labels = torch.randint(0, v, (n,), generator=generator)
    if ignored == "some":
        labels[::3] = -100
    elif ignored == "all":
        labels[:] = -100
    return labels


def _hidden_inputs(case, dtype, device):
    n, h, v, scale, temperature, has_bias, ignored = HIDDEN_CASES[case]
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    offset, spread = (scale, 4.0) if scale > 100 else (0.0, scale)  # as tests/kernels: big logits as a bias offset
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * spread / h ** 0.5
    bias = offset + torch.randn(v, generator=g) * spread if has_bias else None
    tensors = [t.to(dtype).to(device).requires_grad_() for t in (hidden, weight, bias) if t is not None]
    return tensors, _labels(n, v, ignored, g).to(device), temperature


def _check_kernel_outputs(what, logp, entropy, tensors, generator):
    assert logp.dtype == entropy.dtype == torch.float32, f"{what}: {logp.dtype}, {entropy.dtype}"
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all(), f"{what}: {logp} {entropy}"
    assert (logp <= 0).all() and (entropy >= -1e-3).all(), what
    up = [torch.randn(logp.shape, generator=generator).to(logp.device) for _ in range(2)]
    grads = torch.autograd.grad((logp * up[0]).sum() + (entropy * up[1]).sum(), tensors)
    for grad, tensor in zip(grads, tensors):
        assert grad.dtype == tensor.dtype and torch.isfinite(grad).all(), f"{what}: gradient {grad}"


# Autocast does not reach into the Triton kernels: float32 weights there are the plain float32 test of tests/kernels.
HIDDEN_GRID = [("torch", BF16), ("torch", torch.float32), ("triton", BF16)]


@pytest.mark.parametrize("backend, dtype", HIDDEN_GRID, ids=[f"{b}-{str(d)[6:]}_weights" for b, d in HIDDEN_GRID])
def test_logprobs_from_hidden_is_finite_under_bf16_autocast(backend, dtype):
    for case in HIDDEN_CASES:
        tensors, labels, temperature = _hidden_inputs(case, dtype, DEVICE[backend])
        bias = tensors[2] if len(tensors) == 3 else None
        with autocast():
            logp, entropy = logprobs_from_hidden(tensors[0], tensors[1], labels, bias, temperature=temperature,
                                                 return_entropy=True, backend=backend, chunk_size=(8, 16))
        _check_kernel_outputs(f"{backend} {case} {dtype}", logp, entropy, tensors, torch.Generator().manual_seed(1))
        if HIDDEN_CASES[case][6] == "all":
            assert (logp == 0).all() and (entropy == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_logits_is_finite_on_bf16_logits(backend):
    for case, (n, v, scale, temperature, ignored, minus_inf) in LOGITS_CASES.items():
        g = torch.Generator().manual_seed(sum(map(ord, case)))
        labels = _labels(n, v, ignored, g)
        logits = torch.randn(n, v, generator=g) * scale
        if minus_inf:  # a vocabulary mask, never on the label
            mask = torch.rand(n, v, generator=g) < 0.3
            mask[torch.arange(n), labels.clamp_min(0)] = False
            logits = logits.masked_fill(mask, float("-inf"))
        logits = logits.to(BF16).to(DEVICE[backend]).requires_grad_()
        with autocast():
            logp, entropy = logprobs_from_logits(logits, labels.to(logits.device), temperature=temperature,
                                                 return_entropy=True, backend=backend)
        _check_kernel_outputs(f"{backend} {case}", logp, entropy, [logits], g)


def test_hidden_states_of_a_bf16_autocast_forward_feed_the_kernel():
    """The generator's path: a float32 model's head applied under autocast gives bf16 logits; the kernels take the
    autocast's bf16 hidden with a bf16 copy of the head, and the two agree to bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    proj, head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 40, bias=False)
    x, labels = torch.randn(10, 16, generator=g), _labels(10, 40, "some", g)
    with autocast():
        hidden = proj(x)
        logits = head(hidden)
    assert hidden.dtype == logits.dtype == BF16
    weight = head.weight.detach().to(BF16).requires_grad_()
    hidden = hidden.detach().requires_grad_()
    with autocast():
        fused = logprobs_from_hidden(hidden, weight, labels, backend="torch")
        plain = logprobs_from_logits(logits.detach(), labels, backend="torch")
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, plain, atol=2**-6 * max(1.0, logits.abs().max().item()), rtol=0)
    grads = torch.autograd.grad(fused.sum(), [hidden, weight])
    assert all(torch.isfinite(grad).all() for grad in grads)
