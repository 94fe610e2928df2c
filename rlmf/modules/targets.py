"""What the online trainer feeds each objective: a scored rollout turned into the loss's per-completion targets.

Every online loss names its advantage estimator when it registers (``register_loss(..., targets="group")``);
:data:`ESTIMATORS` maps that name to the function that builds the targets from a :class:`Scored` rollout and to
what the trainer must know about it (whether it compares a prompt's completions, whether the KL is in its reward,
whether it reads the sampling log-probs, whether it needs a greedy completion). So an objective that reuses an
estimator is one loss function and one config; :data:`TARGETS`, :data:`GROUP_OBJECTIVES` and
:data:`KL_IN_REWARD` follow from the registry.

The estimators (each calls the pure functions of :mod:`rlmf.losses.advantages`):

- ``group`` (``grpo``, ``gspo``, ``cispo``): group-relative advantages (``scale_rewards``), or GDPO's decoupled
  normalisation of several rewards (``multi_objective_aggregation="normalize_then_sum"``);
- ``leave_one_out`` (``rloo``): leave-one-out advantages of the reward minus ``kl_coef`` times the completion's
  summed k1 KL (:func:`~rlmf.losses.reinforce.rloo_rewards`);
- ``gae`` (``ppo``): per-token rewards ``-kl_coef * (old_t - ref_t)`` plus the score at the last token, GAE with
  the value head's old values (``gamma``, ``lam``), advantages whitened over the rollout's tokens;
- ``reinforce_pp`` / ``reinforce_pp_baseline``: the same per-token rewards (the scores first centred on their
  group's mean for the baseline variant), their return-to-go (``gamma``) whitened over the rollout's tokens;
- ``greedy_baseline`` (``remax``): the return-to-go minus the reward of the prompt's greedy completion;
- ``best_worst`` (``online_dpo``): the best and the worst valid completion of each prompt as a pair.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from rlmf.losses import LOSSES, get_loss
from rlmf.losses.advantages import (
    decoupled_group_advantages,
    gae,
    greedy_baseline_advantages,
    group_advantages,
    kl_penalty,
    outcome_token_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)
from rlmf.losses.online_dpo import best_worst_preferences
from rlmf.losses.reinforce import rloo_rewards
from rlmf.modules.rollouts import Rollout

Targets = Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]


@dataclass
class Scored:
    """A rollout with its rewards, what the estimators read.

    Attributes:
        rows: the rollout (``N = B * G`` rows).
        scores: ``[N]`` float32 rewards; an invalid row's score is replaced by the mean of its group's valid scores,
            so it moves neither the group's mean nor the others' baselines much (its own target is then zeroed).
        valid: ``[N]`` bool, rows the reward could score.
        reference_logps: ``[N, T]`` the reference's per-token log-probs of the sampled tokens, or None.
        group_size: ``G``; kl_coef: the current KL coefficient (PPO, RLOO, REINFORCE++, ReMax).
        member_scores, member_weights: ``[N, K]`` the scores of each of an ensemble reward's K members (invalid rows
            filled like ``scores``) and ``[K]`` its weights, for GDPO; None for a single reward.
        greedy_scores: ``[N]`` the reward of the greedy completion of each row's prompt, NaN where it could not be
            scored (ReMax); None otherwise.
    """

    rows: Rollout
    scores: torch.Tensor
    valid: torch.Tensor
    reference_logps: Optional[torch.Tensor]
    group_size: int
    kl_coef: float
    member_scores: Optional[torch.Tensor] = None
    member_weights: Optional[torch.Tensor] = None
    greedy_scores: Optional[torch.Tensor] = None

    @functools.cached_property
    def sequence_kl(self) -> Optional[torch.Tensor]:
        """``[N]`` summed k1 KL ``sum_t (old_t - ref_t)`` of each completion, or None without a reference; computed
        once. (A single on-policy update fills ``rows.old_logps`` during the update: read this after it.)"""
        if self.reference_logps is None:
            return None
        return kl_penalty(self.rows.old_logps, self.reference_logps, "k1", mask=self.rows.mask).sum(-1)


def _zero_invalid(s: Scored, advantages: torch.Tensor) -> torch.Tensor:
    return torch.where(s.valid, advantages, torch.zeros_like(advantages))


def _group_targets(s: Scored, h) -> Targets:
    if h.multi_objective_aggregation == "normalize_then_sum":
        members = s.member_scores if s.member_scores is not None else s.scores[:, None]
        weights = s.member_weights if s.member_weights is not None else torch.ones(1, device=members.device)
        return {"advantages": _zero_invalid(s, decoupled_group_advantages(members, weights, s.group_size))}, {}
    advantages = group_advantages(s.scores, s.group_size, scale_rewards=h.scale_rewards)
    return {"advantages": _zero_invalid(s, advantages)}, {}


def _rloo_targets(s: Scored, h) -> Targets:
    kl, scores, stats = s.sequence_kl, s.scores, {}
    if kl is not None:
        scores = rloo_rewards(scores, kl, torch.zeros_like(kl), s.kl_coef)
        stats = _penalty_stats(s, kl)
    return {"advantages": _zero_invalid(s, rloo_advantages(scores, s.group_size))}, stats


def _token_rewards(s: Scored, mask: torch.Tensor, scores: torch.Tensor):
    """Per-token rewards ``-kl_coef * (old_t - ref_t)`` (0 without a reference) plus ``scores`` at the last token,
    and the penalty's metrics."""
    rows = s.rows
    kl = kl_penalty(rows.old_logps, s.reference_logps, "k1", mask=mask) if s.reference_logps is not None else None
    penalty = -s.kl_coef * kl if kl is not None else torch.zeros_like(rows.old_logps)
    stats = _penalty_stats(s, s.sequence_kl) if kl is not None else {}
    return outcome_token_rewards(scores, penalty, mask), stats


