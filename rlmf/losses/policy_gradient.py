"""Online-RL objectives as pure functions: the clipped surrogate they share, its options, and GRPO.

The online objectives (data format ``online``: they consume rollouts, sampled completions with their advantages and
the log-probs of the policy that sampled them) are one file per family, each returning a
:class:`~rlmf.losses.LossResult` with detached scalar metrics:

- here: the clipped surrogate, TRL's clip metrics, the options of the token-level objectives (the two-sided clip
  ``delta``, training only on the highest-entropy tokens, the entropy bonus) and ``grpo`` (GRPO, with DAPO's,
  Dr. GRPO's and BNPO's aggregations);
- :mod:`rlmf.losses.policy_gradient_variants`: ``gspo`` (one ratio per completion), ``cispo`` (clipped,
  stop-gradient importance weights);
- :mod:`rlmf.losses.ppo`: ``ppo``; :mod:`rlmf.losses.reinforce`: ``rloo``, ``reinforce_pp``,
  ``reinforce_pp_baseline``, ``remax``; :mod:`rlmf.losses.online_dpo`: ``online_dpo``.

Each registers the advantage estimator the online trainer builds its targets with (``register_loss(...,
targets=...)``, :mod:`rlmf.modules.targets`), so an objective that reuses an estimator needs no trainer code.

Token-level inputs are ``[B, T]`` with a ``mask`` ``[B, T]`` of completion tokens (bool, or 0/1 of any dtype; see
:mod:`rlmf.losses.advantages`): ``logps`` are the current policy's log-probs of the sampled tokens (the only input
that carries gradient, with ``entropies``), ``old_logps`` those of the policy that sampled them (detached),
``reference_logps`` the frozen reference's, ``entropies`` the policy's per-token entropies (optional; only the
entropy options read them). Positions outside the mask are never read into the loss, its gradient or the metrics.

With ``r = exp(logp - old_logp)`` the probability ratio, the objectives here are the clipped surrogate of
Schulman et al. 2017, "Proximal Policy Optimization Algorithms":

    L = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)

Asymmetric bounds (``eps_high > eps_low``) are DAPO's "clip-higher" (Yu et al. 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale"): more room for raising the probability of unlikely tokens. The two-sided
clip (``delta``, INTELLECT-2 Team 2025, "INTELLECT-2: A Reasoning Model Trained Through Globally Decentralized
Reinforcement Learning") also caps the unclipped ratio at ``delta``, which bounds the loss of a negative advantage.

Metric names follow TRL where it logs the quantity: TRL 1.16's ``kl``, ``entropy``, ``clip_ratio/*`` and
``cispo_clip_ratio``; PPO (not in TRL 1.16) uses the names of TRL's former PPO trainers (``loss/policy``, ...).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from rlmf.losses.registry import LossResult, register_loss
from rlmf.losses._common import check_fraction
from rlmf.losses.advantages import as_groups, kl_penalty, masked_mean, token_mask

GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")


def check_clip(name: str, eps_low: float, eps_high: float, delta: Optional[float] = None) -> None:
    """Raise ``ValueError`` unless ``0 <= eps_low < 1``, ``eps_high >= 0`` and ``delta`` is None or ``> 1 + eps_high``
    (a cap inside the clip range would cap ratios the clip lets through)."""
    check_fraction(name, "eps_low", eps_low, 0.0, 1.0, high_inclusive=False)
    if eps_high < 0:
        raise ValueError(f"{name}: eps_high={eps_high} must be >= 0")
    if delta is not None and not delta > 1 + eps_high:
        raise ValueError(f"{name}: delta={delta} must be > 1 + eps_high = {1 + eps_high} (or None: one-sided clip)")


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float,
                      delta: Optional[float] = None):
    """Per-element ``-min(r A, clip(r) A)`` and the bool tensors of elements clipped below and above.

    An element is "clipped" when the clipped term is the one in force and its gradient is therefore 0: the ratio
    is below ``1 - eps_low`` with ``A < 0``, or above ``1 + eps_high`` with ``A > 0``. With ``delta`` the unclipped
    term uses ``min(r, delta)`` (the two-sided clip; TRL's ``delta``, whose clip metrics also read the capped ratio).
    """
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    per_element = -torch.min(ratio * advantages, clipped_ratio * advantages)
    low = (ratio < 1 - eps_low) & (advantages < 0)
    high = (ratio > 1 + eps_high) & (advantages > 0)
    return per_element, low, high


def _nan_extreme(values: torch.Tensor, valid: torch.Tensor, largest: bool) -> torch.Tensor:
    """Min (or max) of ``values`` over ``valid`` entries; NaN when none is valid. No device sync."""
    fill = float("-inf") if largest else float("inf")
    filled = torch.where(valid, values, torch.full((), fill, dtype=values.dtype, device=values.device))
    extreme = filled.amax() if largest else filled.amin()
    return torch.where(valid.any(), extreme, torch.full((), float("nan"), dtype=values.dtype, device=values.device))


def clip_metrics(
    low: torch.Tensor, high: torch.Tensor, mask: Optional[torch.Tensor], dtype: torch.dtype
) -> Dict[str, torch.Tensor]:
    """TRL's clip-ratio metrics: token (or sequence) means of the clipped fractions, and their extreme rows.

    ``clip_ratio/low_min`` is the smallest per-sequence fraction of low-clipped tokens, ``clip_ratio/high_max`` the
    largest per-sequence fraction of high-clipped ones (rows without tokens are ignored).
    """
    low, high = low.to(dtype), high.to(dtype)
    region = torch.maximum(low, high)
    if mask is None:  # sequence level: one element per sequence
        rows = torch.ones_like(low, dtype=torch.bool)
        means = {k: v.mean() for k, v in (("low", low), ("high", high), ("region", region))}
        low_rows, high_rows = low, high
    else:
        rows = mask.any(dim=1)
        means = {k: masked_mean(v, mask) for k, v in (("low", low), ("high", high), ("region", region))}
        low_rows, high_rows = masked_mean(low, mask, dim=1), masked_mean(high, mask, dim=1)
    return {
        "clip_ratio/low_mean": means["low"].detach(),
        "clip_ratio/high_mean": means["high"].detach(),
        "clip_ratio/region_mean": means["region"].detach(),
        "clip_ratio/low_min": _nan_extreme(low_rows, rows, largest=False).detach(),
        "clip_ratio/high_max": _nan_extreme(high_rows, rows, largest=True).detach(),
    }


def online_check(name: str):
    """The value checks of an online objective's hyperparameters, for ``register_loss(check=...)``: run by
    ``rlmf.validate`` before any work, with every hyperparameter (defaults filled in). Checks what the objective
    takes of: the clip (``eps_low`` or ``eps``, ``eps_high``, ``delta``), ``eps_max``, ``top_entropy_quantile`` and
    ``entropy_coef``; the objective checks them again at call time."""
    def check(**h) -> None:
        if "eps_high" in h:
            check_clip(name, h.get("eps_low", h.get("eps")), h["eps_high"], h.get("delta"))
        if "eps_max" in h:
            check_eps_max(name, h["eps_max"])
        if "top_entropy_quantile" in h:
            check_entropy_options(name, h["top_entropy_quantile"], h.get("entropy_coef", 0.0))

    return check


def check_eps_max(name: str, eps_max: float) -> None:
    """CISPO's cap on the importance weight: a positive finite number."""
    if not (math.isfinite(eps_max) and eps_max > 0):
        raise ValueError(f"{name}: eps_max={eps_max} must be a positive number (the cap on the importance weight)")


def check_entropy_options(name: str, top_entropy_quantile: float, entropy_coef: float) -> None:
    """``top_entropy_quantile`` in [0, 1] and a finite ``entropy_coef``."""
    check_fraction(name, "top_entropy_quantile", top_entropy_quantile, 0.0, 1.0, high_inclusive=True)
    if not math.isfinite(entropy_coef):
        raise ValueError(f"{name}: entropy_coef={entropy_coef} must be finite")


def entropy_terms(name: str, entropies: Optional[torch.Tensor], mask: torch.Tensor, top_entropy_quantile: float,
                  entropy_coef: float
                  ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Dict[str, torch.Tensor]]:
    """The entropy options of a token-level objective: ``(keep, bonus, metrics)``.

    - ``keep`` (bool ``[B, T]``, None for every token): the tokens whose policy term counts, those whose entropy is
      at least the ``1 - top_entropy_quantile`` quantile of the masked tokens' entropies (``torch.quantile``, linear
      interpolation). Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
      Reinforcement Learning for LLM Reasoning" (the paper's rho, 0.2 recommended); TRL 1.16's
      ``top_entropy_quantile``, same definition: 1 keeps every token, 0 only the highest; the other tokens still
      count in the normaliser and in the KL term.
    - ``bonus``: ``entropy_coef`` times the mean entropy over the kept tokens, for the objective to subtract
      (an exploration bonus; TRL's ``entropy_coef``, not rescaled by the aggregation); None when the coefficient is 0.
    - ``metrics``: TRL's ``entropy`` (token mean over the mask) whenever ``entropies`` are given.

    ``entropies`` ``[B, T]`` (the policy's, carrying gradient for the bonus) are required when either option is on.
    """
    check_entropy_options(name, top_entropy_quantile, entropy_coef)
    if entropies is None:
        if top_entropy_quantile < 1.0 or entropy_coef != 0.0:
            raise ValueError(f"{name}: top_entropy_quantile={top_entropy_quantile} and entropy_coef={entropy_coef} "
                             "need the policy's per-token entropies (entropies [B, T])")
        return None, None, {}
    token_mask(name, mask, entropies=entropies)
    keep = None
    if top_entropy_quantile < 1.0:
        values = entropies.detach()
        selected = values[mask]
        if selected.numel() == 0:
            keep = torch.zeros_like(mask)
        else:
            keep = (values >= torch.quantile(selected, 1.0 - top_entropy_quantile)) & mask
    bonus = entropy_coef * masked_mean(entropies, mask if keep is None else keep) if entropy_coef != 0.0 else None
    return keep, bonus, {"entropy": masked_mean(entropies, mask).detach()}


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: Optional[int]
              ) -> torch.Tensor:
    """The scalar loss of per-token losses (0 outside the bool ``mask``) by ``loss_type`` (see :func:`grpo_loss`)."""
    if loss_type == "grpo":
        return masked_mean(per_token, mask, dim=1).mean()
    if loss_type in ("dapo", "bnpo"):
        return masked_mean(per_token, mask)
    return per_token.sum() / (mask.shape[0] * max_completion_length)


