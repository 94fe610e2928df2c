"""The DPO variants of ``rlmf/losses/dpo_variants.py`` against their papers' formulas, written here independently.

Each reference is the paper's general form specialised in the test (NCA's and EXO's K-response objectives at
K = 2, SPPO's square loss at P = 1 and 0, f-DPO's ``f'(u)`` from its table in terms of ``u`` itself, AOT's quantile
functions by counting rather than sorting). Values and gradients with respect to the policy log-probs agree in
float64 to 1e-10. TRL's versions are compared in test_losses_against_trl.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlmf.losses import get_loss

TOLERANCE = dict(atol=1e-10, rtol=1e-10)


def batch(seed: int, batch_size: int = 7, spread: float = 3.0) -> dict:
    """Float64 summed log-probs with log-ratios of both signs; the policy ones are leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    policy_chosen = -20 * torch.rand(batch_size, generator=g, dtype=torch.float64) - 1
    policy_rejected = -20 * torch.rand(batch_size, generator=g, dtype=torch.float64) - 1
    return {
        "policy_chosen_logps": policy_chosen.requires_grad_(),
        "policy_rejected_logps": policy_rejected.requires_grad_(),
        "reference_chosen_logps": policy_chosen.detach() + spread * torch.randn(batch_size, generator=g,
                                                                                dtype=torch.float64),
        "reference_rejected_logps": policy_rejected.detach() + spread * torch.randn(batch_size, generator=g,
                                                                                    dtype=torch.float64),
    }


def log_ratios(b):
    return (b["policy_chosen_logps"] - b["reference_chosen_logps"],
            b["policy_rejected_logps"] - b["reference_rejected_logps"])


def assert_same(name, b, reference_loss, weights=None, **hyperparameters):
    """Our loss equals ``reference_loss`` (computed from ``b``'s leaves) in value and gradient."""
    result = get_loss(name)(**b, weights=weights, **hyperparameters)
    torch.testing.assert_close(result.loss, reference_loss, **TOLERANCE)
    wrt = [b["policy_chosen_logps"], b["policy_rejected_logps"]]
    ours = torch.autograd.grad(result.loss, wrt, retain_graph=True)
    theirs = torch.autograd.grad(reference_loss, wrt, retain_graph=True)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, **TOLERANCE)
    assert any(o.abs().sum() > 0 for o in ours)
    return result


# ------------------------------------------------------------------------------------------------------- NCA


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_nca_pair_is_nca_with_two_responses_and_a_hard_label(seed, beta):
    """NCA: loss = -sum_i [p_i log sigmoid(r_i) + (1 / K) log sigmoid(-r_i)], p the target over the K responses."""
    b = batch(seed)
    rewards = beta * torch.stack(log_ratios(b), dim=1)  # [B, K = 2]
    target = torch.tensor([1.0, 0.0], dtype=torch.float64)  # the chosen response wins
    K = rewards.shape[1]
    per_prompt = -(target * F.logsigmoid(rewards) + F.logsigmoid(-rewards) / K).sum(dim=1)
    assert_same("nca_pair", b, per_prompt.mean(), beta=beta)


# ------------------------------------------------------------------------------------------------------- EXO


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta,eps", [(0.1, 1e-3), (0.5, 0.2), (0.3, 0.5)])
def test_exo_pair_is_the_kl_from_the_policy_softmax_to_the_smoothed_label(seed, beta, eps):
    """EXO: KL(p_f || p_target), p_f = softmax over the pair of beta * log(pi / ref), p_target = [1 - eps, eps]."""
    b = batch(seed)
    p_f = torch.softmax(beta * torch.stack(log_ratios(b), dim=1), dim=1)
    target = torch.tensor([1 - eps, eps], dtype=torch.float64)
    kl = (p_f * (torch.log(p_f) - torch.log(target))).sum(dim=1)
    assert_same("exo_pair", b, kl.mean(), beta=beta, label_smoothing=eps)


def test_exo_pair_is_smallest_at_the_margin_its_label_implies():
    beta, eps = 0.5, 0.1
    margin = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(1, dtype=torch.float64)
    loss = get_loss("exo_pair")(margin, zeros, zeros, zeros, beta=beta, label_smoothing=eps).loss
    (grad,) = torch.autograd.grad(loss, margin)
    assert abs(grad.item()) < 1e-12


# ------------------------------------------------------------------------------------------------------- BCO


class RunningMean:
    """BCO's reward shift as the paper keeps it: the running mean of the batches' mean rewards."""

    def __init__(self):
        self.count, self.mean = 0, 0.0

    def update(self, batch_mean: float) -> float:
        self.count += 1
        self.mean += (batch_mean - self.mean) / self.count
        return self.mean


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 0.6])
def test_bco_pair_is_bco_with_the_running_mean_of_one_batch(seed, beta):
    """BCO: -log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta)), delta the running mean reward (detached); here
    the running mean after this one batch."""
    b = batch(seed)
    b["reference_chosen_logps"] = b["reference_chosen_logps"] - 5.0  # rewards far from 0, so delta matters
    r_c, r_r = (beta * rho for rho in log_ratios(b))
    delta = RunningMean().update(torch.cat([r_c, r_r]).mean().item())
    per_pair = -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))
    result = assert_same("bco_pair", b, per_pair.mean(), beta=beta)
    assert result.metrics["rewards/delta"].item() == pytest.approx(delta, rel=1e-12)
    assert abs(delta) > 0.1


