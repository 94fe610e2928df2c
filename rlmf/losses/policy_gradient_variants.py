"""GRPO's successors that change the importance weight: GSPO (one ratio per completion) and CISPO (clipped,
stop-gradient weights on a REINFORCE objective), as pure functions.

Both train on group-relative advantages (the trainer's ``group`` estimator, :mod:`rlmf.modules.targets`; so
``algo.online.scale_rewards`` and ``multi_objective_aggregation`` apply) and take the entropy options of
:func:`rlmf.losses.policy_gradient.entropy_terms`. Inputs, masks and metric names follow
:mod:`rlmf.losses.policy_gradient`. Neither paper uses a KL term, so neither takes a reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from rlmf.losses.registry import LossResult, register_loss
from rlmf.losses.advantages import masked_mean, token_mask
from rlmf.losses.policy_gradient import (
    check_clip,
    check_eps_max,
    clip_metrics,
    clipped_surrogate,
    entropy_terms,
    online_check,
)


def _sequence_advantages(name: str, advantages: torch.Tensor, mask: torch.Tensor) -> None:
    if advantages.shape != mask.shape[:1]:
        raise ValueError(f"{name}: advantages must have shape [B] = [{mask.shape[0]}], got {tuple(advantages.shape)}")


@register_loss("gspo", data="online", reference=False, targets="group", check=online_check("gspo"))
def gspo(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropies: Optional[torch.Tensor] = None,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    delta: Optional[float] = None,
    top_entropy_quantile: float = 1.0,
    entropy_coef: float = 0.0,
) -> LossResult:
    """GSPO: the clipped surrogate on one importance ratio per completion, the geometric mean of its token ratios.

        s_i  = (pi(o_i | x) / pi_old(o_i | x))^(1 / |o_i|)  =  exp(1/|o_i| sum_t (logp_t - old_t))
        loss = 1/B sum_i -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

    Zheng et al. 2025, "Group Sequence Policy Optimization": the reward is given to the whole sequence, so
    the off-policy correction and the clipping are per sequence too; token ratios' noise no longer accumulates.
    ``A_i`` is the group-relative advantage. A completion with no tokens contributes 0 and counts in the mean.
    TRL 1.16's ``importance_sampling_level="sequence"`` with ``loss_type="grpo"`` and beta 0 (its GSPO recipe);
    verl's ``policy_loss.loss_mode=gspo`` (which computes the same gradient through ``sg[s_i] pi / sg[pi]``).

    Defaults: eps_low 0.0003, eps_high 0.0004, the paper's clip range (section 5.1: a sequence ratio's range is
    orders of magnitude tighter than a token's). Options, off by default as in GRPO's: ``delta`` None caps ``s_i``
    in the unclipped term; ``top_entropy_quantile`` 1.0 weighs completion i's term by the fraction of its tokens
    kept (TRL's broadcast of the sequence term over the kept tokens); ``entropy_coef`` 0.0 subtracts that times the
    mean entropy.

    Inputs: ``policy_logps``, ``old_logps``, ``mask`` ``[B, T]``; ``advantages`` ``[B]``; optional ``entropies``
    ``[B, T]``. Metrics (TRL's, per completion): ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean`` (fractions of completions), ``clip_ratio/low_min``, ``clip_ratio/high_max``;
    ``entropy``.
    """
    check_clip("gspo", eps_low, eps_high, delta)
    mask = token_mask("gspo", mask, policy_logps=policy_logps, old_logps=old_logps)
    _sequence_advantages("gspo", advantages, mask)
    keep, bonus, metrics = entropy_terms("gspo", entropies, mask, top_entropy_quantile, entropy_coef)
    zero = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
    log_ratio = torch.where(mask, policy_logps - old_logps, zero).sum(-1)
    ratio = torch.exp(log_ratio / mask.sum(-1).clamp(min=1).to(policy_logps.dtype))
    per_sequence, low, high = clipped_surrogate(ratio, advantages.to(ratio.dtype), eps_low, eps_high, delta)
    counted = mask if keep is None else keep
    per_token = torch.where(counted, per_sequence[:, None].expand(mask.shape), zero)
    loss = masked_mean(per_token, mask, dim=1).mean()
    if bonus is not None:
        loss = loss - bonus
    metrics.update(clip_metrics(low, high, None, ratio.dtype))
    return LossResult(loss=loss, metrics=metrics)


@register_loss("cispo", data="online", reference=False, targets="group", check=online_check("cispo"))
def cispo(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropies: Optional[torch.Tensor] = None,
    *,
    eps_max: float = 5.0,
    top_entropy_quantile: float = 1.0,
    entropy_coef: float = 0.0,
) -> LossResult:
    """CISPO: REINFORCE on every token, weighted by its importance ratio clipped from above and held constant.

        w_t  = sg(min(r_t, eps_max))                                             r_t = exp(logp_t - old_t)
        loss = -1/(sum_i |o_i|) sum_i sum_t w_t A_i logp_t

    MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention" (section 3.1):
    PPO's clip zeroes the gradient of clipped tokens, and the rare tokens that fork a reasoning path are the ones
    clipped; clipping the weight instead keeps every token's gradient ``w_t A_i grad logp_t``. The paper states the
    clip as ``[1 - eps_low, 1 + eps_high]`` and sets no lower bound; the upper bound here is the cap itself, as in
    TRL 1.16's ``loss_type="cispo"`` (its ``epsilon_high``) and ScaleRL's eps_max (Khatri et al. 2025, "The Art of
    Scaling Reinforcement Learning Compute for LLMs"). ``A_i`` is the group-relative advantage; the sum over tokens
    is divided by the batch's token count (TRL: by the rollout's, the same with one minibatch per rollout).

    Defaults: eps_max 5.0 (the value TRL's documentation recommends from ScaleRL; MiniMax-M1 does not publish its
    own). Options as :func:`~rlmf.losses.policy_gradient.grpo_loss`'s, off by default: ``top_entropy_quantile`` 1.0,
    ``entropy_coef`` 0.0.

    Inputs: ``policy_logps``, ``old_logps``, ``mask`` ``[B, T]``; ``advantages`` ``[B]``; optional ``entropies``
    ``[B, T]``. Metrics: TRL's ``cispo_clip_ratio`` (token mean of ``r_t > eps_max`` where ``A_i > 0``) and
    ``entropy``.
    """
    check_eps_max("cispo", eps_max)
    mask = token_mask("cispo", mask, policy_logps=policy_logps, old_logps=old_logps)
    _sequence_advantages("cispo", advantages, mask)
    keep, bonus, metrics = entropy_terms("cispo", entropies, mask, top_entropy_quantile, entropy_coef)
    zero = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
    logps = torch.where(mask, policy_logps, zero)
    ratio = torch.exp(torch.where(mask, policy_logps - old_logps, zero)).detach()
    advantage = advantages[:, None].to(policy_logps.dtype)
    per_token = -torch.clamp(ratio, max=eps_max) * advantage * logps
    per_token = torch.where(mask if keep is None else keep, per_token, zero)
    loss = masked_mean(per_token, mask)
    if bonus is not None:
        loss = loss - bonus
    clipped = ((ratio > eps_max) & (advantage > 0)).to(policy_logps.dtype)
    metrics["cispo_clip_ratio"] = masked_mean(clipped, mask).detach()
    return LossResult(loss=loss, metrics=metrics)