def _ppo_targets(s: Scored, h) -> Targets:
    rows = s.rows
    mask = rows.mask & s.valid[:, None]  # an unscored completion takes no part at all
    zero = torch.zeros((), dtype=rows.old_logps.dtype, device=rows.old_logps.device)
    rewards, stats = _token_rewards(s, mask, s.scores)
    advantages, returns = gae(rewards, rows.old_values, mask, gamma=h.gamma, lam=h.lam)
    advantages = whiten(advantages, mask)
    return {"advantages": advantages, "returns": returns, "old_values": torch.where(mask, rows.old_values, zero),
            "mask": mask}, stats


def _reinforce_pp_targets(s: Scored, h, baseline: bool = False) -> Targets:
    mask = s.rows.mask & s.valid[:, None]
    scores = group_advantages(s.scores, s.group_size, scale_rewards="none") if baseline else s.scores
    rewards, stats = _token_rewards(s, mask, scores)
    return {"advantages": reinforce_pp_advantages(rewards, mask, gamma=h.gamma), "mask": mask}, stats


def _greedy_baseline_targets(s: Scored, h) -> Targets:
    greedy_valid = torch.isfinite(s.greedy_scores)
    mask = s.rows.mask & (s.valid & greedy_valid)[:, None]
    rewards, stats = _token_rewards(s, mask, s.scores)
    baseline = torch.where(greedy_valid, s.greedy_scores, torch.zeros_like(s.greedy_scores))
    stats["greedy_reward"] = s.greedy_scores[greedy_valid].mean() if greedy_valid.any() else torch.tensor(float("nan"))
    return {"advantages": greedy_baseline_advantages(rewards, mask, baseline, gamma=h.gamma), "mask": mask}, stats


def _online_dpo_targets(s: Scored, h) -> Targets:
    valid = s.valid & ~s.rows.clipped if h.mask_truncated_completions else s.valid  # a truncated row is never paired
    return {"preferences": best_worst_preferences(s.scores, valid, s.group_size)}, {}


