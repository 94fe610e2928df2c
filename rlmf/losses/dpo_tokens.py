"""DPO variants that need more of the log-prob path than the four summed log-probs: per-token log-probs (LD-DPO)
and the policy's probability mass at each completion position (WPO).

Inputs beyond :mod:`rlmf.losses.dpo`'s, as the generator builds them when a loss names them
(:mod:`rlmf.modules.generator`):

* ``policy_chosen_token_logps``, ``policy_rejected_token_logps``, ``reference_chosen_token_logps``,
  ``reference_rejected_token_logps``: ``[B, T]`` per-token log-probs of the completion tokens, 0 elsewhere;
  ``chosen_token_mask``, ``rejected_token_mask``: ``[B, T]`` bool, True at the completion tokens. Summing a row of
  log-probs gives the summed log-prob the other losses take.
* ``policy_chosen_log_sum_sq_probs``, ``policy_rejected_log_sum_sq_probs``: ``[B]``, ``log sum_v pi(v | x, y_<t)^2``
  summed over the completion positions ``t`` (no gradient: WPO's weights are constants to each step).

Notation and metrics as in :mod:`rlmf.losses.dpo`: ``rho = pi - ref`` of the (here transformed) log-probs, the
implicit rewards ``beta * rho`` logged as ``rewards/*``.
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


def _check_tokens(loss_name: str, **tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every tensor is ``[B, T]`` with the same ``B`` and ``T``."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if any(len(shape) != 2 for shape in shapes.values()) or len(set(shapes.values())) > 1:
        raise ValueError(f"{loss_name}: per-token inputs must all have the same shape [B, T], got {shapes}")


def desensitised_logps(token_logps: torch.Tensor, mask: torch.Tensor, shared_lengths: torch.Tensor,
                       ld_alpha: float) -> torch.Tensor:
    """``[B]``: the log-prob of each row's first ``shared_lengths`` completion tokens plus ``ld_alpha`` times that
    of the rest. ``token_logps`` and ``mask`` are ``[B, T]``; completion tokens are counted along the mask, so
    where the completion starts in the row does not matter."""
    position = mask.long().cumsum(-1)  # 1, 2, ... at the completion tokens
    shared = mask & (position <= shared_lengths[:, None])
    excess = mask & ~shared
    zero = token_logps.new_zeros(())
    return torch.where(shared, token_logps, zero).sum(-1) + ld_alpha * torch.where(excess, token_logps, zero).sum(-1)


def check_ld_dpo(*, beta: float = 0.1, ld_alpha: float = 0.5) -> None:
    """``ld_alpha`` must lie in [0, 1] (raises ``ValueError``); run before any work by :func:`rlmf.losses.bind_loss`."""
    check_fraction("ld_dpo", "ld_alpha", ld_alpha, 0.0, 1.0, high_inclusive=True)


@register_loss("ld_dpo", data="paired", reference=True, check=check_ld_dpo)
def ld_dpo(
    policy_chosen_token_logps: torch.Tensor,
    policy_rejected_token_logps: torch.Tensor,
    reference_chosen_token_logps: torch.Tensor,
    reference_rejected_token_logps: torch.Tensor,
    chosen_token_mask: torch.Tensor,
    rejected_token_mask: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    ld_alpha: float = 0.5,
) -> LossResult:
    """Length-desensitised DPO: DPO on log-probs in which the tokens of the longer response beyond the shorter
    one's length count ``alpha`` times.

        l_p = min(len_c, len_r)                          (per pair: the length both responses have)
        logp(y) = sum_{t <= l_p} log p(y_t | x, y_<t) + alpha * sum_{t > l_p} log p(y_t | x, y_<t)
        loss = mean(-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))))        (of those logp, policy and ref)

    Liu et al. 2024, "Length Desensitization in Direct Preference Optimization" (LD-DPO). The summed log-prob of
    a longer response is lower by its extra tokens, which DPO's margin reads as a preference for (or against)
    length; scaling the excess by ``ld_alpha`` in [0, 1] shrinks that part of the margin (1 is DPO, 0 compares the
    shared-length prefixes only). The same transform applies to the reference's log-probs, as in TRL's
    ``ld_alpha``. Defaults: beta 0.1 (TRL's), ld_alpha 0.5 (the paper tunes it per model and TRL has no default;
    0.5 is this project's choice, half-way between DPO and ignoring the excess). The reference's per-token
    log-probs are needed, so ``algo.reference=precomputed`` (a cache of sums) is refused.
    Inputs: the four ``[B, T]`` per-token log-probs and the two ``[B, T]`` masks (see the module docstring).
    """
    check_ld_dpo(beta=beta, ld_alpha=ld_alpha)
    _check_tokens("ld_dpo", policy_chosen_token_logps=policy_chosen_token_logps,
                  policy_rejected_token_logps=policy_rejected_token_logps,
                  reference_chosen_token_logps=reference_chosen_token_logps,
                  reference_rejected_token_logps=reference_rejected_token_logps,
                  chosen_token_mask=chosen_token_mask, rejected_token_mask=rejected_token_mask)
    shared = torch.minimum(chosen_token_mask.sum(-1), rejected_token_mask.sum(-1))
    pi_c, pi_r, ref_c, ref_r = (
        desensitised_logps(logps, mask, shared, ld_alpha)
        for logps, mask in ((policy_chosen_token_logps, chosen_token_mask),
                            (policy_rejected_token_logps, rejected_token_mask),
                            (reference_chosen_token_logps, chosen_token_mask),
                            (reference_rejected_token_logps, rejected_token_mask)))
    rho_c, rho_r = paired_log_ratios("ld_dpo", pi_c, pi_r, ref_c, ref_r)
    per_pair = -F.logsigmoid(beta * (rho_c - rho_r))
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, pi_c, pi_r)


@register_loss("wpo", data="paired", reference=True)
def wpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    policy_chosen_log_sum_sq_probs: torch.Tensor,
    policy_rejected_log_sum_sq_probs: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
) -> LossResult:
    """Weighted Preference Optimization: DPO with each pair weighted by how likely the current policy is to have
    produced both responses, so that off-policy pairs count less.

        w(y) = exp(mean_t [log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2])        (no gradient)
        loss = mean(w(y_c) * w(y_r) * -log sigmoid(beta * margin))

    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", eq. 2 with the weight alignment
    of its section 3: each token's probability is divided by ``sum_v pi(v)^2``, the probability the policy gives
    its own sampled token on average, so that a response as likely as the policy's own samples weighs about 1
    whatever the entropy. This is TRL's ``use_weighting`` applied to its ``sigmoid`` loss; the mean is a plain
    mean over pairs, as the paper's expectation (with ``weights`` [B] it is ``sum(weights * w_c * w_r * l) /
    sum(weights)``). The mean over tokens divides by the completion length (0 counts as 1). Default beta 0.1
    (TRL's). ``sum_v pi(v)^2`` needs the whole distribution at each position, which the fused log-prob kernel does
    not keep: the generator computes it from the materialised logits of the completion positions, without
    gradient, when this loss asks for it.
    Inputs: four [B] summed log-probs, the two [B] lengths and the two [B] summed ``log sum_v pi(v)^2`` (see the
    module docstring).
    """
    rho_c, rho_r = paired_log_ratios(
        "wpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    check_batch("wpo", policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths, policy_chosen_log_sum_sq_probs=policy_chosen_log_sum_sq_probs,
                policy_rejected_log_sum_sq_probs=policy_rejected_log_sum_sq_probs)
    with torch.no_grad():
        aligned_c = mean_token_logps(policy_chosen_logps - policy_chosen_log_sum_sq_probs, chosen_lengths)
        aligned_r = mean_token_logps(policy_rejected_logps - policy_rejected_log_sum_sq_probs, rejected_lengths)
        pair_weight = torch.exp(aligned_c + aligned_r)
    per_pair = pair_weight * -F.logsigmoid(beta * (rho_c - rho_r))
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, policy_chosen_logps,
                                  policy_rejected_logps, {"wpo/pair_weight": weighted_mean(pair_weight, weights)})
