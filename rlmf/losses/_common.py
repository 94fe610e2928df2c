"""Pieces every loss family shares: input checks, per-token means and the reward metrics a preference loss logs."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from rlmf.losses.registry import LossResult


def check_batch(loss_name: str, **tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every tensor is 1-D ([B]) and all have the same B.

    Checks shapes only (no device sync), so it is free to call on every step.
    """
    sizes = {}
    for name, tensor in tensors.items():
        if tensor.dim() != 1:
            raise ValueError(f"{loss_name}: {name} must have shape [B], got {tuple(tensor.shape)}")
        sizes[name] = tensor.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{loss_name}: inputs disagree on the batch size B: {sizes}")


def paired_log_ratios(
    loss_name: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
):
    """The log-ratios ``(pi_c - ref_c, pi_r - ref_r)`` ([B] each), after checking that all four inputs are [B]."""
    check_batch(
        loss_name,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    return policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps


def check_fraction(loss_name: str, name: str, value: float, low: float, high: float, high_inclusive: bool) -> None:
    """Raise ``ValueError`` unless ``low <= value < high`` (``<= high`` when ``high_inclusive``)."""
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{loss_name}: {name}={value} must lie in [{low}, {high}{bracket}")


def mean_token_logps(summed_logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-token mean log-prob, ``summed_logps / lengths``.

    An empty completion (length 0) sums to log-prob 0, so it is divided by 1 rather than producing 0/0.
    """
    return summed_logps / lengths.clamp(min=1).to(summed_logps.dtype)


def token_mean_nll(summed_logps: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """Mean negative log-likelihood per token over the whole batch: ``-sum(summed_logps) / sum(lengths)``.

    This is what a causal-LM cross-entropy over the completion tokens of the batch returns: long completions weigh
    more than short ones, unlike a mean of per-sequence means. With per-example ``weights`` [B] every token of
    example i counts ``w_i`` times: ``-sum(w * summed_logps) / sum(w * lengths)``.
    """
    if weights is None:
        return -summed_logps.sum() / lengths.sum().clamp(min=1).to(summed_logps.dtype)
    w = check_weights(summed_logps, weights)
    return -(w * summed_logps).sum() / (w * lengths.to(w.dtype)).sum().clamp(min=1e-12)


def check_weights(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` as the dtype of ``values`` after checking it is [B] like them, finite and >= 0."""
    if weights.shape != values.shape[:1]:
        raise ValueError(f"weights must have shape [B] = [{values.shape[0]}], got {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights must be finite and >= 0")
    return weights.to(values.dtype)


def weighted_mean(per_example: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The batch mean of per-example losses ``[B]``; with ``weights`` [B], ``sum(w * l) / sum(w)``.

    Weights of 1 give the plain mean exactly; a batch whose weights are all 0 gives 0 (no evidence, no update).
    """
    if weights is None:
        return per_example.mean()
    w = check_weights(per_example, weights)
    return (w * per_example).sum() / w.sum().clamp(min=1e-12)


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    """Detached batch means of the implicit rewards ([B] each) and the policy log-probs of a paired loss."""
    chosen = chosen_rewards.detach()
    rejected = rejected_rewards.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }


def implicit_reward_result(loss: torch.Tensor, beta: float, rho_c: torch.Tensor, rho_r: torch.Tensor,
                           policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                           extra_metrics: Optional[Dict[str, torch.Tensor]] = None) -> LossResult:
    """``loss`` (already reduced to a scalar) with the metrics of the DPO family: the implicit rewards
    ``beta * rho_c`` and ``beta * rho_r`` of the log-ratios ([B] each, :func:`preference_metrics`) and any
    ``extra_metrics`` (detached here)."""
    metrics = preference_metrics(beta * rho_c, beta * rho_r, policy_chosen_logps, policy_rejected_logps)
    metrics.update({name: value.detach() for name, value in (extra_metrics or {}).items()})
    return LossResult(loss=loss, metrics=metrics)


def unpaired_metrics(rewards: torch.Tensor, desirable: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Reward metrics for thumbs-up/down data: means over the desirable and the undesirable rows.

    A group absent from the batch has no mean, so its key (and ``rewards/margins``) is left out rather than
    reported as NaN. There is no ``rewards/accuracies``: no row is paired with another.
    """
    rewards = rewards.detach()
    metrics: Dict[str, torch.Tensor] = {}
    # Boolean indexing waits for the device; once per step for logging is cheap, and it lets an absent group be
    # left out instead of logged as 0/0.
    chosen = rewards[desirable]
    rejected = rewards[~desirable]
    if chosen.numel() > 0:
        metrics["rewards/chosen"] = chosen.mean()
    if rejected.numel() > 0:
        metrics["rewards/rejected"] = rejected.mean()
    if chosen.numel() > 0 and rejected.numel() > 0:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
