"""Supervised fine-tuning: the token-level negative log-likelihood of the completions."""

from __future__ import annotations

from typing import Optional

import torch

from rlmf.losses import LossResult, register_loss
from rlmf.losses._common import check_batch, token_mean_nll


@register_loss("sft", data="sft", reference=False)
def sft(policy_logps: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor] = None) -> LossResult:
    """Mean negative log-likelihood per completion token over the batch.

        loss = -sum(policy_logps) / sum(lengths)

    The maximum-likelihood objective of causal language modelling (Radford et al. 2018, "Improving Language
    Understanding by Generative Pre-Training"), restricted to completion tokens. Every token in the batch weighs
    the same, as in a cross-entropy over the flattened tokens. No hyperparameters.

    Inputs: ``policy_logps`` [B], log-probs summed over each completion's tokens; ``lengths`` [B], the completion
    token counts. Metric ``nll`` is the (detached) loss.
    """
    check_batch("sft", policy_logps=policy_logps, lengths=lengths)
    loss = token_mean_nll(policy_logps, lengths, weights)
    return LossResult(loss=loss, metrics={"nll": loss.detach()})
