"""The REINFORCE family on rollouts: RLOO, REINFORCE++ (and its group-baseline variant) and ReMax, as pure functions.

Each objective is a clipped surrogate (on the first update of a rollout the ratio is 1 and it is REINFORCE with a
baseline); what tells them apart is the advantage, built by the trainer's estimator that each registers
(:mod:`rlmf.modules.targets`): leave-one-out for ``rloo``, the return-to-go whitened over the batch for
``reinforce_pp`` (``reinforce_pp_baseline``: of scores centred on their group first), the return-to-go minus the
greedy completion's reward for ``remax``. The KL to the reference is in their rewards (``algo.online.kl_coef``),
never in the loss, so no objective here takes a reference. Inputs, masks and metric names follow
:mod:`rlmf.losses.policy_gradient`.
"""

from __future__ import annotations

from typing import Optional

import torch

from rlmf.losses.registry import LossResult, register_loss
from rlmf.losses._common import check_batch
from rlmf.losses.advantages import masked_mean, token_mask
from rlmf.losses.policy_gradient import check_clip, clip_metrics, clipped_surrogate, online_check

def rloo_rewards(
    scores: torch.Tensor, logps_sum: torch.Tensor, reference_logps_sum: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """RLOO's KL-penalised sequence reward: the score minus ``kl_coef`` times the completion's summed k1 KL.

        R = score - kl_coef * sum_t (logp_t - ref_t)  =  score - kl_coef * (logps_sum - reference_logps_sum)

    Ahmadian et al. 2024, "Back to Basics" (the KL enters the reward, as in PPO-RLHF, but once per sequence).
    ``logps_sum`` is the sampling policy's summed log-prob over the completion tokens. The result is detached: the
    reward is a constant of the rollout (a gradient through it would not be the REINFORCE estimator).

    Shapes: all ``[B * G]`` (or all ``[B]``); returns the same.
    """
    if not (scores.shape == logps_sum.shape == reference_logps_sum.shape) or scores.dim() != 1:
        raise ValueError(
            "rloo_rewards: scores, logps_sum and reference_logps_sum must all be 1-D and alike; got "
            f"{tuple(scores.shape)}, {tuple(logps_sum.shape)}, {tuple(reference_logps_sum.shape)}"
        )
    return (scores - kl_coef * (logps_sum - reference_logps_sum)).detach()


def rloo_loss(
    sequence_logps: torch.Tensor,
    old_sequence_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps: float = 0.2,
    eps_high: Optional[float] = None,
) -> LossResult:
    """RLOO's sequence-level clipped objective: one ratio per completion, of its summed log-probs.

        r = exp(sum_t logp_t - sum_t old_t)          loss = mean(-min(r A, clip(r, 1 - eps, 1 + eps_high) A))

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs" (a completion is one action; the leave-one-out advantage of
    :func:`rlmf.losses.advantages.rloo_advantages`, with the KL in the reward via :func:`rloo_rewards`), with the
    PPO clip that TRL 1.16's RLOOTrainer applies for more than one update per rollout (on the first update r = 1
    and the loss is plain REINFORCE with a baseline). ``eps_high`` defaults to ``eps``.

    Inputs: ``sequence_logps``, ``old_sequence_logps``, ``advantages`` ``[B]`` (summed over completion tokens).
    Metrics (TRL 1.16 RLOOTrainer's): ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``
    (fractions of completions), ``clip_ratio/low_min``, ``clip_ratio/high_max``.
    """
    eps_high = eps if eps_high is None else eps_high
    check_clip("rloo_loss", eps, eps_high)
    check_batch(
        "rloo_loss", sequence_logps=sequence_logps, old_sequence_logps=old_sequence_logps, advantages=advantages
    )
    ratio = torch.exp(sequence_logps - old_sequence_logps)
    per_sequence, low, high = clipped_surrogate(ratio, advantages.to(ratio.dtype), eps, eps_high)
    return LossResult(loss=per_sequence.mean(), metrics=clip_metrics(low, high, None, ratio.dtype))


@register_loss("rloo", data="online", reference=False, targets="leave_one_out",
               check=online_check("rloo"))
def rloo(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 0.2,
    eps_high: float = 0.2,
) -> LossResult:
    """RLOO on a rollout: one clipped ratio per completion, of its log-probs summed over the ``mask``.

        loss = mean_i -min(r_i A_i, clip(r_i, 1 - eps, 1 + eps_high) A_i)       r_i = exp(sum_t logp_t - sum_t old_t)

    Ahmadian et al. 2024, "Back to Basics" (:func:`rloo_loss`). The KL to the reference is in the advantages, not
    here (``algo.online.kl_coef`` through :func:`rloo_rewards`), so the objective itself needs no reference.
    Defaults: eps = eps_high = 0.2.

    Inputs: ``policy_logps``, ``old_logps``, ``mask`` ``[B, T]``; ``advantages`` ``[B]``. Metrics: ``clip_ratio/*``.
    """
    mask = token_mask("rloo", mask, policy_logps=policy_logps, old_logps=old_logps)
    zero = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
    return rloo_loss(torch.where(mask, policy_logps, zero).sum(-1), torch.where(mask, old_logps, zero).sum(-1),
                     advantages, eps=eps, eps_high=eps_high)


# ---------------------------------------------------------------------------------- REINFORCE++ and ReMax


def token_surrogate_loss(name: str, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                         mask: torch.Tensor, eps_low: float, eps_high: float) -> LossResult:
    """The token-level clipped surrogate, averaged over every completion token of the batch.

        loss = 1/(sum_i |o_i|) sum_i sum_t -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)

    ``advantages`` ``[B, T]`` (one per token) or ``[B]`` (the completion's, on each of its tokens). Metrics: TRL's
    ``clip_ratio/*`` (token means and per-completion extremes).
    """
    check_clip(name, eps_low, eps_high)
    mask = token_mask(name, mask, logps=logps, old_logps=old_logps)
    if advantages.shape == mask.shape[:1]:
        advantages = advantages[:, None].expand(mask.shape)
    elif advantages.shape != mask.shape:
        raise ValueError(f"{name}: advantages must be [B, T] = {list(mask.shape)} or [B], got "
                         f"{list(advantages.shape)}")
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    ratio = torch.exp(torch.where(mask, logps - old_logps, zero))
    per_token, low, high = clipped_surrogate(ratio, torch.where(mask, advantages.to(logps.dtype), zero), eps_low,
                                             eps_high)
    return LossResult(loss=masked_mean(per_token, mask), metrics=clip_metrics(low, high, mask, logps.dtype))


@register_loss("reinforce_pp", data="online", reference=False, targets="reinforce_pp",
               check=online_check("reinforce_pp"))
def reinforce_pp(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> LossResult:
    """REINFORCE++: PPO's clipped token-level surrogate without a critic, on globally normalised advantages.

        r_t  = -kl_coef * (old_t - ref_t) + [t = last] * score        G_t = sum_{s >= t} gamma^(s - t) r_s
        A_t  = (G_t - mean(G)) / std(G)                                over every completion token of the batch
        loss = 1/(sum_i |o_i|) sum_i sum_t -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)

    Hu 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models" (OpenRLHF's
    ``--advantage_estimator reinforce``): the token-level k1 KL penalty is in the reward, and normalising over the
    whole batch rather than per prompt keeps the estimate unbiased by prompt difficulty. The advantages come from
    the trainer (:func:`rlmf.losses.advantages.reinforce_pp_advantages`; ``algo.online.kl_coef`` and ``gamma``),
    so this is :func:`token_surrogate_loss`. Defaults: eps_low = eps_high = 0.2 (the paper's and OpenRLHF's clip);
    in ``conf/algo/reinforce_pp.yaml`` kl_coef 0.01 and gamma 1 (OpenRLHF's defaults).

    Inputs: ``policy_logps``, ``old_logps``, ``mask`` ``[B, T]``; ``advantages`` ``[B, T]``. Metrics:
    ``clip_ratio/*``.
    """
    return token_surrogate_loss("reinforce_pp", policy_logps, old_logps, advantages, mask, eps_low, eps_high)


@register_loss("reinforce_pp_baseline", data="online", reference=False, targets="reinforce_pp_baseline",
               check=online_check("reinforce_pp_baseline"))
def reinforce_pp_baseline(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> LossResult:
    """REINFORCE++-baseline: REINFORCE++ on scores centred on their prompt's group mean (no division by its std).

        score'_i = score_i - mean_group(score)      then as reinforce_pp: r_t, G_t, A_t = whiten(G) over the batch
        loss = 1/(sum_i |o_i|) sum_i sum_t -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)

    Hu 2025, "REINFORCE++" (OpenRLHF's ``--advantage_estimator reinforce_baseline``, recommended there for
    verifiable rewards): the group mean removes the prompt's difficulty, the global normalisation its reward
    scale, and the k1 KL stays in the reward. Needs ``num_generations >= 2``. Defaults: eps_low = eps_high = 0.2;
    in ``conf/algo/reinforce_pp_baseline.yaml`` kl_coef 0.01, gamma 1 (OpenRLHF fixes gamma 1 for it).

    Inputs: ``policy_logps``, ``old_logps``, ``mask`` ``[B, T]``; ``advantages`` ``[B, T]``. Metrics:
    ``clip_ratio/*``.
    """
    return token_surrogate_loss("reinforce_pp_baseline", policy_logps, old_logps, advantages, mask, eps_low,
                                eps_high)


@register_loss("remax", data="online", reference=False, targets="greedy_baseline",
               check=online_check("remax"))
def remax(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> LossResult:
    """ReMax: REINFORCE with the reward of the prompt's greedy completion as the baseline.

        A_t  = sum_{s >= t} r_s - R(x, y_greedy)       r_s = -kl_coef * (old_s - ref_s) + [s = last] * R(x, y)
        loss = 1/(sum_i |o_i|) sum_i sum_t -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)

    Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large
    Language Models" (Algorithm 1): the greedy completion's reward is a baseline that costs one greedy decode per
    prompt and no value model. The trainer decodes it after sampling and scores it with the same reward
    (:func:`rlmf.losses.advantages.greedy_baseline_advantages`). One update per rollout (the paper's, the default
    ``num_iterations`` 1) makes the ratio 1 and the loss the paper's REINFORCE gradient, averaged over tokens as
    verl's ``remax`` does; later updates are clipped. Defaults: eps_low = eps_high = 0.2; in
    ``conf/algo/remax.yaml`` one sample per prompt (the paper's) and kl_coef 0.001 (verl's ReMax example).

    Inputs: ``policy_logps``, ``old_logps``, ``mask`` ``[B, T]``; ``advantages`` ``[B, T]``. Metrics:
    ``clip_ratio/*``.
    """
    return token_surrogate_loss("remax", policy_logps, old_logps, advantages, mask, eps_low, eps_high)
