"""APO: anchored preference optimisation, which says in which direction each side of a pair should move.

DPO only constrains the margin ``rho_c - rho_r``; both likelihoods may fall together. APO anchors each log-ratio
(``rho = pi - ref``, summed over completion tokens) to the reference: ``apo_zero`` for data whose chosen answers
are better than what the model produces now (raise chosen, lower rejected), ``apo_down`` for data whose chosen
answers are still worse than the model's own (lower both, rejected more).
"""

from __future__ import annotations

from typing import Optional

import torch

from rlmf.losses.registry import LossResult, register_loss
from rlmf.losses._common import (
    check_batch,
    paired_log_ratios,
    preference_metrics,
    unpaired_metrics,
    weighted_mean,
)


@register_loss("apo_zero", data="paired", reference=True)
def apo_zero(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
) -> LossResult:
    """APO-zero: raise the chosen log-ratio above 0 and push the rejected one below 0.

        loss = mean((1 - sigmoid(beta * rho_c)) + sigmoid(beta * rho_r))

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions: Addressing
    Underspecification in Alignment", eq. 7. Default beta 0.1.
    Inputs: four [B] summed log-probs ``policy_chosen_logps``, ``policy_rejected_logps``,
    ``reference_chosen_logps``, ``reference_rejected_logps``. Rewards are ``beta * rho``.
    """
    rho_c, rho_r = paired_log_ratios(
        "apo_zero", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    per_pair = (1 - torch.sigmoid(beta * rho_c)) + torch.sigmoid(beta * rho_r)
    metrics = preference_metrics(beta * rho_c, beta * rho_r, policy_chosen_logps, policy_rejected_logps)
    return LossResult(loss=weighted_mean(per_pair, weights), metrics=metrics)


@register_loss("apo_down", data="paired", reference=True)
def apo_down(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
) -> LossResult:
    """APO-down: lower the chosen log-ratio, and the rejected one further, keeping the chosen ahead.

        loss = mean(sigmoid(beta * rho_c) + (1 - sigmoid(beta * (rho_c - rho_r))))

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions: Addressing
    Underspecification in Alignment", eq. 8. Default beta 0.1.
    Inputs: four [B] summed log-probs ``policy_chosen_logps``, ``policy_rejected_logps``,
    ``reference_chosen_logps``, ``reference_rejected_logps``. Rewards are ``beta * rho``.
    """
    rho_c, rho_r = paired_log_ratios(
        "apo_down", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    per_pair = torch.sigmoid(beta * rho_c) + (1 - torch.sigmoid(beta * (rho_c - rho_r)))
    metrics = preference_metrics(beta * rho_c, beta * rho_r, policy_chosen_logps, policy_rejected_logps)
    return LossResult(loss=weighted_mean(per_pair, weights), metrics=metrics)


@register_loss("apo_zero_unpaired", data="unpaired", reference=True)
def apo_zero_unpaired(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
) -> LossResult:
    """APO-zero for thumbs-up / thumbs-down data: each side of :func:`apo_zero` applied to its own rows.

        rho = policy_logps - reference_logps
        loss_i = 1 - sigmoid(beta * rho_i)    if desirable_i
                 sigmoid(beta * rho_i)        otherwise
        loss = mean_i(loss_i)

    D'Oosterlinck et al. 2024 (as :func:`apo_zero`); the two terms of eq. 7 do not interact, so they apply to
    unpaired rows as they are. Unlike KTO there is no batch reference point: the anchor is the reference model
    itself. Default beta 0.1.
    Inputs, all [B]: ``policy_logps``, ``reference_logps`` (summed over completion tokens) and ``desirable``
    (bool). Rewards are ``beta * rho`` averaged over desirable (``rewards/chosen``) and undesirable
    (``rewards/rejected``) rows, each only when present.
    """
    check_batch("apo_zero_unpaired", policy_logps=policy_logps, reference_logps=reference_logps, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise ValueError(f"apo_zero_unpaired: desirable must be a bool tensor, got {desirable.dtype}")
    rho = policy_logps - reference_logps
    per_row = torch.where(desirable, 1 - torch.sigmoid(beta * rho), torch.sigmoid(beta * rho))
    return LossResult(loss=weighted_mean(per_row, weights), metrics=unpaired_metrics(beta * rho, desirable))
