"""REINFORCE++, REINFORCE++-baseline and ReMax: their advantages (``rlmf.losses.advantages``) and their objective
(``rlmf.losses.reinforce.token_surrogate_loss``), against the papers' formulas written here in plain Python floats
over rows and tokens (float64 inputs, 1e-10).

TRL 1.16 has none of the three, so there is no TRL check. The definitions followed are the papers' as implemented by
their reference frameworks: OpenRLHF's ``--advantage_estimator reinforce`` / ``reinforce_baseline`` (per-token k1 KL
penalty plus the score at the last token, the return-to-go, whitened over every token of the batch) and verl's
``remax`` (the return-to-go minus the greedy completion's reward). One documented difference: OpenRLHF whitens with
the population variance clamped at 1e-8; ``whiten`` uses the unbiased variance plus 1e-8 (the reference below
follows ours, and the test of the population version checks the factor ``sqrt(n / (n - 1))``).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlmf.losses import get_loss
from rlmf.losses.advantages import (
    discounted_returns,
    greedy_baseline_advantages,
    group_advantages,
    outcome_token_rewards,
    reinforce_pp_advantages,
)
from rlmf.losses.reinforce import token_surrogate_loss

TOLERANCE = dict(atol=1e-10, rtol=1e-10)


def rollout(seed: int, lengths=(5, 3, 1, 4, 6, 2), width: int = 6):
    """Float64 scores [B], a k1 KL [B, T] (0 outside the mask), a right-padded mask with one hole (a masked-out
    position inside a completion, as tool output would be)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(width) < torch.tensor(lengths)[:, None]
    mask[0, 2] = False
    scores = torch.randn(len(lengths), generator=g, dtype=torch.float64)
    kl = torch.where(mask, 0.3 * torch.randn(mask.shape, generator=g, dtype=torch.float64), torch.zeros(()))
    return scores, kl, mask


def reference_token_rewards(scores, kl, mask, kl_coef):
    """r_t = -kl_coef * kl_t on each completion token, plus the score on the row's last completion token."""
    out = []
    for score, kl_row, mask_row in zip(scores.tolist(), kl.tolist(), mask.tolist()):
        tokens = [t for t, m in enumerate(mask_row) if m]
        row = [(-kl_coef * k if m else 0.0) for k, m in zip(kl_row, mask_row)]
        if tokens:
            row[tokens[-1]] += score
        out.append(row)
    return out


def reference_returns(rewards, mask, gamma):
    """G at the i-th completion token = sum_l gamma^l r at the (i + l)-th completion token (holes skipped)."""
    out = []
    for row, mask_row in zip(rewards, mask.tolist()):
        tokens = [t for t, m in enumerate(mask_row) if m]
        returns = [0.0] * len(row)
        for i, t in enumerate(tokens):
            returns[t] = sum(gamma ** l * row[s] for l, s in enumerate(tokens[i:]))
        out.append(returns)
    return out


def reference_whiten(values, mask):
    pooled = [v for row, mask_row in zip(values, mask.tolist()) for v, m in zip(row, mask_row) if m]
    mean, variance = statistics.fmean(pooled), statistics.variance(pooled)
    return [[(v - mean) / math.sqrt(variance + 1e-8) if m else 0.0 for v, m in zip(row, mask_row)]
            for row, mask_row in zip(values, mask.tolist())]


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_reinforce_pp_advantages_follow_the_paper(gamma, kl_coef):
    scores, kl, mask = rollout(1)
    rewards = outcome_token_rewards(scores, -kl_coef * kl, mask)
    expected_rewards = reference_token_rewards(scores, kl, mask, kl_coef)
    torch.testing.assert_close(rewards, torch.tensor(expected_rewards, dtype=torch.float64), **TOLERANCE)
    returns = reference_returns(expected_rewards, mask, gamma)
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma), torch.tensor(returns, dtype=torch.float64),
                               **TOLERANCE)
    advantages = reinforce_pp_advantages(rewards, mask, gamma)
    torch.testing.assert_close(advantages, torch.tensor(reference_whiten(returns, mask), dtype=torch.float64),
                               **TOLERANCE)
    # OpenRLHF's population variance: the same advantages up to sqrt(n / (n - 1)).
    n = int(mask.sum())
    pooled = [r for row, m_row in zip(returns, mask.tolist()) for r, m in zip(row, m_row) if m]
    openrlhf = (returns[0][0] - statistics.fmean(pooled)) / math.sqrt(statistics.pvariance(pooled))
    assert math.isclose(openrlhf, advantages[0, 0].item() * math.sqrt(n / (n - 1)), rel_tol=1e-6)


