"""Helpers of the online-RL objectives: whitening, per-token KL estimators, GAE, returns and the advantage estimators
(group-relative, leave-one-out, REINFORCE++'s, ReMax's greedy baseline, GDPO's decoupled normalisation).

Pure functions over tensors, like the losses. Token-level tensors are ``[B, T]`` (one row per sampled completion,
one column per completion position) and come with a ``mask`` ``[B, T]`` marking the completion tokens that count:
bool, or any numeric dtype with 0/1 entries (a nonzero entry counts). Positions outside the mask never influence a
result, whatever they hold (padding may be garbage, even NaN), and come back as 0 in token-level outputs.

Sequence-level rewards of a group of ``G`` completions per prompt are ``[B * G]`` (the ``G`` completions of a prompt
adjacent, prompt after prompt) or ``[B, G]``; the group helpers return the shape they are given.

Nothing here stops gradients: advantages and returns are rollout quantities, so pass detached inputs (the objectives
in :mod:`rlmf.losses.policy_gradient` treat ``advantages`` and ``returns`` as constants).
"""

from __future__ import annotations

from typing import Tuple

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
SCALE_REWARDS = ("group", "batch", "none")
# How several rewards become one advantage (TRL's multi_objective_aggregation): see decoupled_group_advantages.
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def token_mask(name: str, mask: torch.Tensor, **tensors: torch.Tensor) -> torch.Tensor:
    """``mask`` as bool ``[B, T]``, after checking that it and every tensor in ``tensors`` are ``[B, T]`` alike."""
    if mask.dim() != 2:
        raise ValueError(f"{name}: mask must have shape [B, T], got {tuple(mask.shape)}")
    for tensor_name, tensor in tensors.items():
        if tensor.shape != mask.shape:
            raise ValueError(
                f"{name}: {tensor_name} must have the shape of mask {tuple(mask.shape)}, got {tuple(tensor.shape)}"
            )
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``values`` over the entries where the bool ``mask`` is set (over ``dim``, or over everything).

    Entries outside the mask are replaced by 0 before summing, so they cannot leak a NaN or an inf into the mean
    or its gradient. An empty selection has mean 0 (its sum divided by 1), not 0/0.
    """
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    count = mask.sum() if dim is None else mask.sum(dim)
    total = total.sum() if dim is None else total.sum(dim)
    return total / count.clamp(min=1).to(values.dtype)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening of token-level ``values`` ``[B, T]`` over all masked entries of the batch.

        mean = sum(mask * x) / n        var = sum(mask * (x - mean)^2) / (n - 1)        n = sum(mask)
        out  = (x - mean) / sqrt(var + eps)            (+ mean again when shift_mean=False)

    The statistics pool every masked token of the batch (not one row at a time), as PPO's advantage
    normalisation does. The variance is the unbiased one (Bessel's correction, divisor ``n - 1``), the estimator
    TRL 1.16 uses for every reward and advantage standard deviation (``trl.trainer.utils.nanstd``), so whitened
    and group-normalised quantities here share one convention; the population variance (divisor ``n``) that some
    PPO code uses differs by a factor ``n / (n - 1)``, immaterial at the thousands of tokens of a batch. With
    ``n <= 1`` there is no spread to estimate: the variance is taken as 0, so a single token whitens to 0 (and to
    its own value with ``shift_mean=False``). ``eps`` (default 1e-8, inside the square root) keeps a constant batch
    finite.

    ``shift_mean=False`` rescales without centring: the mean is added back after dividing, so the output keeps the
    input's mean (what PPO uses for rewards, whose sign carries meaning). Entries outside ``mask`` come back as 0.
    Returns a tensor shaped like ``values``.
    """
    mask = token_mask("whiten", mask, values=values)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    count = mask.sum().to(values.dtype)
    mean = masked_mean(values, mask)
    centred = torch.where(mask, values - mean, zero)
    variance = centred.square().sum() / (count - 1).clamp(min=1)
    whitened = centred * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, zero)


