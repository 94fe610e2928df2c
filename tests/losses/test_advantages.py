"""The online-RL helpers of ``rlmf.losses.advantages``, each against an independent formula and, where TRL 1.16 has
the same computation, against TRL.

The independent references are plain Python over rows and tokens (lists of floats, ``math`` and ``statistics``),
written from the defining formula rather than from the vectorised recursion: GAE as an explicit discounted sum of
TD errors over the completion tokens, group statistics with ``statistics.mean`` / ``stdev``, and so on.

TRL agreement: GRPO's group advantages live inline in ``GRPOTrainer._generate_and_score_completions``, which is
called unbound on a stand-in ``self`` (generation and reward functions replaced by lambdas that return fixed token
lists and our rewards; a single-process accelerator), so TRL's own code computes the baselines and standard
deviations (and, with two reward functions, GDPO's ``normalize_then_sum``). The RLOO counterpart
(``rloo_rewards`` + ``rloo_advantages`` against ``RLOOTrainer._generate_and_score_completions``) and the TRL checks
of the k1 / k3 estimators (through the ``kl`` metrics of RLOOTrainer and GRPOTrainer) are in
``test_policy_gradient.py``; REINFORCE++'s and ReMax's advantages (no TRL counterpart) in ``test_reinforce.py``.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.trainer.grpo_trainer import GRPOTrainer

from rlmf.losses.advantages import (
    decoupled_group_advantages,
    gae,
    group_advantages,
    kl_penalty,
    rloo_advantages,
    whiten,
)
from rlmf.losses.policy_gradient import drop_uniform_groups

TOLERANCE = dict(atol=1e-10, rtol=1e-10)
TRL_TOLERANCE = dict(atol=1e-6, rtol=1e-6)


def random_mask(lengths, width: int, side: str = "right") -> torch.Tensor:
    """Bool [B, T] of completion tokens: ``lengths[i]`` tokens, right- or left-padded."""
    lengths = torch.tensor(lengths)
    positions = torch.arange(width)
    if side == "right":
        return positions < lengths[:, None]
    return positions >= width - lengths[:, None]


def with_garbage(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``tensor`` with NaN, inf and huge values written outside ``mask``."""
    garbage = torch.tensor([float("nan"), float("inf"), -1e30, float("-inf")], dtype=tensor.dtype)
    filler = garbage[torch.arange(tensor.numel()) % 4].view(tensor.shape)
    return torch.where(mask, tensor, filler)


# ---------------------------------------------------------------------------------------------------- whiten


def reference_whiten(values, mask, shift_mean, eps=1e-8):
    """Python floats: pool the masked entries, Bessel-corrected variance (0 for fewer than two), rescale."""
    rows = values.tolist()
    keep = mask.tolist()
    pooled = [x for row, row_keep in zip(rows, keep) for x, k in zip(row, row_keep) if k]
    mean = statistics.fmean(pooled) if pooled else 0.0
    variance = statistics.variance(pooled) if len(pooled) > 1 else 0.0
    out = []
    for row, row_keep in zip(rows, keep):
        out.append(
            [((x - mean) / math.sqrt(variance + eps) + (0.0 if shift_mean else mean)) if k else 0.0
             for x, k in zip(row, row_keep)]
        )
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.long])
def test_whiten_matches_pooled_unbiased_statistics(shift_mean, mask_dtype):
    g = torch.Generator().manual_seed(0)
    mask = random_mask([6, 2, 0, 1, 4], 6)
    values = 3.0 + 2.0 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    out = whiten(values, mask.to(mask_dtype), shift_mean=shift_mean)
    torch.testing.assert_close(out, reference_whiten(values, mask, shift_mean), **TOLERANCE)
    pooled = out[mask]
    if shift_mean:
        assert abs(pooled.mean().item()) < 1e-12
    assert abs(pooled.var(unbiased=True).item() - 1.0) < 1e-6


def test_whiten_ignores_what_lies_outside_the_mask():
    g = torch.Generator().manual_seed(1)
    mask = random_mask([3, 5, 1], 5, side="left")
    values = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    for shift_mean in (True, False):
        clean = whiten(values, mask, shift_mean=shift_mean)
        dirty = whiten(with_garbage(values, mask), mask, shift_mean=shift_mean)
        torch.testing.assert_close(dirty, clean, **TOLERANCE)
        assert torch.isfinite(dirty).all()


