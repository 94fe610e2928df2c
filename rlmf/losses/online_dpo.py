"""Online DPO: DPO (or IPO) on pairs of the policy's own fresh samples, ranked by the reward, as a pure function.

Registered as ``online_dpo`` (data format ``online``; the trainer's ``best_worst`` estimator,
:mod:`rlmf.modules.targets`, pairs the best and the worst valid completion of each prompt with
:func:`best_worst_preferences`). Token-level inputs and masks follow :mod:`rlmf.losses.policy_gradient`.
"""

from __future__ import annotations

import torch

from rlmf.losses.registry import LossResult, register_loss
from rlmf.losses._common import preference_metrics
from rlmf.losses.advantages import as_groups, token_mask

ONLINE_DPO_LOSS_TYPES = ("sigmoid", "ipo")


def best_worst_preferences(scores: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Online DPO's pairs: in each group, +1 for the highest-scored valid completion, -1 for the lowest, 0 elsewhere.

    A group with fewer than two valid completions, or whose valid scores are all equal, gives no pair (all 0): a
    tie carries no preference. Ties for the best (worst) go to the first such completion. Guo et al. 2024, "Direct
    Language Model Alignment from Online AI Feedback" rank two samples; with more the extremes are the pair.

    Shapes: ``scores`` and ``valid`` ``[B * G]`` (invalid scores are ignored, NaN included); returns ``[B * G]``
    int64 with, per group, either exactly one +1 and one -1 or nothing.
    """
    grouped = as_groups("best_worst_preferences", scores, group_size)
    ok = as_groups("best_worst_preferences", valid.to(torch.bool), group_size)
    inf = torch.full((), float("inf"), dtype=grouped.dtype, device=grouped.device)
    best = torch.where(ok, grouped, -inf).argmax(dim=1)
    worst = torch.where(ok, grouped, inf).argmin(dim=1)
    rows = torch.arange(grouped.shape[0], device=grouped.device)
    has_pair = (ok.sum(dim=1) >= 2) & (grouped[rows, best] > grouped[rows, worst])
    out = torch.zeros(grouped.shape, dtype=torch.long, device=grouped.device)
    out[rows[has_pair], best[has_pair]] = 1
    out[rows[has_pair], worst[has_pair]] = -1
    return out.reshape(scores.shape)


@register_loss("online_dpo", data="online", reference=True, targets="best_worst",
               choices={"loss_type": ONLINE_DPO_LOSS_TYPES})
def online_dpo(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    mask: torch.Tensor,
    preferences: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> LossResult:
    """Online DPO: DPO (or IPO) on pairs of the policy's own fresh samples, ranked by the reward.

        rho = sum_t (logp_t - ref_t)   over a completion's tokens

        loss = mean_pairs -log sigmoid(beta * (rho_chosen - rho_rejected))               sigmoid (Rafailov et al. 2023)
        loss = mean_pairs (rho_chosen / |y_c| - rho_rejected / |y_r| - 1 / (2 beta))^2    ipo (Azar et al. 2023)

    Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback": each step samples completions of
    every prompt from the current policy, the reward picks the preferred one, and the pair gets the offline loss.
    ``preferences`` ``[B]`` marks each row +1 (chosen), -1 (rejected) or 0 (not in a pair), with the rows of a
    pair in one group: the k-th chosen row pairs with the k-th rejected row
    (:func:`best_worst_preferences` builds them). No pair in the batch gives a zero loss that still has a graph.

    Defaults: beta 0.1, loss_type sigmoid.

    Inputs: ``policy_logps`` (carries gradient), ``reference_logps``, ``mask`` ``[B, T]``; ``preferences`` ``[B]``.
    Metrics: DPO's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (the
    implicit rewards ``beta * rho``) and ``pairs`` (pairs in the batch).
    """
    if loss_type not in ONLINE_DPO_LOSS_TYPES:
        raise ValueError(f"online_dpo: loss_type={loss_type!r} is not one of {ONLINE_DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"online_dpo: beta={beta} must be > 0")
    mask = token_mask("online_dpo", mask, policy_logps=policy_logps, reference_logps=reference_logps)
    if preferences.shape != mask.shape[:1]:
        raise ValueError(f"online_dpo: preferences must have shape [B] = [{mask.shape[0]}], "
                         f"got {tuple(preferences.shape)}")
    chosen, rejected = preferences > 0, preferences < 0
    if int(chosen.sum()) != int(rejected.sum()):
        raise ValueError(f"online_dpo: {int(chosen.sum())} chosen rows but {int(rejected.sum())} rejected ones; "
                         "each pair needs one of each")
    zero = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
    policy_sums = torch.where(mask, policy_logps, zero).sum(-1)
    reference_sums = torch.where(mask, reference_logps, zero).sum(-1)
    lengths = mask.sum(-1).clamp(min=1).to(policy_logps.dtype)
    if not chosen.any():
        return LossResult(loss=policy_sums.sum() * 0.0, metrics={"pairs": torch.zeros((), device=policy_logps.device)})
    rho = policy_sums - reference_sums
    rho_c, rho_r = rho[chosen], rho[rejected]
    if loss_type == "sigmoid":
        per_pair = -torch.nn.functional.logsigmoid(beta * (rho_c - rho_r))
    else:
        per_pair = (rho_c / lengths[chosen] - rho_r / lengths[rejected] - 1 / (2 * beta)).square()
    metrics = preference_metrics(beta * rho_c, beta * rho_r, policy_sums[chosen], policy_sums[rejected])
    metrics["pairs"] = chosen.sum().to(policy_logps.dtype).detach()
    return LossResult(loss=per_pair.mean(), metrics=metrics)
