"""Every registered loss: float64 ``gradcheck``, and finite values and gradients at the edges.

Edges: a batch of 1, completion lengths of 1, chosen equal to rejected, beta (or ORPO's lambda) very large and
very small, summed log-probs of -1e4, mean token log-probs near and at 0 and below -50 (ORPO's ``log1mexp``), and
float32 inputs. "Finite" means no NaN or inf in the loss, any metric or any gradient. Where the value at an edge is
known in closed form (chosen equal to rejected) it is checked too.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

from rlmf.losses import LOSSES, get_loss, loss_hyperparameters, loss_inputs
from rlmf.losses.orpo import log1mexp

ALL_LOSSES = sorted(LOSSES)
# Inputs whose gradient is deliberately not the derivative of the loss value, so finite differences cannot check
# them: KTO's reference point z is detached (a constant by design), and HyPO's online term uses a score-function
# surrogate (its gradient is checked in expectation in test_hypo_estimator.py).
NOT_FINITE_DIFFERENTIABLE = {"policy_kl_logps", "reference_kl_logps", "policy_online_logps", "reference_online_logps"}
# Losses with a detached statistic computed from the checked inputs themselves (BCO's reward shift delta, the
# batch's mean reward; WPO's pair weights, the policy's own probabilities; the default mixture, which holds BCO):
# finite differences move it, the gradient holds it fixed by design. Their gradients with the statistic held fixed
# are checked against the paper's formula (test_dpo_variants.py, test_dpo_tokens.py) and TRL
# (test_losses_against_trl.py::test_bco_pair_matches_trl_with_the_reference_moved_by_the_shift,
# test_dpo_tokens_against_trl.py).
DETACHED_BATCH_STATISTIC = {"bco_pair", "wpo", "mixture"}
# CISPO holds each token's importance weight constant by design (a stop-gradient on min(r, eps_max)); its gradient
# -w A / N is checked against the paper's formula and TRL in test_policy_gradient_variants.py.
STOP_GRADIENT_WEIGHT = {"cispo"}
GRADCHECKED = [name for name in ALL_LOSSES if name not in DETACHED_BATCH_STATISTIC | STOP_GRADIENT_WEIGHT]


def differentiable(name, inputs):
    return [k for k, v in inputs.items() if v.is_floating_point() and k not in NOT_FINITE_DIFFERENTIABLE]


def call(name, inputs, **hyperparameters):
    return get_loss(name)(**inputs, **hyperparameters)


def assert_all_finite(name, inputs, **hyperparameters):
    """Run the loss, backpropagate into every floating input, and check loss, metrics and gradients are finite."""
    inputs = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    result = call(name, inputs, **hyperparameters)
    assert result.loss.dim() == 0
    assert torch.isfinite(result.loss), f"{name}: loss {result.loss}"
    for metric, value in result.metrics.items():
        assert torch.isfinite(value), f"{name}: metric {metric} = {value}"
    keys = [k for k, v in inputs.items() if v.requires_grad]
    grads = torch.autograd.grad(result.loss, [inputs[k] for k in keys], allow_unused=True)
    for key, grad in zip(keys, grads):
        if grad is not None:
            assert torch.isfinite(grad).all(), f"{name}: d loss / d {key} = {grad}"
    return result


def scale_hyperparameters(name, factor):
    """The loss's defaults with its scale parameter (beta, or ORPO's lambda) multiplied by ``factor``."""
    hyperparameters = loss_hyperparameters(name)
    for key in ("beta", "odds_ratio_weight"):
        if key in hyperparameters:
            hyperparameters[key] *= factor
    return hyperparameters


@pytest.mark.parametrize("name", GRADCHECKED)
def test_gradcheck(name, make_inputs):
    inputs = make_inputs(name, batch_size=3, seed=1)
    keys = differentiable(name, inputs)
    assert any(k.startswith("policy_") for k in keys)

    def loss_of(*tensors):
        return call(name, {**inputs, **dict(zip(keys, tensors))}).loss

    tensors = tuple(inputs[k].detach().requires_grad_() for k in keys)
    assert torch.autograd.gradcheck(loss_of, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", GRADCHECKED)
def test_gradcheck_at_non_default_hyperparameters(name, make_inputs):
    inputs = make_inputs(name, batch_size=3, seed=2)
    keys = differentiable(name, inputs)
    hyperparameters = scale_hyperparameters(name, 3.0)

    def loss_of(*tensors):
        return call(name, {**inputs, **dict(zip(keys, tensors))}, **hyperparameters).loss

    tensors = tuple(inputs[k].detach().requires_grad_() for k in keys)
    assert torch.autograd.gradcheck(loss_of, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_batch_of_one(name, make_inputs):
    assert_all_finite(name, make_inputs(name, batch_size=1))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_lengths_of_one(name, make_inputs):
    assert_all_finite(name, make_inputs(name, max_length=1))


@pytest.mark.parametrize("name", [n for n in ALL_LOSSES if any(i.endswith("lengths") for i in loss_inputs(n))])
def test_empty_completion_counts_as_length_one(name, make_inputs):
    """A zero-length completion has summed log-prob 0; its mean is taken as 0, not 0 / 0."""
    summed_for = {
        "lengths": "policy_logps",
        "chosen_lengths": "policy_chosen_logps",
        "rejected_lengths": "policy_rejected_logps",
    }
    inputs = make_inputs(name)
    for lengths_key, logps_key in summed_for.items():
        if lengths_key in inputs:
            inputs[lengths_key][0] = 0
            inputs[logps_key][0] = 0.0
    assert_all_finite(name, inputs)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("factor", [1e-3, 1e3], ids=["scale_small", "scale_large"])
def test_extreme_beta(name, factor, make_inputs):
    assert_all_finite(name, make_inputs(name), **scale_hyperparameters(name, factor))


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("factor", [1e-3, 1e3], ids=["scale_small", "scale_large"])
def test_extreme_beta_with_huge_log_probs(name, factor, make_inputs):
    """Summed log-probs around -1e4 and log-ratios of hundreds of nats, times a beta of up to 100."""
    inputs = make_inputs(name, per_token_scale=1500.0, max_length=8)
    assert_all_finite(name, inputs, **scale_hyperparameters(name, factor))


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("per_token", [0.0, 1e-12, 1e-6], ids=["zero", "1e-12", "1e-6"])
def test_mean_log_probs_near_zero(name, per_token, make_inputs):
    """A completion the model is (nearly) certain of: ORPO's log(1 - exp(l)) is -inf at l = 0 without care."""
    inputs = make_inputs(name)
    for key, value in inputs.items():
        if key.endswith("_logps"):
            inputs[key] = torch.full_like(value, -per_token)
    assert_all_finite(name, inputs)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_mean_log_probs_below_minus_50(name, make_inputs):
    inputs = make_inputs(name, per_token_scale=60.0)
    assert_all_finite(name, inputs)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_float32_inputs(name, make_inputs):
    result = assert_all_finite(name, make_inputs(name, dtype=torch.float32))
    assert result.loss.dtype == torch.float32


