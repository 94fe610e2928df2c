"""Reference-free pairwise losses on the policy's own log-probs: SimPO and CPO."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rlmf.losses.registry import LossResult, register_loss
from rlmf.losses._common import check_batch, mean_token_logps, preference_metrics, token_mean_nll, weighted_mean


@register_loss("simpo", data="paired", reference=False)
def simpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> LossResult:
    """Simple Preference Optimization: a Bradley-Terry loss on length-normalised log-probs with a target margin.

        loss = mean(-log sigmoid(beta * (pi_c / chosen_lengths - pi_r / rejected_lengths) - gamma))

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward". The implicit
    reward is ``beta`` times the mean token log-prob; ``gamma`` is the reward margin the chosen completion must
    clear. Defaults: beta 2.0, gamma 1.0 (the paper's base-model setting: beta 2.0 with gamma / beta = 0.5).

    Inputs: ``policy_chosen_logps``, ``policy_rejected_logps`` [B], log-probs summed over completion tokens;
    ``chosen_lengths``, ``rejected_lengths`` [B], completion token counts. Rewards are ``beta * mean log-prob``.
    """
    check_batch(
        "simpo",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    chosen_rewards = beta * mean_token_logps(policy_chosen_logps, chosen_lengths)
    rejected_rewards = beta * mean_token_logps(policy_rejected_logps, rejected_lengths)
    loss = weighted_mean(-F.logsigmoid(chosen_rewards - rejected_rewards - gamma), weights)
    metrics = preference_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
    return LossResult(loss=loss, metrics=metrics)


@register_loss("cpo", data="paired", reference=False)
def cpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
) -> LossResult:
    """Contrastive Preference Optimization: reference-free DPO plus a behaviour-cloning NLL on the chosen side.

        loss = mean(-log sigmoid(beta * (pi_c - pi_r))) + nll_weight * nll
        nll = -sum(policy_chosen_logps) / sum(chosen_lengths)

    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine
    Translation" (the DPO loss with the reference dropped, plus the NLL that keeps the policy on the
    preferred data). Defaults: beta 0.1 and nll_weight 1.0, the paper's unweighted sum. ``nll`` is the token-mean
    NLL of the chosen completions over the batch (as :func:`rlmf.losses.sft.sft`).

    Inputs: ``policy_chosen_logps``, ``policy_rejected_logps`` [B], log-probs summed over completion tokens;
    ``chosen_lengths`` [B], chosen completion token counts. Rewards are ``beta * summed log-prob``; metric ``nll``.
    """
    check_batch(
        "cpo",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
    )
    chosen_rewards = beta * policy_chosen_logps
    rejected_rewards = beta * policy_rejected_logps
    nll = token_mean_nll(policy_chosen_logps, chosen_lengths, weights)
    loss = weighted_mean(-F.logsigmoid(chosen_rewards - rejected_rewards), weights) + nll_weight * nll
    metrics = preference_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
    metrics["nll"] = nll.detach()
    return LossResult(loss=loss, metrics=metrics)
