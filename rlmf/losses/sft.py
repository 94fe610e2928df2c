"""Supervised fine-tuning: the token-level negative log-likelihood of the completions."""

from __future__ import annotations

from typing import Optional

import torch

from rlmf.losses.registry import LossResult, register_loss
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


@register_loss("sft_chosen", data="paired", reference=False)
def sft_chosen(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor,
               weights: Optional[torch.Tensor] = None) -> LossResult:
    """SFT on the chosen completions of preference pairs: the SFT loss of the rows that won.

        loss = -sum(policy_chosen_logps) / sum(chosen_lengths)

    The generation loss of MPO (Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal Large Language
    Models via Mixed Preference Optimization") and TRL's ``sft`` loss type inside its DPO trainer: the token mean
    of the chosen completions' negative log-likelihood, so that a preference loss can be mixed with it
    (:mod:`rlmf.losses.mixture`); the rejected completions are not used. No hyperparameters.

    Inputs: ``policy_chosen_logps`` [B], log-probs summed over each chosen completion's tokens; ``chosen_lengths``
    [B], their token counts. Metric ``nll`` is the (detached) loss.
    """
    check_batch("sft_chosen", policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths)
    loss = token_mean_nll(policy_chosen_logps, chosen_lengths, weights)
    return LossResult(loss=loss, metrics={"nll": loss.detach()})