# --------------------------------------------------------------------------------------------------------- GRPO


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    reference_logps: Optional[torch.Tensor] = None,
    entropies: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: Optional[int] = None,
    delta: Optional[float] = None,
    top_entropy_quantile: float = 1.0,
    entropy_coef: float = 0.0,
) -> LossResult:
    """GRPO's token-level clipped surrogate with the sequence advantage on every token, plus beta * k3 KL.

        l_t  = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) + beta * k3_t
        k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                              r_t = exp(logp_t - old_t)

    Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", eq. 3
    (k3 is Schulman's estimator, see :func:`rlmf.losses.advantages.kl_penalty`). ``A`` is the completion's
    group-relative advantage (:func:`rlmf.losses.advantages.group_advantages`). ``loss_type`` picks how the
    per-token losses ``l`` (over the mask) become the scalar:

    - ``"grpo"``: mean over each completion's tokens, then mean over completions (the paper's 1/G sum_i 1/|o_i|).
      A row with no tokens contributes 0 and still counts in the mean over completions.
    - ``"dapo"``: sum over all completion tokens of the batch / their number (Yu et al. 2025, DAPO's token-level
      loss: long completions are not down-weighted).
    - ``"bnpo"``: the same token mean (TRL's ``bnpo``: over the tokens of the minibatch at hand). TRL's ``dapo``
      divides by the rollout's tokens per minibatch instead; the two agree when the rollout is one minibatch.
    - ``"dr_grpo"``: sum over all completion tokens / (B * max_completion_length) (Liu et al. 2025, "Understanding
      R1-Zero-Like Training": a constant normaliser, so no length bias). ``max_completion_length`` is required
      here; it must be the generation limit, a constant of the run, not this batch's padded width.

    Options (TRL 1.16's, same definitions): ``delta`` the two-sided clip (:func:`clipped_surrogate`);
    ``top_entropy_quantile`` and ``entropy_coef`` (:func:`entropy_terms`; they need ``entropies``): the surrogate
    counts only on the kept tokens, the KL on every token, and ``entropy_coef`` times the mean entropy is subtracted.

    Inputs: ``logps``, ``old_logps``, ``mask`` ``[B, T]``, ``advantages`` ``[B]``, ``reference_logps`` ``[B, T]``
    (required when ``beta != 0``), ``entropies`` ``[B, T]``. Defaults: beta 0 (no reference model, as DAPO and
    Dr. GRPO recommend and TRL defaults to), eps_low = eps_high = 0.2, no delta, every token, no entropy bonus.

    Metrics (TRL 1.16 GRPOTrainer's names and definitions): ``kl`` (token mean of k3, whenever
    ``reference_logps`` is given); ``entropy`` (whenever ``entropies`` are); ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (token means of the clipped indicators),
    ``clip_ratio/low_min``, ``clip_ratio/high_max`` (extreme per-completion fractions).
    """
    mask = _check_grpo("grpo_loss", logps, old_logps, advantages, mask, reference_logps, beta, loss_type,
                       max_completion_length)
    check_clip("grpo_loss", eps_low, eps_high, delta)
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    ratio = torch.exp(torch.where(mask, logps - old_logps, zero))
    per_token, low, high = clipped_surrogate(ratio, advantages[:, None].to(logps.dtype), eps_low, eps_high, delta)
    keep, bonus, metrics = entropy_terms("grpo_loss", entropies, mask, top_entropy_quantile, entropy_coef)
    if keep is not None:
        per_token = torch.where(keep, per_token, zero)
    if reference_logps is not None:
        per_token_kl = kl_penalty(logps, reference_logps, "k3", mask=mask)
        metrics["kl"] = masked_mean(per_token_kl, mask).detach()
        if beta != 0.0:
            per_token = per_token + beta * per_token_kl
    per_token = torch.where(mask, per_token, zero)
    loss = aggregate(per_token, mask, loss_type, max_completion_length)
    if bonus is not None:
        loss = loss - bonus
    metrics.update(clip_metrics(low, high, mask, logps.dtype))
    return LossResult(loss=loss, metrics=metrics)