def test_reinforce_pp_baseline_centres_the_scores_on_their_group_first():
    scores, kl, mask = rollout(2)
    centred = group_advantages(scores, 3, scale_rewards="none")
    groups = [scores.tolist()[i:i + 3] for i in (0, 3)]
    expected = [s - statistics.fmean(g) for g in groups for s in g]
    torch.testing.assert_close(centred, torch.tensor(expected, dtype=torch.float64), **TOLERANCE)
    rewards = reference_token_rewards(torch.tensor(expected, dtype=torch.float64), kl, mask, 0.01)
    advantages = reinforce_pp_advantages(outcome_token_rewards(centred, -0.01 * kl, mask), mask)
    torch.testing.assert_close(advantages, torch.tensor(reference_whiten(reference_returns(rewards, mask, 1.0), mask),
                                                        dtype=torch.float64), **TOLERANCE)


@pytest.mark.parametrize("kl_coef", [0.0, 0.001])
def test_remax_advantages_subtract_the_greedy_reward(kl_coef):
    scores, kl, mask = rollout(3)
    greedy = torch.tensor([0.5, 0.5, -1.0, -1.0, 2.0, 2.0], dtype=torch.float64)
    rewards = reference_token_rewards(scores, kl, mask, kl_coef)
    returns = reference_returns(rewards, mask, 1.0)
    expected = [[(g - b if m else 0.0) for g, m in zip(row, mask_row)]
                for row, mask_row, b in zip(returns, mask.tolist(), greedy.tolist())]
    out = greedy_baseline_advantages(outcome_token_rewards(scores, -kl_coef * kl, mask), mask, greedy)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), **TOLERANCE)
    if kl_coef == 0:  # no penalty: every token of a completion gets R(y) - R(y_greedy)
        row = out[1][mask[1]]
        torch.testing.assert_close(row, (scores[1] - greedy[1]).expand_as(row), **TOLERANCE)


def test_token_surrogate_matches_the_clipped_formula_and_its_gradient():
    g = torch.Generator().manual_seed(4)
    _, _, mask = rollout(4)
    logps = (-2 * torch.rand(mask.shape, generator=g, dtype=torch.float64)).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    token_advantages = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    for advantages in (token_advantages, token_advantages[:, 0]):
        result = token_surrogate_loss("t", logps, old, advantages, mask, 0.1, 0.28)
        full = advantages if advantages.dim() == 2 else advantages[:, None].expand(mask.shape)
        terms = []
        for i, t in mask.nonzero().tolist():
            r, a = math.exp(logps[i, t].item() - old[i, t].item()), full[i, t].item()
            terms.append(-min(r * a, min(max(r, 0.9), 1.28) * a))
        torch.testing.assert_close(result.loss.item(), sum(terms) / len(terms), **TOLERANCE)
    assert torch.autograd.gradcheck(lambda x: token_surrogate_loss("t", x, old, token_advantages, mask, 0.1, 0.28).loss,
                                    (logps,))
    with pytest.raises(ValueError, match=r"advantages must be \[B, T\]"):
        token_surrogate_loss("t", logps, old, token_advantages[:, :3], mask, 0.2, 0.2)


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline", "remax"])
def test_registered_objectives_are_the_token_surrogate(name):
    _, _, mask = rollout(5)
    g = torch.Generator().manual_seed(5)
    logps = -2 * torch.rand(mask.shape, generator=g, dtype=torch.float64)
    old = logps + 0.3 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    advantages = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    result = get_loss(name)(logps, old, advantages, mask, eps_low=0.2, eps_high=0.3)
    expected = token_surrogate_loss(name, logps, old, advantages, mask, 0.2, 0.3)
    assert torch.equal(result.loss, expected.loss)
    assert get_loss(name).targets == {"remax": "greedy_baseline"}.get(name, name)
