"""HyPO: DPO on offline pairs plus a reverse-KL penalty estimated on the policy's own samples."""

from __future__ import annotations

from typing import Optional

import torch

from rlmf.losses.registry import LossResult, register_loss
from rlmf.losses.dpo import dpo


@register_loss("hypo", data="paired_online", reference=True)
def hypo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    policy_online_logps: torch.Tensor,
    reference_online_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    kl_weight: float = 0.01,
) -> LossResult:
    """Hybrid Preference Optimization: the DPO loss on labelled offline pairs plus ``kl_weight`` times the reverse
    KL(pi || ref) on unlabelled completions the policy samples for the same prompts.

        loss = dpo(pairs; beta) + kl_weight * KL_hat
        KL(pi || ref)(x) = E_{y ~ pi(.|x)}[log pi(y|x) - log ref(y|x)]

    Song et al. 2024, "The Importance of Online Data: Understanding Preference Fine-tuning via Coverage". DPO
    alone cannot keep the policy's reverse KL small where the offline data has no coverage; the online term does,
    without needing a reward model or labels. Defaults: beta 0.1 (as DPO); kl_weight 0.01 is this project's
    starting value, not a published default (the paper tunes lambda per task).

    Estimator. For each prompt b, k >= 2 samples y_1..y_k ~ pi give log-ratios r_i = log pi(y_i) - log ref(y_i).
    The value reported and added to the loss is the plain Monte Carlo estimate ``KL_hat = mean_{b,i} r_{b,i}``.
    Sampling is not differentiable, so the gradient comes from the score-function identity

        grad KL = E_y[(log pi(y) - log ref(y)) * grad log pi(y)]      (the extra E[grad log pi(y)] term is 0)

    with a leave-one-out (RLOO; Kool et al. 2019, Ahmadian et al. 2024) baseline b_i = mean_{j != i} r_j: the
    surrogate's gradient is ``mean_{b,i}((r_i - b_i) * grad log pi(y_i))``. Because b_i depends only on the other
    samples, which are independent of y_i, ``E[b_i grad log pi(y_i)] = E[b_i] E[grad log pi(y_i)] = 0``, so the
    gradient is an unbiased estimate of the gradient of ``mean_b KL(pi || ref)(x_b)``; the baseline removes the
    log-ratios' common level, which would otherwise dominate the variance. The surrogate is written as
    ``KL_hat + S - S.detach()`` with ``S = mean((r - b).detach() * policy_online_logps)``, so the loss value stays
    the KL estimate while the gradient is the RLOO one. Consequence: the gradient of this
    loss with respect to ``policy_online_logps`` is deliberately not the derivative of its value (finite
    differences on the inputs will disagree); it is the gradient with respect to the policy's parameters, in
    expectation over the sampling, that is correct.

    Inputs: the four [B] summed log-probs of :func:`rlmf.losses.dpo.dpo`; ``policy_online_logps`` and
    ``reference_online_logps`` [B, k], summed over each sampled completion's tokens (row b holds the k samples
    for the prompt of pair b). Metrics: those of DPO, plus ``kl`` (= KL_hat, detached).
    """
    offline = dpo(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, weights,
        beta=beta,
    )
    if policy_online_logps.dim() != 2 or policy_online_logps.shape != reference_online_logps.shape:
        raise ValueError(
            "hypo: policy_online_logps and reference_online_logps must both have shape [B, k], got "
            f"{tuple(policy_online_logps.shape)} and {tuple(reference_online_logps.shape)}"
        )
    batch_size, num_samples = policy_online_logps.shape
    if batch_size != policy_chosen_logps.shape[0]:
        raise ValueError(
            f"hypo: online samples are for {batch_size} prompts but there are {policy_chosen_logps.shape[0]} pairs; "
            "row b of policy_online_logps must hold the samples for the prompt of pair b"
        )
    if num_samples < 2:
        raise ValueError(f"hypo: the leave-one-out baseline needs k >= 2 samples per prompt, got k={num_samples}")

    log_ratios = (policy_online_logps - reference_online_logps).detach()
    leave_one_out_baseline = (log_ratios.sum(dim=1, keepdim=True) - log_ratios) / (num_samples - 1)
    advantages = log_ratios - leave_one_out_baseline
    kl_estimate = log_ratios.mean()
    score_surrogate = (advantages * policy_online_logps).mean()
    kl_term = kl_estimate + score_surrogate - score_surrogate.detach()

    metrics = dict(offline.metrics)
    metrics["kl"] = kl_estimate
    return LossResult(loss=offline.loss + kl_weight * kl_term, metrics=metrics)
