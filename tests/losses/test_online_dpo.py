"""Online DPO (``online_dpo``) and its pairs (``best_worst_preferences``): the objective on a rollout equals the
offline DPO / IPO loss on the same pairs' summed log-probs, written out from the papers' formulas, with the same
gradients; the pair builder picks each group's extremes and never pairs ties or unscored rows."""

from __future__ import annotations

import math

import pytest
import torch

from rlmf.losses import get_loss
from rlmf.losses.online_dpo import best_worst_preferences


def rollout(seed: int, rows: int = 6, width: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = torch.arange(width)[None] < lengths[:, None]
    policy = -(0.2 + 2 * torch.rand(rows, width, generator=g, dtype=torch.float64))
    reference = policy + 0.3 * torch.randn(rows, width, generator=g, dtype=torch.float64)
    policy[~mask] = float("nan")  # padding never reaches the loss
    return policy.requires_grad_(), reference, mask


def test_best_worst_preferences_picks_each_groups_extremes():
    scores = torch.tensor([0.1, 0.9, 0.5, 2.0, 2.0, 2.0, 1.0, float("nan"), 3.0, 0.0, 4.0, 1.0])
    valid = torch.tensor([True, True, True, True, True, True, True, False, True, True, True, False])
    prefs = best_worst_preferences(scores, valid, group_size=3)
    assert prefs.tolist() == [-1, 1, 0,   # best 0.9, worst 0.1
                              0, 0, 0,    # all tied: no pair
                              -1, 0, 1,   # the unscored row takes no part
                              -1, 1, 0]   # the last row is unscored
    # Fewer than two valid rows in a group: no pair.
    assert best_worst_preferences(torch.tensor([1.0, 2.0]), torch.tensor([True, False]), 2).tolist() == [0, 0]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_online_dpo_is_the_offline_loss_on_the_rollouts_pairs(loss_type):
    policy, reference, mask = rollout(0)
    # Groups of 3: (rows 0-2) chosen 2, rejected 0; (rows 3-5) chosen 3, rejected 5.
    preferences = torch.tensor([-1, 0, 1, 1, 0, -1])
    beta = 0.2
    result = get_loss("online_dpo")(policy, reference, mask, preferences, beta=beta, loss_type=loss_type)

    sums = [sum(float(policy.detach()[i, t]) for t in range(mask.shape[1]) if mask[i, t]) for i in range(6)]
    refs = [sum(float(reference[i, t]) for t in range(mask.shape[1]) if mask[i, t]) for i in range(6)]
    lengths = [int(mask[i].sum()) for i in range(6)]
    expected = []
    for c, r in ((2, 0), (3, 5)):
        rho_c, rho_r = sums[c] - refs[c], sums[r] - refs[r]
        if loss_type == "sigmoid":  # Rafailov et al. 2023, eq. 7
            expected.append(math.log1p(math.exp(-beta * (rho_c - rho_r))))
        else:  # Azar et al. 2023, eq. 17, per-token log-ratios
            expected.append((rho_c / lengths[c] - rho_r / lengths[r] - 1 / (2 * beta)) ** 2)
    torch.testing.assert_close(result.loss.item(), sum(expected) / 2, rtol=1e-12, atol=1e-12)
    assert result.metrics["pairs"] == 2

    # The same numbers and gradients as the registered offline loss on the pairs' summed log-probs.
    result.loss.backward()
    ours = policy.grad.clone()
    policy.grad = None
    m = mask.to(policy.dtype)
    seq = (torch.where(mask, policy, torch.zeros(())) * m).sum(-1)
    ref_seq = (reference * m).sum(-1)
    offline = {"policy_chosen_logps": seq[[2, 3]], "policy_rejected_logps": seq[[0, 5]],
               "reference_chosen_logps": ref_seq[[2, 3]], "reference_rejected_logps": ref_seq[[0, 5]]}
    if loss_type == "sigmoid":
        reference_result = get_loss("dpo")(**offline, beta=beta)
    else:
        lens = mask.sum(-1)
        reference_result = get_loss("ipo")(**offline, chosen_lengths=lens[[2, 3]], rejected_lengths=lens[[0, 5]],
                                           beta=beta)
    reference_result.loss.backward()
    torch.testing.assert_close(result.loss, reference_result.loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.nan_to_num(ours), torch.nan_to_num(policy.grad), rtol=1e-12, atol=1e-12)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        torch.testing.assert_close(result.metrics[key], reference_result.metrics[key])
    assert torch.isfinite(ours).all()
    assert bool((ours[~mask] == 0).all()) and bool((ours[[1, 4]] == 0).all()), "rows in no pair get no gradient"


def test_online_dpo_without_pairs_and_bad_inputs():
    policy, reference, mask = rollout(1, rows=4)
    loss = get_loss("online_dpo")
    empty = loss(policy, reference, mask, torch.zeros(4, dtype=torch.long))
    assert empty.loss.item() == 0 and empty.loss.requires_grad and empty.metrics["pairs"] == 0
    with pytest.raises(ValueError, match="1 chosen rows but 0 rejected"):
        loss(policy, reference, mask, torch.tensor([1, 0, 0, 0]))
    with pytest.raises(ValueError, match="loss_type='hinge'"):
        loss(policy, reference, mask, torch.zeros(4, dtype=torch.long), loss_type="hinge")
    with pytest.raises(ValueError, match=r"preferences must have shape \[B\] = \[4\]"):
        loss(policy, reference, mask, torch.zeros(3, dtype=torch.long))


def test_registered_ppo_and_grpo_pass_their_settings_through():
    from rlmf.losses.policy_gradient import grpo_loss
    from rlmf.losses.ppo import ppo_loss

    policy, reference, mask = rollout(2)
    old = (policy.detach() + 0.05).nan_to_num()
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        ours = get_loss("grpo")(policy, old, reference, adv, mask, loss_type=loss_type, max_completion_length=7)
        direct = grpo_loss(policy, old, adv, mask, reference, beta=0.04, loss_type=loss_type,
                           max_completion_length=7)
        torch.testing.assert_close(ours.loss, direct.loss)
    token = lambda: torch.randn(6, 7, generator=g, dtype=torch.float64)  # noqa: E731
    advantages, values, returns = token(), token(), token()
    ours = get_loss("ppo")(policy, old, advantages, mask, values, values + 0.1, returns, value_clip=0.1, vf_coef=0.5)
    direct = ppo_loss(policy, old, advantages, mask, values, values + 0.1, returns, value_clip=0.1, vf_coef=0.5)
    torch.testing.assert_close(ours.loss, direct.loss)
    assert set(ours.metrics) == set(direct.metrics)