# Closed-form values when chosen == rejected (same log-probs, same reference, same length L), at the defaults.
def _equal_pair_value(name, hp, policy, reference, length, log_sum_sq=None):
    rho = policy - reference
    if name == "mixture":  # its parts' values, weighted
        return sum(spec["weight"] * _equal_pair_value(part, {k: v for k, v in spec.items() if k != "weight"},
                                                      policy, reference, length)
                   for part, spec in hp["parts"].items())
    if name == "sft_chosen":
        return -(policy.sum() / length.sum()).item()
    if name == "wpo":  # equal sides: the pair's weight is w(y)^2
        weight = torch.exp((policy - log_sum_sq) / length)
        return (weight**2 * math.log(2.0)).mean().item()
    if name in ("dpo", "cdpo", "robust"):
        return math.log(2.0)
    if name == "hinge":
        return 1.0
    if name == "ipo":
        return (1 / (2 * hp["beta"])) ** 2
    if name == "apo_zero":
        return 1.0
    if name == "apo_down":
        return torch.sigmoid(hp["beta"] * rho).mean().item() + 0.5
    if name == "simpo":
        return F.softplus(torch.tensor(hp["gamma"], dtype=torch.float64)).item()
    if name == "cpo":
        return math.log(2.0) - hp["nll_weight"] * (policy.sum() / length.sum()).item()
    if name == "orpo":
        return -(policy.sum() / length.sum()).item() + hp["odds_ratio_weight"] * math.log(2.0)
    if name in ("aot", "aot_unpaired", "f_dpo"):  # equal margins (and equal log-ratio distributions): d = 0
        return math.log(2.0)
    if name == "nca_pair":
        r = hp["beta"] * rho
        return (F.softplus(-r) + F.softplus(r)).mean().item()
    if name == "bco_pair":
        r = hp["beta"] * rho
        return (F.softplus(-(r - r.mean())) + F.softplus(r - r.mean())).mean().item()
    if name == "exo_pair":
        eps = hp["label_smoothing"]
        return math.log(0.5) - 0.5 * math.log(eps * (1 - eps))
    if name == "sppo_hard":
        return (2 * rho**2 + 1 / (2 * hp["beta"] ** 2)).mean().item()
    if name == "discopop":
        return 0.5 * math.log(2.0) + 0.5
    raise KeyError(name)