def _check_grpo(name: str, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, reference_logps: Optional[torch.Tensor], beta: float, loss_type: str,
                max_completion_length: Optional[int]) -> torch.Tensor:
    """GRPO's argument checks; returns the mask as bool."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"{name}: loss_type={loss_type!r} is not one of {GRPO_LOSS_TYPES}")
    mask = token_mask(name, mask, logps=logps, old_logps=old_logps)
    if advantages.shape != mask.shape[:1]:
        raise ValueError(f"{name}: advantages must have shape [B] = [{mask.shape[0]}], got {tuple(advantages.shape)}")
    if reference_logps is not None:
        token_mask(name, mask, reference_logps=reference_logps)
    elif beta != 0.0:
        raise ValueError(f"{name}: beta={beta} needs reference_logps")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError(
            f"{name}: loss_type='dr_grpo' needs max_completion_length (the generation limit, a constant of the "
            f"run), got {max_completion_length!r}"
        )
    return mask


def drop_uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: a bool ``[B]`` that is True for the groups whose rewards are not all equal.

    A group whose ``G`` completions all got the same reward (all right or all wrong) has zero group-relative
    advantage, so it contributes no gradient, only noise in the normaliser; Yu et al. 2025 (DAPO, "dynamic
    sampling") drop such groups and sample more prompts until the batch is full. Equality is exact (rewards are
    usually verifier scores). Expand to completions with ``keep.repeat_interleave(group_size)``.

    Shapes: ``rewards`` ``[B * G]`` or ``[B, G]``; returns ``[B]`` (one entry per prompt).
    """
    grouped = as_groups("drop_uniform_groups", rewards, group_size)
    return grouped.amax(dim=1) != grouped.amin(dim=1)