def test_whiten_degenerate_selections():
    values = torch.tensor([[2.0, 5.0, -1.0], [4.0, 4.0, 7.0]], dtype=torch.float64)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert torch.equal(whiten(values, empty), torch.zeros_like(values))
    assert torch.equal(whiten(values, empty, shift_mean=False), torch.zeros_like(values))
    single = torch.tensor([[False, True, False], [False, False, False]])
    assert torch.equal(whiten(values, single), torch.zeros_like(values))  # no spread: centred to 0
    assert whiten(values, single, shift_mean=False)[0, 1].item() == 5.0  # and the mean added back
    constant = torch.tensor([[False, False, False], [True, True, False]])
    out = whiten(values, constant)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(values))


def test_whiten_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        whiten(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ kl_penalty


def test_kl_estimators_match_their_formulas():
    g = torch.Generator().manual_seed(2)
    logps = -3.0 * torch.rand(4, 5, generator=g, dtype=torch.float64)
    reference = logps + 1.5 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    estimates = {kind: kl_penalty(logps, reference, kind) for kind in ("k1", "k2", "k3")}
    for i in range(4):
        for t in range(5):
            lp, ref = logps[i, t].item(), reference[i, t].item()
            assert math.isclose(estimates["k1"][i, t].item(), lp - ref, rel_tol=1e-12, abs_tol=1e-12)
            assert math.isclose(estimates["k2"][i, t].item(), 0.5 * (lp - ref) ** 2, rel_tol=1e-12, abs_tol=1e-12)
            k3 = math.exp(ref - lp) - (ref - lp) - 1
            assert math.isclose(estimates["k3"][i, t].item(), k3, rel_tol=1e-9, abs_tol=1e-12)
    assert (estimates["k2"] >= 0).all() and (estimates["k3"] >= 0).all()


def test_kl_estimators_agree_on_average_with_the_exact_kl():
    """Unbiasedness: over tokens drawn from pi, mean k1 and mean k3 approach KL(pi || ref); k2 approaches it for
    close distributions (Schulman 2020). Categorical over 6 outcomes, many samples, fixed seed."""
    g = torch.Generator().manual_seed(3)
    pi = torch.softmax(0.5 * torch.randn(6, generator=g, dtype=torch.float64), 0)
    ref = torch.softmax(torch.log(pi) + 0.2 * torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = (pi * (pi.log() - ref.log())).sum().item()
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    logps, reference = pi.log()[samples], ref.log()[samples]
    for kind, tolerance in (("k1", 0.15), ("k3", 0.05), ("k2", 0.1)):
        assert abs(kl_penalty(logps, reference, kind).mean().item() - exact) < tolerance * exact + 1e-4, kind


def test_k3_keeps_its_precision_for_tiny_log_ratios():
    logps = torch.tensor([-1.0, -2.0], dtype=torch.float32)
    reference = logps - torch.tensor([1e-4, -3e-4])
    d = (logps - reference).double()
    expected = (d**2 / 2 - d**3 / 6 + d**4 / 24).float()  # Taylor series of exp(-d) - 1 + d
    torch.testing.assert_close(kl_penalty(logps, reference, "k3"), expected, rtol=1e-3, atol=0)


def test_kl_penalty_mask_and_errors():
    logps = torch.tensor([[-1.0, float("nan")], [-2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([[-1.5, 3.0], [-1.0, -0.5]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [True, True]])
    for kind in ("k1", "k2", "k3"):
        out = kl_penalty(logps, reference, kind, mask=mask)
        assert out[0, 1].item() == 0.0 and torch.isfinite(out).all()
        (grad,) = torch.autograd.grad(out.sum(), logps)
        assert grad[0, 1].item() == 0.0 and torch.isfinite(grad).all()
    with pytest.raises(ValueError, match=r"kind='kl'.*k1.*k2.*k3"):
        kl_penalty(logps, reference, "kl")
    with pytest.raises(ValueError, match="differ"):
        kl_penalty(logps, reference[:, :1], "k1")


# ------------------------------------------------------------------------------------------------------ gae


def reference_gae(rewards, values, mask, gamma, lam):
    """Per row, over the list of completion tokens: A_i = sum_l (gamma lam)^l delta_{i+l}, written as a double sum."""
    advantages = torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[row, t]]
        r = [rewards[row, t].item() for t in steps]
        v = [values[row, t].item() for t in steps] + [0.0]  # nothing after the last token
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(steps))]
        for i, t in enumerate(steps):
            advantages[row, t] = sum((gamma * lam) ** l * deltas[i + l] for l in range(len(steps) - i))
    returns = torch.where(mask, advantages + values, torch.zeros((), dtype=values.dtype))
    return advantages, returns


def gae_inputs(seed, mask):
    g = torch.Generator().manual_seed(seed)
    rewards = 0.1 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    values = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    return rewards, values


MASKS = {
    "right_padded": random_mask([7, 3, 0, 1, 5], 7),
    "left_padded": random_mask([2, 7, 4], 7, side="left"),
    "holes": torch.tensor([[1, 1, 0, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool),
}


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0), (0.0, 0.5)])
@pytest.mark.parametrize("layout", sorted(MASKS))
def test_gae_matches_the_discounted_sum_of_td_errors(layout, gamma, lam):
    mask = MASKS[layout]
    rewards, values = gae_inputs(4, mask)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = reference_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages, **TOLERANCE)
    torch.testing.assert_close(returns, expected_returns, **TOLERANCE)