def _penalty_stats(s: Scored, kl: torch.Tensor) -> Dict[str, torch.Tensor]:
    """TRL's PPO/RLOO objective metrics over the valid rows: the KL penalty and the score plus it."""
    valid = s.valid if s.valid.any() else torch.ones_like(s.valid)
    non_score = -s.kl_coef * kl[valid]
    return {"objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (s.scores[valid] + non_score).mean()}


@dataclass(frozen=True)
class Estimator:
    """How the trainer builds an objective's targets, and what that asks of the rollout.

    Attributes:
        build: ``(scored rollout, the module's hparams) -> (per-row loss inputs, metrics)``. The per-row tensors are
            ``[N]`` or ``[N, T]`` and are cut into the same minibatches; a ``mask`` among them replaces the
            rollout's. Every other loss input comes from the rollout (``old_logps``, ``mask``, ``reference_logps``)
            or the policy's forward (``policy_logps``, ``values``, ``entropies``).
        group: it compares the completions of a prompt, so ``num_generations >= 2``.
        kl_in_reward: the reward carries ``kl_coef`` times the KL to the reference (``kl_target`` applies).
        reads_old_logps: it reads the sampling log-probs before the update, so the rollout must score them.
        greedy: it needs the greedy completion of each prompt, scored by the reward.
    """

    build: Callable[[Scored, Any], Targets]
    group: bool
    kl_in_reward: bool
    reads_old_logps: bool
    greedy: bool = False


ESTIMATORS: Dict[str, Estimator] = {
    "group": Estimator(_group_targets, group=True, kl_in_reward=False, reads_old_logps=False),
    "leave_one_out": Estimator(_rloo_targets, group=True, kl_in_reward=True, reads_old_logps=True),
    "gae": Estimator(_ppo_targets, group=False, kl_in_reward=True, reads_old_logps=True),
    "reinforce_pp": Estimator(_reinforce_pp_targets, group=False, kl_in_reward=True, reads_old_logps=True),
    "reinforce_pp_baseline": Estimator(functools.partial(_reinforce_pp_targets, baseline=True), group=True,
                                       kl_in_reward=True, reads_old_logps=True),
    "greedy_baseline": Estimator(_greedy_baseline_targets, group=False, kl_in_reward=True, reads_old_logps=True,
                                 greedy=True),
    "best_worst": Estimator(_online_dpo_targets, group=True, kl_in_reward=False, reads_old_logps=False),
}


def estimator_of(loss_name: str) -> Estimator:
    """The estimator the online loss ``loss_name`` registered (``register_loss(..., targets=...)``)."""
    name = get_loss(loss_name).targets
    if name not in ESTIMATORS:
        raise ValueError(f"loss {loss_name!r} names the estimator targets={name!r}; known: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


ONLINE = tuple(sorted(name for name, fn in LOSSES.items() if fn.data_format == "online"))
# Per objective: (the rollout with its rewards, the module's hparams) -> (per-row loss inputs, metrics).
TARGETS: Dict[str, Callable[[Scored, Any], Targets]] = {name: estimator_of(name).build for name in ONLINE}
# Objectives that compare the completions of a prompt with each other: they need num_generations >= 2.
GROUP_OBJECTIVES = tuple(name for name in ONLINE if estimator_of(name).group)
# Objectives whose reward carries the KL to the reference (kl_coef), rather than the loss.
KL_IN_REWARD = tuple(name for name in ONLINE if estimator_of(name).kl_in_reward)
# Objectives whose advantages are group-normalised rewards: scale_rewards and multi_objective_aggregation apply.
GROUP_NORMALISED = tuple(name for name in ONLINE if get_loss(name).targets == "group")


def needs_reference(loss_name: str, kl_coef: float) -> bool:
    """Whether training ``loss_name`` needs reference log-probs: its objective takes them (GRPO's k3 KL, online
    DPO's log-ratios), or its reward carries the KL (PPO, RLOO, REINFORCE++, ReMax with ``kl_coef != 0``)."""
    return get_loss(loss_name).requires_reference or (estimator_of(loss_name).kl_in_reward and kl_coef != 0)