# ------------------------------------------------------------------------------- registered online objectives
#
# The ``online`` data format: a rollout of sampled completions, token-level ``[B, T]`` log-probs with a completion
# ``mask``, and the targets the trainer's estimator (``targets=``) computes from the rollout's rewards
# (:mod:`rlmf.modules.targets`). Rollout and advantage settings (``scale_rewards``, ``kl_coef``,
# ``mask_truncated_completions``, ...) live in ``algo.online``; what the objective itself takes is below.


@register_loss("grpo", data="online", reference=True, targets="group", choices={"loss_type": GRPO_LOSS_TYPES},
               check=online_check("grpo"))
def grpo(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropies: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: Optional[int] = None,
    delta: Optional[float] = None,
    top_entropy_quantile: float = 1.0,
    entropy_coef: float = 0.0,
) -> LossResult:
    """GRPO on a rollout: the clipped token-level surrogate with the completion's group-relative advantage.

        loss = 1/B sum_i 1/|o_i| sum_t [-min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t]

    Shao et al. 2024, "DeepSeekMath" (eq. 3): :func:`grpo_loss`. ``loss_type`` ``grpo`` (above), ``dapo`` or
    ``bnpo`` (token sum over the batch's token count) or ``dr_grpo`` (over B * max_completion_length; with the
    default None the online trainer fills ``max_completion_length`` with its generation limit). Defaults: beta 0.04
    (the paper's KL coefficient), eps_low = eps_high = 0.2 (raise eps_high for DAPO's clip-higher, e.g. 0.28),
    loss_type grpo. Options, off by default: ``delta`` None (INTELLECT-2's two-sided clip, e.g. 4),
    ``top_entropy_quantile`` 1.0 (train on that top fraction of tokens by entropy; Wang et al. 2025 use 0.2) and
    ``entropy_coef`` 0.0 (an entropy bonus); the last two make the trainer compute ``entropies``.

    Inputs: ``policy_logps`` (carries gradient), ``old_logps`` (the sampling policy's), ``reference_logps``,
    ``mask`` ``[B, T]``; ``advantages`` ``[B]``; optional ``entropies`` ``[B, T]``. Metrics: ``kl`` (token mean of
    k3), ``clip_ratio/*`` and ``entropy``.
    """
    return grpo_loss(policy_logps, old_logps, advantages, mask, reference_logps, entropies, beta=beta,
                     eps_low=eps_low, eps_high=eps_high, loss_type=loss_type,
                     max_completion_length=max_completion_length, delta=delta,
                     top_entropy_quantile=top_entropy_quantile, entropy_coef=entropy_coef)