def test_gae_limits_monte_carlo_and_one_step_td():
    mask = MASKS["right_padded"]
    rewards, values = gae_inputs(5, mask)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # lam = gamma = 1: the return is the undiscounted sum of the rewards still to come.
    for row in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[row, t]:
                to_go = sum(rewards[row, s].item() for s in range(t, mask.shape[1]) if mask[row, s])
                assert math.isclose(returns[row, t].item(), to_go, abs_tol=1e-12)
    # lam = 0: one-step TD error; the last token bootstraps from nothing.
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    row, last = 0, 6
    assert math.isclose(advantages[row, last].item(), rewards[row, last].item() - values[row, last].item())
    expected = rewards[row, 2] + 0.9 * values[row, 3] - values[row, 2]
    assert math.isclose(advantages[row, 2].item(), expected.item(), abs_tol=1e-12)


def test_gae_ignores_padding_and_zeroes_it():
    for layout in ("right_padded", "holes"):
        mask = MASKS[layout]
        rewards, values = gae_inputs(6, mask)
        clean = gae(rewards, values, mask, 0.99, 0.95)
        dirty = gae(with_garbage(rewards, mask), with_garbage(values, mask), mask, 0.99, 0.95)
        for a, b in zip(clean, dirty):
            torch.testing.assert_close(b, a, **TOLERANCE)
            assert (b[~mask] == 0).all()
    empty_row = MASKS["right_padded"][2]
    assert not empty_row.any()
    assert (gae(*gae_inputs(6, MASKS["right_padded"]), MASKS["right_padded"], 1.0, 0.95)[0][2] == 0).all()


def test_gae_rejects_bad_arguments():
    mask = MASKS["right_padded"]
    rewards, values = gae_inputs(0, mask)
    with pytest.raises(ValueError, match="gamma"):
        gae(rewards, values, mask, 1.5, 0.95)
    with pytest.raises(ValueError, match="shape"):
        gae(rewards[:, :3], values, mask, 1.0, 0.95)


# ----------------------------------------------------------------------------------------- group advantages


def reference_group_advantages(rewards, group_size, scale_rewards, eps):
    """Python floats: centre each group on its mean, divide by the unbiased std of the group or of all rewards."""
    flat = rewards.reshape(-1).tolist()
    groups = [flat[i:i + group_size] for i in range(0, len(flat), group_size)]
    batch_std = statistics.stdev(flat) if len(flat) > 1 else 0.0
    out = []
    for group in groups:
        mean = statistics.fmean(group)
        if scale_rewards == "none":
            scale = 1.0
        elif scale_rewards == "batch":
            scale = batch_std + eps
        else:
            scale = (statistics.stdev(group) if group_size > 1 else 0.0) + eps
        out.extend((x - mean) / scale for x in group)
    return torch.tensor(out, dtype=torch.float64).view(rewards.shape)


