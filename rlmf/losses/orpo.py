"""ORPO: supervised fine-tuning plus an odds-ratio preference term, with no reference model."""

from __future__ import annotations

import math

from typing import Optional

import torch
import torch.nn.functional as F

from rlmf.losses.registry import LossResult, register_loss
from rlmf.losses._common import check_batch, mean_token_logps, preference_metrics, token_mean_nll, weighted_mean

_LOG_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends and finite everywhere.

    Two formulas, each used where it does not cancel (Maechler 2012, "Accurately Computing log(1 - exp(-|a|))"):
    ``log(-expm1(x))`` for ``x > -log 2`` and ``log1p(-exp(x))`` below. At ``x = 0`` the true value is ``-inf``
    (a sequence the model is certain of has infinite odds); ``x`` is clamped to ``-eps`` of its dtype first so
    the result stays finite (about -36 in float64, -16 in float32) and a fully memorised completion yields a
    saturated but finite odds ratio rather than NaN gradients.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    # Both branches are finite for every x <= -eps, so the branch torch.where discards cannot leak a NaN gradient.
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register_loss("orpo", data="paired", reference=False)
def orpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    odds_ratio_weight: float = 0.1,
) -> LossResult:
    """Odds Ratio Preference Optimization: chosen-completion NLL plus a weighted log-odds-ratio loss.

        l_c = policy_chosen_logps / chosen_lengths           (mean token log-prob, likewise l_r)
        log_odds(l) = l - log(1 - exp(l))                    (log of p / (1 - p) with p = exp(l))
        loss = nll - odds_ratio_weight * mean(log sigmoid(log_odds(l_c) - log_odds(l_r)))
        nll = -sum(policy_chosen_logps) / sum(chosen_lengths)

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model";
    ``odds_ratio_weight`` is the paper's lambda (default 0.1). ``nll`` is the token-mean NLL of the chosen
    completions over the batch (as :func:`rlmf.losses.sft.sft`); prompt tokens are not part of it.
    ``log(1 - exp(l))`` uses :func:`log1mexp`, finite for ``l`` from 0 down to -inf.

    Inputs: ``policy_chosen_logps``, ``policy_rejected_logps`` [B], log-probs summed over completion tokens;
    ``chosen_lengths``, ``rejected_lengths`` [B], completion token counts. Metrics: ``nll``, ``log_odds_ratio``
    (batch mean of ``log_odds(l_c) - log_odds(l_r)``), and rewards ``odds_ratio_weight * l`` (mean token log-prob
    scaled by lambda, as TRL logs them).
    """
    check_batch(
        "orpo",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    mean_chosen = mean_token_logps(policy_chosen_logps, chosen_lengths)
    mean_rejected = mean_token_logps(policy_rejected_logps, rejected_lengths)
    log_odds_ratio = (mean_chosen - log1mexp(mean_chosen)) - (mean_rejected - log1mexp(mean_rejected))
    nll = token_mean_nll(policy_chosen_logps, chosen_lengths, weights)
    loss = nll - odds_ratio_weight * weighted_mean(F.logsigmoid(log_odds_ratio), weights)
    metrics = preference_metrics(
        odds_ratio_weight * mean_chosen, odds_ratio_weight * mean_rejected, policy_chosen_logps, policy_rejected_logps
    )
    metrics["nll"] = nll.detach()
    metrics["log_odds_ratio"] = log_odds_ratio.detach().mean()
    return LossResult(loss=loss, metrics=metrics)