def test_bco_pair_does_not_move_when_every_reward_moves_together():
    """With delta the batch's mean reward, adding c to every implicit reward changes nothing: the classifier sees
    rewards relative to the batch (the point of BCO's shift)."""
    b = batch(3)
    moved = {**b, "reference_chosen_logps": b["reference_chosen_logps"] + 7.0,
             "reference_rejected_logps": b["reference_rejected_logps"] + 7.0}
    loss = get_loss("bco_pair")
    torch.testing.assert_close(loss(**moved).loss, loss(**b).loss, **TOLERANCE)
    assert not torch.allclose(get_loss("nca_pair")(**moved).loss, get_loss("nca_pair")(**b).loss)


# ------------------------------------------------------------------------------------------------------ SPPO


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_sppo_hard_is_sppo_with_win_probabilities_one_and_zero(seed, beta):
    """SPPO: sum over responses y of (log(pi(y) / ref(y)) - eta * (P(y wins) - 1/2))^2, eta = 1 / beta."""
    b = batch(seed)
    eta = 1 / beta
    rho = torch.stack(log_ratios(b), dim=1)
    p_win = torch.tensor([1.0, 0.0], dtype=torch.float64)
    per_pair = ((rho - eta * (p_win - 0.5)) ** 2).sum(dim=1)
    assert_same("sppo_hard", b, per_pair.mean(), beta=beta)


# ------------------------------------------------------------------------------------------------------- AOT