PAIRED = [n for n in ALL_LOSSES if "policy_rejected_logps" in loss_inputs(n) and n != "hypo"]


@pytest.mark.parametrize("name", PAIRED)
def test_equal_chosen_and_rejected(name, make_inputs):
    inputs = make_inputs(name)
    inputs["policy_rejected_logps"] = inputs["policy_chosen_logps"].clone()
    if "reference_rejected_logps" in inputs:
        inputs["reference_rejected_logps"] = inputs["reference_chosen_logps"].clone()
    if "rejected_lengths" in inputs:
        inputs["rejected_lengths"] = inputs["chosen_lengths"].clone()
    if "policy_rejected_log_sum_sq_probs" in inputs:
        inputs["policy_rejected_log_sum_sq_probs"] = inputs["policy_chosen_log_sum_sq_probs"].clone()
    # IPO's per-token value depends on lengths only through rho / L, which cancels when both sides match.
    result = assert_all_finite(name, inputs)
    expected = _equal_pair_value(
        name,
        loss_hyperparameters(name),
        inputs["policy_chosen_logps"],
        inputs.get("reference_chosen_logps", torch.zeros_like(inputs["policy_chosen_logps"])),
        inputs.get("chosen_lengths", torch.ones_like(inputs["policy_chosen_logps"])).double(),
        inputs.get("policy_chosen_log_sum_sq_probs"),
    )
    torch.testing.assert_close(result.loss.item(), expected, atol=1e-12, rtol=1e-12)
    prefix = "dpo/" if name == "mixture" else ""  # a mixture logs each part's metrics under the part's name
    assert result.metrics[prefix + "rewards/margins"] == 0
    assert result.metrics[prefix + "rewards/accuracies"] == 0


def test_hypo_equal_pairs_and_on_policy_samples_is_dpo_at_log_2(make_inputs):
    inputs = make_inputs("hypo")
    inputs["policy_rejected_logps"] = inputs["policy_chosen_logps"].clone()
    inputs["reference_rejected_logps"] = inputs["reference_chosen_logps"].clone()
    inputs["reference_online_logps"] = inputs["policy_online_logps"].clone()
    result = assert_all_finite("hypo", inputs)
    torch.testing.assert_close(result.loss.item(), math.log(2.0), atol=1e-12, rtol=0)
    assert result.metrics["kl"] == 0


# ------------------------------------------------------------------------------------------------ log1mexp


