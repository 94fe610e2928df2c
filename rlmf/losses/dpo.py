"""The DPO family: losses of the policy-vs-reference log-ratio margin of a preference pair.

All take four [B] tensors of sequence log-probs summed over completion tokens (``policy_chosen_logps``,
``policy_rejected_logps``, ``reference_chosen_logps``, ``reference_rejected_logps``), IPO also the completion token
counts ``chosen_lengths`` and ``rejected_lengths`` ([B]). With the log-ratios

    rho_c = pi_c - ref_c        rho_r = pi_r - ref_r        margin = rho_c - rho_r

every loss here logs the implicit rewards ``beta * rho_c`` and ``beta * rho_r`` as ``rewards/chosen`` and
``rewards/rejected`` (batch means), their difference as ``rewards/margins`` and the fraction of pairs with
``rho_c > rho_r`` as ``rewards/accuracies``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rlmf.losses.registry import LossResult, register_loss
from rlmf.losses._common import (
    check_batch,
    check_fraction,
    implicit_reward_result,
    mean_token_logps,
    paired_log_ratios,
    weighted_mean,
)


@register_loss("dpo", data="paired", reference=True)
def dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
) -> LossResult:
    """Direct Preference Optimization: logistic regression of the preference on the implicit reward margin.

        loss = mean(-log sigmoid(beta * margin))

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", eq. 7.
    ``beta`` (default 0.1) is the strength of the implicit KL penalty to the reference.
    Inputs: four [B] summed log-probs (see the module docstring).
    """
    rho_c, rho_r = paired_log_ratios(
        "dpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    per_pair = -F.logsigmoid(beta * (rho_c - rho_r))
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, policy_chosen_logps,
                                  policy_rejected_logps)


@register_loss("cdpo", data="paired", reference=True)
def cdpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> LossResult:
    """Conservative DPO: DPO against labels that are wrong with probability ``eps = label_smoothing``.

        loss = mean(-(1 - eps) * log sigmoid(beta * margin) - eps * log sigmoid(-beta * margin))

    Mitchell 2023, "A note on DPO with noisy preferences and relationship to IPO". Unlike DPO its minimiser is a
    finite margin (``log((1 - eps) / eps) / beta``), so the policy stops pushing pairs apart once they are
    separated. Defaults: beta 0.1, label_smoothing 0.1 (the note fixes no value; 0.1 is this project's choice of a
    modest assumed flip rate, and eps = 0 is plain DPO). ``label_smoothing`` must lie in [0, 0.5].
    Inputs: four [B] summed log-probs (see the module docstring).
    """
    check_fraction("cdpo", "label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=True)
    rho_c, rho_r = paired_log_ratios(
        "cdpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (rho_c - rho_r)
    per_pair = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, policy_chosen_logps,
                                  policy_rejected_logps)


@register_loss("robust", data="paired", reference=True)
def robust(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> LossResult:
    """Robust DPO: the unbiased DPO loss under labels flipped with probability ``eps = label_smoothing``.

        loss = mean((-(1 - eps) * log sigmoid(beta * margin) + eps * log sigmoid(-beta * margin)) / (1 - 2 eps))

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback". Its
    expectation over the label noise equals the DPO loss on the clean labels (cDPO's does not). Defaults: beta 0.1,
    label_smoothing 0.1 (the flip rate is data-dependent and the paper fixes no default; 0.1 is this project's
    choice of a modest rate, and eps = 0 is plain DPO). ``label_smoothing`` must
    lie in [0, 0.5): at 0.5 the labels carry no information and the estimator divides by zero.
    Inputs: four [B] summed log-probs (see the module docstring).
    """
    check_fraction("robust", "label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
    rho_c, rho_r = paired_log_ratios(
        "robust", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (rho_c - rho_r)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    per_pair = (clean - flipped) / (1 - 2 * label_smoothing)
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, policy_chosen_logps,
                                  policy_rejected_logps)


@register_loss("hinge", data="paired", reference=True)
def hinge(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
) -> LossResult:
    """SLiC's hinge loss on the DPO margin: zero once the margin exceeds ``1 / beta``.

        loss = mean(relu(1 - beta * margin))

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (the calibration loss), in the
    log-ratio form of Liu et al. 2024, "Statistical Rejection Sampling Improves Preference Optimization". The
    hinge's margin in log-ratio units is ``1 / beta``; default beta 0.1, as for DPO (TRL's default too).
    Inputs: four [B] summed log-probs (see the module docstring).
    """
    rho_c, rho_r = paired_log_ratios(
        "hinge", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    per_pair = torch.relu(1 - beta * (rho_c - rho_r))
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, policy_chosen_logps,
                                  policy_rejected_logps)


@register_loss("ipo", data="paired", reference=True)
def ipo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
) -> LossResult:
    """Identity Preference Optimization: a squared loss that regresses the per-token margin onto ``1 / (2 beta)``.

        loss = mean((rho_c / chosen_lengths - rho_r / rejected_lengths - 1 / (2 beta)) ** 2)

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17, with
    ``beta`` as the paper's tau (default 0.1). Each log-ratio is divided by its completion length: summed
    log-ratios grow with length, which would make the target ``1 / (2 beta)`` mean different things for short and
    long completions. ``chosen_lengths`` and ``rejected_lengths`` are [B] token counts (0 is treated as 1).
    Inputs: four [B] summed log-probs (see the module docstring) and the two [B] lengths.
    """
    if beta <= 0:
        raise ValueError(f"ipo: beta={beta} must be > 0 (the target margin is 1 / (2 beta))")
    rho_c, rho_r = paired_log_ratios(
        "ipo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    check_batch(
        "ipo",
        policy_chosen_logps=policy_chosen_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    per_token_margin = mean_token_logps(rho_c, chosen_lengths) - mean_token_logps(rho_r, rejected_lengths)
    per_pair = (per_token_margin - 1 / (2 * beta)) ** 2
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, policy_chosen_logps,
                                  policy_rejected_logps)