def quantile(values: torch.Tensor, weights: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The q-quantile ``min{x_i : F(x_i) >= q}`` of the weighted sample, by counting (no sort); [Q] for [Q] q."""
    at_or_below = (values[None, :] <= values[:, None]).to(weights.dtype)  # [i, j]: x_j <= x_i
    cdf = (at_or_below * weights[None, :]).sum(dim=1) / weights.sum()  # F(x_i)
    reaches = cdf[None, :] >= q[:, None] - 1e-12  # [Q, B]
    return torch.where(reaches, values[None, :], torch.full_like(values[None, :], math.inf)).min(dim=1).values


def aot_reference(a, b, weights, beta, eps, levels=1680):
    """AOT's loss as an integral over quantile levels q of the smoothed logistic loss on Q_a(q) - Q_b(q), on a grid
    of midpoints that is exact for the weights used: their normalised partial sums are multiples of 1/7 (none),
    1/12 (integers) or 1/24 (fractions), all multiples of 1/1680, so the quantiles are constant between midpoints."""
    weights = torch.ones_like(a) if weights is None else weights
    q = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    d = beta * (quantile(a, weights, q) - quantile(b, weights, q))
    return (-(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)).mean()


WEIGHTS = {
    "none": None,
    "integers": torch.tensor([2.0, 1.0, 0.0, 3.0, 1.0, 1.0, 4.0], dtype=torch.float64),
    "fractions": torch.tensor([0.5, 1.25, 0.25, 2.0, 0.75, 0.5, 0.75], dtype=torch.float64),
}


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_aot_couples_the_quantiles_of_policy_and_reference_margins(weights, beta, eps):
    b = batch(4)
    reference = aot_reference(b["policy_chosen_logps"] - b["policy_rejected_logps"],
                              b["reference_chosen_logps"] - b["reference_rejected_logps"], WEIGHTS[weights], beta, eps)
    assert_same("aot", b, reference, weights=WEIGHTS[weights], beta=beta, label_smoothing=eps)


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_aot_unpaired_couples_the_quantiles_of_chosen_and_rejected_log_ratios(weights, beta, eps):
    b = batch(5)
    rho_c, rho_r = log_ratios(b)
    reference = aot_reference(rho_c, rho_r, WEIGHTS[weights], beta, eps)
    assert_same("aot_unpaired", b, reference, weights=WEIGHTS[weights], beta=beta, label_smoothing=eps)


def test_aot_unpaired_ignores_which_rejected_goes_with_which_chosen():
    b = batch(6)
    order = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    shuffled = {**b, "policy_rejected_logps": b["policy_rejected_logps"][order],
                "reference_rejected_logps": b["reference_rejected_logps"][order]}
    torch.testing.assert_close(get_loss("aot_unpaired")(**shuffled).loss, get_loss("aot_unpaired")(**b).loss,
                               **TOLERANCE)
    assert not torch.allclose(get_loss("aot")(**shuffled).loss, get_loss("aot")(**b).loss)


def test_aot_with_all_weights_zero_is_zero():
    b = batch(7)
    result = get_loss("aot")(**b, weights=torch.zeros(7, dtype=torch.float64))
    assert result.loss.item() == 0 and result.loss.requires_grad


# -------------------------------------------------------------------------------------------------- DiscoPOP


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta,tau", [(0.1, 0.05), (0.5, 0.3)])
def test_discopop_blends_the_logistic_and_exponential_losses(seed, beta, tau):
    """DiscoPOP: (1 - sigmoid(x / tau)) * -log sigmoid(x) + sigmoid(x / tau) * exp(-x), x = beta * margin."""
    b = batch(seed)
    rho_c, rho_r = log_ratios(b)
    x = beta * (rho_c - rho_r)
    s = torch.sigmoid(x / tau)
    per_pair = (1 - s) * -torch.log(torch.sigmoid(x)) + s * torch.exp(-x)
    assert_same("discopop", b, per_pair.mean(), beta=beta, tau=tau)


def test_discopop_is_finite_where_the_plain_formula_is_not():
    """At x = -2000 the plain formula's s * exp(-x) is 0 * inf; the loss is the logistic one, -x."""
    x = torch.tensor([-2000.0, 2000.0], dtype=torch.float64)
    s = torch.sigmoid(x / 0.05)
    assert torch.isnan(s * torch.exp(-x))[0]
    margin = (x / 0.1).requires_grad_()
    zeros = torch.zeros(2, dtype=torch.float64)
    result = get_loss("discopop")(margin, zeros, zeros, zeros, beta=0.1, tau=0.05)
    torch.testing.assert_close(result.loss.item(), 1000.0, atol=1e-9, rtol=0)  # mean of 2000 and 0
    (grad,) = torch.autograd.grad(result.loss, margin)
    assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------------------------------- f-DPO

F_PRIME = {  # the f-DPO paper's f'(u) for its divergences, in terms of the likelihood ratio u itself
    "reverse_kl": lambda u, alpha: torch.log(u),
    "forward_kl": lambda u, alpha: 1 - 1 / u,
    "js_divergence": lambda u, alpha: torch.log(2 * u / (1 + u)),
    "alpha_divergence": lambda u, alpha: (1 - u ** (-alpha)) / alpha,
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("divergence,alpha", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5),
                                              ("alpha_divergence", 0.5), ("alpha_divergence", 0.2),
                                              ("alpha_divergence", 0.9)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_f_dpo_is_dpo_on_f_prime_of_the_likelihood_ratios(seed, divergence, alpha, beta):
    """f-DPO: -log sigmoid(beta * f'(pi_c / ref_c) - beta * f'(pi_r / ref_r))."""
    b = batch(seed, spread=1.0)
    u_c, u_r = (torch.exp(rho) for rho in log_ratios(b))
    f_prime = F_PRIME[divergence]
    per_pair = -torch.log(torch.sigmoid(beta * (f_prime(u_c, alpha) - f_prime(u_r, alpha))))
    assert_same("f_dpo", b, per_pair.mean(), beta=beta, f_divergence_type=divergence, f_alpha_divergence_coef=alpha)


def test_f_dpo_reverse_kl_is_dpo_and_alpha_tends_to_both_kls():
    b = batch(2, spread=1.0)
    f_dpo, dpo = get_loss("f_dpo"), get_loss("dpo")
    torch.testing.assert_close(f_dpo(**b).loss, dpo(**b).loss, atol=0, rtol=0)
    near_zero = f_dpo(**b, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1e-7).loss
    near_one = f_dpo(**b, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1 - 1e-7).loss
    torch.testing.assert_close(near_zero, dpo(**b).loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(near_one, f_dpo(**b, f_divergence_type="forward_kl").loss, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name,hyperparameters,message", [
    ("exo_pair", {"label_smoothing": 0.0}, r"exo_pair: label_smoothing=0.0 must lie in \(0, 0.5\]"),
    ("exo_pair", {"label_smoothing": 0.7}, r"exo_pair: label_smoothing=0.7 must lie in \(0, 0.5\]"),
    ("aot", {"label_smoothing": 0.6}, r"aot: label_smoothing=0.6 must lie in \[0.0, 0.5\]"),
    ("aot_unpaired", {"label_smoothing": -0.1}, r"aot_unpaired: label_smoothing=-0.1 must lie in"),
    ("sppo_hard", {"beta": 0.0}, r"sppo_hard: beta=0.0 must be > 0"),
    ("discopop", {"tau": 0.0}, r"discopop: tau=0.0 must be > 0"),
    ("f_dpo", {"f_divergence_type": "hellinger"},
     r"f_dpo: f_divergence_type='hellinger' is not one of reverse_kl, forward_kl, js_divergence, alpha_divergence"),
    ("f_dpo", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
     r"f_dpo: f_alpha_divergence_coef=1.0 must lie in \(0, 1\)"),
])
def test_bad_hyperparameters_are_refused(name, hyperparameters, message):
    with pytest.raises(ValueError, match=message):
        get_loss(name)(**batch(0), **hyperparameters)