@pytest.mark.parametrize("x", [-1e-300, -1e-15, -1e-10, -1e-5, -0.5, -0.6931, -0.6932, -1.0, -10.0, -50.0, -700.0])
def test_log1mexp_matches_a_50_digit_reference(x):
    """Relative error at float64 rounding level on both sides of the branch point -log 2 and at both ends."""
    eps = torch.finfo(torch.float64).eps
    # Within float64 eps of certainty the input is clamped to -eps (that keeps the log odds finite).
    clamped = min(x, -eps)
    with mpmath.workdps(50):
        expected = float(mpmath.log1p(-mpmath.exp(mpmath.mpf(clamped))))
    got = log1mexp(torch.tensor(x, dtype=torch.float64)).item()
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-14, abs=0)


def test_log1mexp_is_finite_with_finite_gradient_across_dtypes():
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.tensor([0.0, -1e-30, -1e-8, -0.69, -0.7, -50.0, -1e4], dtype=dtype, requires_grad=True)
        y = log1mexp(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(y).all() and torch.isfinite(grad).all(), dtype


def test_orpo_log_odds_at_certainty_and_far_below():
    """At l -> 0 the chosen odds explode (the odds-ratio term vanishes and the loss is the NLL); below -50,
    log(1 - exp(l)) is ~0 so the log odds ratio is l_c - l_r."""
    orpo = get_loss("orpo")
    ones = torch.ones(2, dtype=torch.long)
    certain = orpo(
        policy_chosen_logps=torch.zeros(2, dtype=torch.float64),
        policy_rejected_logps=torch.full((2,), -3.0, dtype=torch.float64),
        chosen_lengths=ones,
        rejected_lengths=ones,
    )
    assert certain.metrics["log_odds_ratio"] > 30
    torch.testing.assert_close(certain.loss.item(), 0.0, atol=1e-12, rtol=0)  # NLL of a certain completion is 0

    far = orpo(
        policy_chosen_logps=torch.tensor([-60.0, -80.0], dtype=torch.float64),
        policy_rejected_logps=torch.tensor([-70.0, -55.0], dtype=torch.float64),
        chosen_lengths=ones,
        rejected_lengths=ones,
    )
    torch.testing.assert_close(far.metrics["log_odds_ratio"].item(), ((10.0) + (-25.0)) / 2, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------- errors


def test_mismatched_batch_sizes_name_the_loss_and_inputs(make_inputs):
    inputs = make_inputs("dpo")
    inputs["policy_rejected_logps"] = inputs["policy_rejected_logps"][:2]
    with pytest.raises(ValueError, match=r"dpo: inputs disagree on the batch size.*policy_rejected_logps"):
        call("dpo", inputs)


def test_wrong_rank_names_the_input(make_inputs):
    inputs = make_inputs("simpo")
    inputs["chosen_lengths"] = inputs["chosen_lengths"][:, None]
    with pytest.raises(ValueError, match=r"simpo: chosen_lengths must have shape \[B\]"):
        call("simpo", inputs)


@pytest.mark.parametrize("name,bad", [("robust", 0.5), ("robust", -0.1), ("cdpo", 0.6)])
def test_label_smoothing_out_of_range(name, bad, make_inputs):
    with pytest.raises(ValueError, match=rf"{name}: label_smoothing={bad} must lie in"):
        call(name, make_inputs(name), label_smoothing=bad)


def test_ipo_needs_positive_beta(make_inputs):
    with pytest.raises(ValueError, match="ipo: beta=0"):
        call("ipo", make_inputs("ipo"), beta=0)


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
def test_desirable_must_be_bool(name, make_inputs):
    inputs = make_inputs(name)
    inputs["desirable"] = inputs["desirable"].long()
    with pytest.raises(ValueError, match=f"{name}: desirable must be a bool tensor"):
        call(name, inputs)


def test_hypo_rejects_one_sample_and_mismatched_prompts(make_inputs):
    with pytest.raises(ValueError, match="k >= 2"):
        call("hypo", make_inputs("hypo", online_samples=1))
    inputs = make_inputs("hypo")
    inputs["policy_online_logps"] = inputs["policy_online_logps"][:2]
    inputs["reference_online_logps"] = inputs["reference_online_logps"][:2]
    with pytest.raises(ValueError, match="online samples are for 2 prompts but there are 4 pairs"):
        call("hypo", inputs)