def kl_penalty(
    logps: torch.Tensor, reference_logps: torch.Tensor, kind: str, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from log-probs of tokens sampled from ``pi``.

    With ``d = logp - ref`` (the log-ratio of the policy to the reference at the sampled token):

        k1 = d                        unbiased, high variance, can be negative
        k2 = d^2 / 2                  biased, low variance, >= 0
        k3 = exp(-d) - 1 + d          unbiased, low variance, >= 0  (= exp(ref - logp) - (ref - logp) - 1)

    Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html). k1 summed over a
    completion is the sequence-level penalty of PPO-RLHF and RLOO; k3 is GRPO's per-token penalty. k3 is computed
    as ``expm1(-d) + d``, which is the same number without the cancellation of ``exp(-d) - 1`` when ``d`` is small.
    ``kind`` is one of ``"k1"``, ``"k2"``, ``"k3"``.

    Shapes: ``logps`` and ``reference_logps`` alike (typically ``[B, T]``); the result has that shape. With a
    ``mask`` (``[B, T]``) positions outside it are 0 and do not reach the gradient.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: kind={kind!r} is not one of {KL_ESTIMATORS}")
    if logps.shape != reference_logps.shape:
        raise ValueError(
            f"kl_penalty: logps {tuple(logps.shape)} and reference_logps {tuple(reference_logps.shape)} differ"
        )
    log_ratio = logps - reference_logps
    if mask is not None:
        mask = token_mask("kl_penalty", mask, logps=logps)
        log_ratio = torch.where(mask, log_ratio, torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device))
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(-log_ratio) + log_ratio


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked completion tokens; returns ``(advantages, returns)``.

    Over the completion tokens t_1 < t_2 < ... < t_n of a row (the masked positions, in order):

        delta_i = r_{t_i} + gamma * V_{t_{i+1}} - V_{t_i}          (V_{t_{n+1}} = 0: the episode ends after t_n)
        A_i     = sum_{l >= 0} (gamma * lam)^l * delta_{i+l}  =  delta_i + gamma * lam * A_{i+1}
        R_i     = A_i + V_{t_i}                                 (the lambda-return, the value target)

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation", eq. 16.
    Each completion is one episode whose actions are its tokens: positions after the last masked token are
    terminal (nothing is bootstrapped from padding), positions before the first are not part of it (left padding
    is fine), and a masked-out position inside a completion (e.g. tool output spliced into a multi-turn
    completion) is skipped: it is not a step, its reward and value are ignored, and the next completion token's
    value is bootstrapped across it. ``gamma`` in [0, 1] discounts; ``lam`` in [0, 1] trades bias (0: one-step TD)
    for variance (1: Monte-Carlo return minus V). For the usual right-padded mask this is the PPO-RLHF recursion
    with values and rewards zeroed after the completion.

    Shapes: ``rewards``, ``values``, ``mask`` ``[B, T]`` (the reward model's score usually on the last token, the
    per-token KL penalty on every token); ``advantages`` and ``returns`` ``[B, T]``, 0 outside the mask.
    A reverse loop over T (T small tensor ops).
    """
    mask = token_mask("gae", mask, rewards=rewards, values=values)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gae: gamma={gamma} and lam={lam} must lie in [0, 1]")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(values.shape[1])):
        step = mask[:, t]
        value = torch.where(step, values[:, t], zero)
        delta = torch.where(step, rewards[:, t], zero) + gamma * next_value - value
        running = torch.where(step, delta + gamma * lam * running, running)
        next_value = torch.where(step, value, next_value)
        advantages.append(torch.where(step, running, zero))
    advantages = torch.stack(advantages[::-1], dim=1)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def as_groups(name: str, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``rewards`` ([B * G] or [B, G]) viewed as ``[B, G]``, after checking the shape against ``group_size``."""
    if group_size < 1:
        raise ValueError(f"{name}: group_size={group_size} must be >= 1")
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"{name}: rewards {tuple(rewards.shape)} is [B, G] but group_size={group_size}")
        return rewards
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"{name}: rewards must be [B * G] or [B, G]; got {tuple(rewards.shape)} with group_size={group_size}"
        )
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO's group-relative advantages: each reward minus its group's mean, over a standard deviation.

        A_i = (R_i - mean_group(R)) / (std + eps)

    ``scale_rewards`` picks the std: ``"group"`` the std of the prompt's own group (Shao et al. 2024, "DeepSeekMath",
    GRPO's outcome supervision), ``"batch"`` one std over all rewards of the batch (still centred per group; Hu et al.
    2025, "REINFORCE++" argue this is more robust), ``"none"`` no scaling, centring only (Liu et al. 2025,
    "Understanding R1-Zero-Like Training", Dr. GRPO: dividing by the group std favours prompts that are too easy
    or too hard).

    The std is the unbiased one (divisor ``n - 1``), as in TRL 1.16's GRPOTrainer (``trl.trainer.utils.nanstd``
    applies Bessel's correction), so advantages are interchangeable with TRL's; ``eps`` (default 1e-4, TRL's value)
    is added to the std, outside the square root. A group of identical rewards has advantage 0 for every member
    (0 / eps). With ``group_size == 1`` (or a batch of one reward for ``"batch"``) the std is undefined and is
    taken as 0, as TRL does; centring already makes every advantage 0. NaN rewards are not handled: fill or drop
    unscorable completions upstream.

    Shapes: ``rewards`` ``[B * G]`` (the ``G`` completions of a prompt adjacent) or ``[B, G]``; returns the same.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"group_advantages: scale_rewards={scale_rewards!r} is not one of {SCALE_REWARDS}")
    grouped = as_groups("group_advantages", rewards, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "none":
        return centred.reshape(rewards.shape)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
    else:
        std = grouped.std() if grouped.numel() > 1 else torch.zeros((), dtype=grouped.dtype, device=grouped.device)
    return (centred / (std + eps)).reshape(rewards.shape)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages: each reward minus the mean of the other rewards of its group.

        A_i = R_i - (1 / (G - 1)) * sum_{j != i} R_j  =  G / (G - 1) * (R_i - mean_group(R))

    Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al. 2024, "Back to Basics:
    Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs". The baseline of sample i
    does not depend on R_i, so the policy-gradient estimate stays unbiased. Needs ``group_size >= 2``. A group of
    identical rewards has advantage 0 throughout. No normalisation (whiten upstream if wanted).

    Shapes: ``rewards`` ``[B * G]`` or ``[B, G]``; returns the same.
    """
    if group_size < 2:
        raise ValueError(
            f"rloo_advantages: group_size={group_size} must be >= 2 (the leave-one-out baseline of a completion is "
            "the mean reward of the other completions of its prompt)"
        )
    grouped = as_groups("rloo_advantages", rewards, group_size)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(rewards.shape)


def decoupled_group_advantages(rewards: torch.Tensor, weights: torch.Tensor, group_size: int, eps: float = 1e-4
                               ) -> torch.Tensor:
    """GDPO's advantages of several rewards: each reward normalised within its group, the weighted sum normalised
    over the batch.

        n_ik = (R_ik - mean_group(R_k)) / (std_group(R_k) + eps)        S_i = sum_k w_k n_ik
        A_i  = (S_i - mean_batch(S)) / (std_batch(S) + eps)

    "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL Optimization" (arXiv
    2601.05242, 2026): summing first (``sum_then_normalize``, :func:`group_advantages` of the weighted sum) lets
    the reward with the widest spread decide every advantage; normalising each reward in its group first keeps
    every reward's ranking in play. TRL 1.16's ``multi_objective_aggregation="normalize_then_sum"``, same
    definition: unbiased stds (divisor ``n - 1``; taken as 0 for a group of one or a batch of one), ``eps`` added
    outside the square root.

    Shapes: ``rewards`` ``[B * G, K]`` (K rewards of each completion, the ``G`` completions of a prompt adjacent),
    ``weights`` ``[K]``; returns ``[B * G]``.
    """
    if rewards.dim() != 2 or weights.shape != rewards.shape[1:]:
        raise ValueError(f"decoupled_group_advantages: rewards must be [B * G, K] and weights [K]; got "
                         f"{tuple(rewards.shape)} and {tuple(weights.shape)}")
    count = rewards.shape[1]
    as_groups("decoupled_group_advantages", rewards[:, 0], group_size)  # checks B * G against group_size
    grouped = rewards.view(-1, group_size, count)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
    total = ((centred / (std + eps)).reshape(-1, count) * weights.to(rewards.dtype)).sum(-1)
    spread = total.std() if total.numel() > 1 else torch.zeros((), dtype=total.dtype, device=total.device)
    return (total - total.mean()) / (spread + eps)


def outcome_token_rewards(scores: torch.Tensor, penalty: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards of an outcome reward: the per-token ``penalty`` everywhere, plus the completion's score on
    its last completion token.

        r_t = penalty_t + [t is the last masked token of the row] * score

    The reward of PPO-RLHF (Ziegler et al. 2019), REINFORCE++ (Hu 2025) and ReMax (Li et al. 2023), whose penalty is
    ``-kl_coef * (old_t - ref_t)`` (k1, :func:`kl_penalty`) or 0. Shapes: ``scores`` ``[B]``; ``penalty`` and
    ``mask`` ``[B, T]`` (bool mask); returns ``[B, T]`` in ``penalty``'s dtype.
    """
    last = mask.long().cumsum(-1).eq(mask.sum(-1, keepdim=True)) & mask
    return torch.where(last, penalty + scores[:, None].to(penalty.dtype), penalty)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE's return-to-go over the masked completion tokens t_1 < ... < t_n of each row:

        G_i = sum_{l >= 0} gamma^l * r_{t_{i+l}}

    which is :func:`gae` with zero values and ``lam = 1`` (every TD error is then the reward). Masked-out positions
    are skipped and come back as 0. Shapes: ``rewards``, ``mask`` ``[B, T]``; returns ``[B, T]``.
    """
    return gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)[0]


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++'s advantages: the return-to-go of per-token rewards, whitened over every token of the batch.

        A_t = (G_t - mean) / std          mean, std over all masked tokens of the batch

    Hu 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models" (OpenRLHF's
    ``--advantage_estimator reinforce``; ``reinforce_baseline`` when the scores are first centred on their group's
    mean): the rewards are :func:`outcome_token_rewards` with the k1 KL penalty, the returns
    :func:`discounted_returns`, the normalisation global (the batch, not the group), which is what makes it robust
    to the prompt's difficulty. The whitening is :func:`whiten` (unbiased variance, 1e-8 inside the square root);
    OpenRLHF divides by the population variance clamped at 1e-8, a factor ``sqrt(n / (n - 1))`` apart for ``n``
    tokens. Shapes: ``rewards``, ``mask`` ``[B, T]``; returns ``[B, T]``, 0 outside the mask.
    """
    return whiten(discounted_returns(rewards, mask, gamma), mask)


def greedy_baseline_advantages(rewards: torch.Tensor, mask: torch.Tensor, baseline: torch.Tensor,
                               gamma: float = 1.0) -> torch.Tensor:
    """ReMax's advantages: each token's return-to-go minus the reward of the greedy completion of its prompt.

        A_t = G_t - R(x, y_greedy)

    Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large
    Language Models" (Algorithm 1; as verl's ``remax`` estimator, the KL penalty, when any, is in the per-token
    rewards and not in the baseline). Shapes: ``rewards``, ``mask`` ``[B, T]``, ``baseline`` ``[B]``; returns
    ``[B, T]``, 0 outside the mask.
    """
    mask = token_mask("greedy_baseline_advantages", mask, rewards=rewards)
    returns = discounted_returns(rewards, mask, gamma)
    return torch.where(mask, returns - baseline[:, None].to(returns.dtype), torch.zeros_like(returns))
