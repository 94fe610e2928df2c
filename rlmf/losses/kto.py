"""KTO: a prospect-theoretic loss for unpaired thumbs-up / thumbs-down data."""

from __future__ import annotations

from typing import Optional

import torch

from rlmf.losses.registry import LossResult, register_loss
from rlmf.losses._common import check_batch, unpaired_metrics, weighted_mean


@register_loss("kto", data="unpaired", reference=True)
def kto(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    reference_kl_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossResult:
    """Kahneman-Tversky Optimization: push each completion's log-ratio above (desirable) or below (undesirable)
    a reference point ``z`` estimated from the batch.

        r = policy_logps - reference_logps
        z = max(0, mean(policy_kl_logps - reference_kl_logps))            (detached)
        loss_i = desirable_weight   * (1 - sigmoid(beta * (r_i - z)))     if desirable_i
                 undesirable_weight * (1 - sigmoid(beta * (z - r_i)))     otherwise
        loss = mean_i(loss_i)

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7. ``z`` estimates
    KL(pi || ref) from completions scored under mismatched prompts (row i's prompt with another row's completion),
    so it carries no signal about the completions being judged; it is detached because the paper treats it as a
    reference point, not a quantity to optimise, and clamped at 0 because a KL cannot be negative. In multi-process
    training pass the all-gathered KL log-probs if ``z`` should be the global mean. Defaults: beta 0.1 and both
    weights 1.0; the paper suggests choosing them so ``desirable_weight * n_desirable / (undesirable_weight *
    n_undesirable)`` lies in [1, 4/3].

    Inputs, all [B]: ``policy_logps`` and ``reference_logps`` (summed over completion tokens), ``desirable``
    (bool), ``policy_kl_logps`` and ``reference_kl_logps`` (the mismatched completions; any length, here B).
    Metrics: ``kl`` (= z), ``rewards/chosen`` and ``rewards/rejected`` (mean ``beta * r`` over desirable and
    undesirable rows, each only when present) and ``rewards/margins`` (when both are).
    """
    check_batch("kto", policy_logps=policy_logps, reference_logps=reference_logps, desirable=desirable)
    check_batch("kto", policy_kl_logps=policy_kl_logps, reference_kl_logps=reference_kl_logps)
    if desirable.dtype != torch.bool:
        raise ValueError(f"kto: desirable must be a bool tensor, got {desirable.dtype}")
    kl = (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)
    log_ratios = policy_logps - reference_logps
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (log_ratios - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - log_ratios)))
    loss = weighted_mean(torch.where(desirable, desirable_losses, undesirable_losses), weights)
    metrics = unpaired_metrics(beta * log_ratios, desirable)
    metrics["kl"] = kl
    return LossResult(loss=loss, metrics=metrics)