def grouped_rewards(seed, prompts=4, group_size=4):
    """[B * G] rewards with one group of identical rewards and one 0/1 verifier-style group."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(prompts * group_size, generator=g, dtype=torch.float64)
    rewards[group_size:2 * group_size] = 0.5
    rewards[2 * group_size:3 * group_size] = torch.tensor([1.0, 0.0, 0.0, 1.0][:group_size], dtype=torch.float64)
    return rewards


@pytest.mark.parametrize("eps", [1e-4, 0.5])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("two_dimensional", [False, True])
def test_group_advantages_match_group_statistics(scale_rewards, eps, two_dimensional):
    rewards = grouped_rewards(7)
    if two_dimensional:
        rewards = rewards.view(-1, 4)
    out = group_advantages(rewards, 4, scale_rewards=scale_rewards, eps=eps)
    assert out.shape == rewards.shape
    torch.testing.assert_close(out, reference_group_advantages(rewards, 4, scale_rewards, eps), **TOLERANCE)
    assert (out.reshape(-1, 4)[1] == 0).all()  # the group of identical rewards
    torch.testing.assert_close(out.reshape(-1, 4).sum(1), torch.zeros(4, dtype=torch.float64), **TOLERANCE)


def test_group_advantages_with_one_completion_per_prompt_are_zero():
    rewards = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    for scale_rewards in ("group", "batch", "none"):
        out = group_advantages(rewards, 1, scale_rewards=scale_rewards)
        assert torch.equal(out, torch.zeros_like(rewards)), scale_rewards
    assert torch.equal(group_advantages(rewards[:1], 1, scale_rewards="batch"), torch.zeros(1, dtype=torch.float64))


def test_group_advantages_reject_bad_arguments():
    rewards = torch.zeros(6)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 3, scale_rewards="global")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards.view(2, 3), 2)


def _grpo_generation_trainer(rewards: torch.Tensor, group_size: int, scale_rewards: str,
                             weights: torch.Tensor = torch.ones(1, dtype=torch.float64),
                             aggregation: str = "sum_then_normalize"):
    """A stand-in ``self`` for ``GRPOTrainer._generate_and_score_completions``: generation returns fixed token
    lists, the reward functions return ``rewards`` ([N], or [N, K] for K functions of ``weights``); no vLLM, tools,
    images, reference model or accelerator."""
    count = rewards.shape[0]
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=lambda t: t, num_processes=1, process_index=0
        ),
        args=SimpleNamespace(
            steps_per_generation=1,
            gradient_accumulation_steps=1,
            per_device_train_batch_size=count,
            gradient_checkpointing_kwargs=None,
        ),
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        environment_factories=None,
        environments=None,
        tools=None,
        num_iterations=1,
        use_vllm=False,
        beta=0.0,
        mask_truncated_completions=False,
        pad_to_multiple_of=None,
        _tokenizer=SimpleNamespace(pad_token_id=0),
        num_generations=group_size,
        multi_objective_aggregation=aggregation,
        scale_rewards=scale_rewards,
        reward_weights=weights,
        reward_func_names=[f"score_{k}" for k in range(len(weights))],
        reward_funcs=[None] * len(weights),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list)},
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
    )
    trainer._generate = lambda prompts: (
        [[1, 2]] * len(prompts), [[3, 4, 5]] * len(prompts), None, ["c"] * len(prompts), None, None, None, None
    )
    trainer._calculate_rewards = lambda inputs, prompts, completions, ids: (
        rewards if rewards.dim() == 2 else rewards[:, None]).clone()
    return trainer


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl_grpo(scale_rewards):
    """TRL: ``GRPOTrainer._generate_and_score_completions`` (the ``sum_then_normalize`` branch, one reward function
    of weight 1) called on the stand-in trainer above; its ``advantages`` output is compared with ours at TRL's eps
    1e-4, and its ``frac_reward_zero_std`` metric with the fraction of groups ``drop_uniform_groups`` drops (TRL
    counts a group as zero-std by ``isclose(std, 0)``, we by exact equality: identical here)."""
    rewards = grouped_rewards(8)
    trainer = _grpo_generation_trainer(rewards, 4, scale_rewards)
    output = GRPOTrainer._generate_and_score_completions(trainer, [{"prompt": "p"}] * rewards.numel())
    ours = group_advantages(rewards, 4, scale_rewards=scale_rewards, eps=1e-4)
    torch.testing.assert_close(ours, output["advantages"].to(ours.dtype), **TRL_TOLERANCE)
    if scale_rewards != "batch":  # with "batch" TRL's zero-std count looks at the batch std instead
        dropped = 1 - drop_uniform_groups(rewards, 4).double().mean().item()
        assert math.isclose(dropped, trainer._metrics["train"]["frac_reward_zero_std"][-1], rel_tol=1e-6)
        assert dropped == 0.25


def reference_decoupled(rewards, weights, group_size, eps):
    """GDPO in Python floats: each reward column normalised in its group (unbiased std), the weighted sum normalised
    over the batch."""
    columns = list(zip(*rewards.tolist()))
    normalised = []
    for column in columns:
        out = []
        for start in range(0, len(column), group_size):
            group = column[start:start + group_size]
            std = statistics.stdev(group) if group_size > 1 else 0.0
            out.extend((x - statistics.fmean(group)) / (std + eps) for x in group)
        normalised.append(out)
    total = [sum(w * column[i] for w, column in zip(weights.tolist(), normalised)) for i in range(len(columns[0]))]
    return torch.tensor([(x - statistics.fmean(total)) / (statistics.stdev(total) + eps) for x in total],
                        dtype=torch.float64)


def member_rewards(seed, prompts=4, group_size=4):
    """[B * G, 2]: a wide-spread reward and a 0/1 one (one group uniform in it), the case GDPO is about."""
    g = torch.Generator().manual_seed(seed)
    wide = 10 * torch.randn(prompts * group_size, generator=g, dtype=torch.float64)
    binary = (torch.rand(prompts * group_size, generator=g) > 0.5).double()
    binary[:group_size] = 1.0
    return torch.stack([wide, binary], dim=1)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.5, 2.0]])
def test_decoupled_group_advantages_match_the_formula_and_trl(weights):
    """TRL: ``GRPOTrainer._generate_and_score_completions`` with two reward functions of ``reward_weights``
    and ``multi_objective_aggregation="normalize_then_sum"``; its ``advantages`` against ours."""
    rewards, weights = member_rewards(10), torch.tensor(weights, dtype=torch.float64)
    ours = decoupled_group_advantages(rewards, weights, 4)
    torch.testing.assert_close(ours, reference_decoupled(rewards, weights, 4, 1e-4), **TOLERANCE)
    trainer = _grpo_generation_trainer(rewards, 4, "group", weights, "normalize_then_sum")
    output = GRPOTrainer._generate_and_score_completions(trainer, [{"prompt": "p"}] * rewards.shape[0])
    torch.testing.assert_close(ours, output["advantages"].to(ours.dtype), **TRL_TOLERANCE)
    # Summing first lets the wide reward decide: the 0/1 reward's ranking is lost in sum_then_normalize.
    summed = group_advantages((rewards * weights).sum(1), 4)
    assert not torch.allclose(summed, ours, atol=0.05)


def test_decoupled_group_advantages_edges():
    rewards = member_rewards(11)
    one = decoupled_group_advantages(rewards[:, :1], torch.ones(1, dtype=torch.float64), 4)
    # One reward: group-normalise, then normalise over the batch.
    torch.testing.assert_close(one, reference_decoupled(rewards[:, :1], torch.ones(1), 4, 1e-4), **TOLERANCE)
    assert torch.equal(decoupled_group_advantages(rewards[:1], torch.ones(2), 1), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weights \[K\]"):
        decoupled_group_advantages(rewards, torch.ones(3), 4)
    with pytest.raises(ValueError, match="group_size"):
        decoupled_group_advantages(rewards, torch.ones(2), 5)


# ------------------------------------------------------------------------------------------ rloo_advantages


def reference_rloo(rewards, group_size):
    flat = rewards.reshape(-1).tolist()
    out = []
    for start in range(0, len(flat), group_size):
        group = flat[start:start + group_size]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            out.append(r - sum(others) / len(others))
    return torch.tensor(out, dtype=torch.float64).view(rewards.shape)


@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("two_dimensional", [False, True])
def test_rloo_advantages_leave_one_out(group_size, two_dimensional):
    """Reference: the mean of the *other* rewards, by list comprehension. TRL agreement (with the KL-penalised
    reward of ``rloo_rewards``) is ``test_rloo_rewards_and_advantages_match_trl`` in test_policy_gradient.py."""
    rewards = grouped_rewards(9, prompts=3, group_size=group_size)
    if two_dimensional:
        rewards = rewards.view(-1, group_size)
    out = rloo_advantages(rewards, group_size)
    assert out.shape == rewards.shape
    torch.testing.assert_close(out, reference_rloo(rewards, group_size), **TOLERANCE)
    centred = group_advantages(rewards, group_size, scale_rewards="none")
    torch.testing.assert_close(out, group_size / (group_size - 1) * centred, **TOLERANCE)
    assert (out.reshape(-1, group_size)[1] == 0).all()  # identical rewards


def test_rloo_advantages_need_two_samples():
    with pytest.raises(ValueError, match="group_size=1"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.zeros(5), 2)
