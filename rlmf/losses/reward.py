"""Objectives for training the discriminator (reward model), as pure functions over scalar rewards.

These train the *discriminator*, not the generator, so they are deliberately not registered in ``LOSSES``.
Both return a :class:`~rlmf.losses.LossResult` whose metrics share one vocabulary so runs on either kind of
feedback read the same way:

- ``discriminator/loss``: the batch-mean loss.
- ``discriminator/accuracy``: fraction of examples the rewards already rank or classify correctly.
- ``discriminator/margin``: mean reward gap in the correct direction (bigger is more confident and right).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rlmf.losses._common import weighted_mean

from rlmf.losses.registry import LossResult


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    margin: float = 0.0,
) -> LossResult:
    """Bradley-Terry pairwise loss: ``-log sigmoid(r_chosen - r_rejected - margin)``, averaged over the batch.

    Under the Bradley-Terry model P(chosen > rejected) = sigmoid(r_chosen - r_rejected) (Bradley & Terry, 1952;
    the reward-model objective of Ouyang et al., 2022, "Training language models to follow instructions with
    human feedback"). A positive ``margin`` asks the chosen reward to exceed the rejected one by at least that
    much before the loss flattens out (Llama 2's margin loss, Touvron et al., 2023).

    Args:
        chosen_rewards: ``[B]`` rewards of the preferred completions.
        rejected_rewards: ``[B]`` rewards of the dispreferred completions, same prompts in the same order.
        weights: optional ``[B]`` per-pair weights (>= 0; the mean becomes ``sum(w l) / sum(w)``), e.g. the
            posterior probability that the chosen email's reply rate beats the rejected one's.
        margin: non-negative offset the reward gap must clear.

    Metrics: ``discriminator/accuracy`` is the fraction with ``r_chosen > r_rejected`` (ties count as wrong);
    ``discriminator/margin`` is the mean of ``r_chosen - r_rejected``.
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(
            "bradley_terry_loss: chosen_rewards and rejected_rewards must both be [B]; got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    reward_gap = chosen_rewards - rejected_rewards
    loss = weighted_mean(-F.logsigmoid(reward_gap - margin), weights)
    metrics = {
        "discriminator/loss": loss.detach(),
        "discriminator/accuracy": (reward_gap > 0).float().mean().detach(),
        "discriminator/margin": reward_gap.mean().detach(),
    }
    return LossResult(loss=loss, metrics=metrics)


def thumbs_loss(rewards: torch.Tensor, desirable: torch.Tensor, weights: Optional[torch.Tensor] = None
                ) -> LossResult:
    """Binary cross-entropy on thumbs-up/down feedback, with the reward as the logit of "desirable".

    ``loss = BCEWithLogits(r, y) = -[y log sigmoid(r) + (1 - y) log sigmoid(-r)]``, averaged over the batch, so a
    reward of 0 is the decision boundary between a thumbs-down and a thumbs-up.

    Args:
        rewards: ``[B]`` rewards of the completions.
        desirable: ``[B]`` labels, 1 (or True) for thumbs-up and 0 (or False) for thumbs-down.
        weights: optional ``[B]`` per-row weights (>= 0), as in :func:`bradley_terry_loss`.

    Metrics: ``discriminator/accuracy`` is the fraction where ``r > 0`` agrees with the label;
    ``discriminator/margin`` is the mean of the signed reward ``(2y - 1) * r`` (positive when on the right side).
    """
    if rewards.shape != desirable.shape or rewards.dim() != 1:
        raise ValueError(
            f"thumbs_loss: rewards and desirable must both be [B]; got {tuple(rewards.shape)} and "
            f"{tuple(desirable.shape)}"
        )
    labels = desirable.to(rewards.dtype)
    loss = weighted_mean(F.binary_cross_entropy_with_logits(rewards, labels, reduction="none"), weights)
    signed_rewards = (2 * labels - 1) * rewards
    metrics = {
        "discriminator/loss": loss.detach(),
        "discriminator/accuracy": ((rewards > 0) == (labels > 0.5)).float().mean().detach(),
        "discriminator/margin": signed_rewards.mean().detach(),
    }
    return LossResult(loss=loss, metrics=metrics)
