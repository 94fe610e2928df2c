"""Online-RL objectives: PPO, GRPO (and its DAPO / Dr. GRPO variants), RLOO and online DPO, as pure functions.

They are registered in ``LOSSES`` (as ``ppo``, ``grpo``, ``rloo`` and ``online_dpo``, data format ``online``: they
consume rollouts, sampled completions with their advantages and the log-probs of the policy that sampled them; see
the end of this module). Each returns a
:class:`~rlmf.losses.LossResult` with detached scalar metrics.

Token-level inputs are ``[B, T]`` with a ``mask`` ``[B, T]`` of completion tokens (bool, or 0/1 of any dtype; see
:mod:`rlmf.losses.advantages`): ``logps`` are the current policy's log-probs of the sampled tokens (the only input
that carries gradient), ``old_logps`` those of the policy that sampled them (detached), ``reference_logps`` the
frozen reference's. Positions outside the mask are never read into the loss, its gradient or the metrics.

With ``r = exp(logp - old_logp)`` the probability ratio, every objective here is the clipped surrogate of
Schulman et al. 2017, "Proximal Policy Optimization Algorithms":

    L = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)

Asymmetric bounds (``eps_high > eps_low``) are DAPO's "clip-higher" (Yu et al. 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale"): more room for raising the probability of unlikely tokens.

Metric names follow TRL where it logs the quantity: GRPO and RLOO use TRL 1.16's ``kl`` and ``clip_ratio/*``;
PPO (not in TRL 1.16) uses the names of TRL's former PPO trainers (``loss/policy``, ``policy/clipfrac``, ...).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from rlmf.losses import LossResult, register_loss
from rlmf.losses._common import check_batch, check_fraction, preference_metrics
from rlmf.losses.advantages import as_groups, kl_penalty, masked_mean, token_mask

GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def _check_clip(name: str, eps_low: float, eps_high: float) -> None:
    check_fraction(name, "eps_low", eps_low, 0.0, 1.0, high_inclusive=False)
    if eps_high < 0:
        raise ValueError(f"{name}: eps_high={eps_high} must be >= 0")


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float):
    """Per-element ``-min(r A, clip(r) A)`` and the bool tensors of elements clipped below and above.

    An element is "clipped" when the clipped term is the one in force and its gradient is therefore 0: the ratio
    is below ``1 - eps_low`` with ``A < 0``, or above ``1 + eps_high`` with ``A > 0``.
    """
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
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


def _clip_metrics(
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


# ---------------------------------------------------------------------------------------------------------- PPO


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    values: Optional[torch.Tensor] = None,
    old_values: Optional[torch.Tensor] = None,
    returns: Optional[torch.Tensor] = None,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    value_clip: Optional[float] = 0.2,
    vf_coef: float = 0.1,
) -> LossResult:
    """PPO with a clipped value loss, as used for RLHF: token-level policy surrogate plus ``vf_coef`` * value loss.

        L_policy = masked_mean(-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A))          r = exp(logp - old_logp)
        L_value  = 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))
        loss     = L_policy + vf_coef * L_value

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (eq. 7 and the clipped value loss of its
    reference implementation); Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (per-token
    PPO on language, the KL to the reference folded into the rewards before GAE: see
    :func:`rlmf.losses.advantages.kl_penalty` and :func:`rlmf.losses.advantages.gae`). The masked means pool every
    completion token of the batch (long completions weigh more), as PPO-RLHF implementations do. ``c =
    value_clip``; ``value_clip=None`` drops the clipped branch (then ``old_values`` is not needed). Defaults: eps
    0.2 (Schulman et al.), value clip 0.2 and vf_coef 0.1 (TRL's former PPO trainer's defaults).

    Inputs: ``logps``, ``old_logps``, ``advantages`` (e.g. whitened GAE advantages, constants), ``mask`` ``[B, T]``;
    for the value loss ``values`` (the critic's current predictions, carrying gradient), ``old_values`` (its
    predictions at rollout time) and ``returns`` (GAE's lambda-returns), all ``[B, T]``. Without ``values`` the
    loss is the policy term alone.

    Metrics: ``loss/policy``; ``policy/clipfrac`` (fraction of tokens where the clipped term is in force and the
    token gets no gradient); ``policy/approxkl`` = masked_mean(0.5 * (logp - old_logp)^2) (the k2 estimate of
    KL(old || new) TRL's PPO logged); ``policy/ratio`` (mean r). With values also ``loss/value``,
    ``val/clipfrac`` (fraction where the clipped value branch is the larger), ``val/vpred`` (mean V) and
    ``val/explained_variance`` = 1 - Var(R - V) / Var(R) over the masked tokens (NaN when the returns are constant).
    """
    _check_clip("ppo_loss", eps_low, eps_high)
    mask = token_mask("ppo_loss", mask, logps=logps, old_logps=old_logps, advantages=advantages)
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    log_ratio = torch.where(mask, logps - old_logps, zero)
    ratio = torch.exp(log_ratio)
    per_token, low, high = _clipped_surrogate(ratio, torch.where(mask, advantages, zero), eps_low, eps_high)
    policy_loss = masked_mean(per_token, mask)
    metrics = {
        "loss/policy": policy_loss.detach(),
        "policy/clipfrac": masked_mean((low | high).to(logps.dtype), mask).detach(),
        "policy/approxkl": masked_mean(0.5 * log_ratio.square(), mask).detach(),
        "policy/ratio": masked_mean(ratio, mask).detach(),
    }
    if values is None:
        return LossResult(loss=policy_loss, metrics=metrics)

    if returns is None:
        raise ValueError("ppo_loss: values were given without returns (the value loss regresses V onto them)")
    if value_clip is not None and old_values is None:
        raise ValueError("ppo_loss: value_clip needs old_values (the critic's predictions at rollout time)")
    if value_clip is not None and value_clip < 0:
        raise ValueError(f"ppo_loss: value_clip={value_clip} must be >= 0 (or None for no clipping)")
    token_mask("ppo_loss", mask, values=values, returns=returns)
    if old_values is not None:
        token_mask("ppo_loss", mask, old_values=old_values)
    values_m = torch.where(mask, values, zero)
    returns_m = torch.where(mask, returns, zero)
    unclipped = (values_m - returns_m).square()
    if value_clip is None:
        per_token_value = unclipped
        value_clipfrac = torch.zeros((), dtype=logps.dtype, device=logps.device)
    else:
        old_values_m = torch.where(mask, old_values, zero)
        clipped_values = torch.clamp(values_m, old_values_m - value_clip, old_values_m + value_clip)
        clipped = (clipped_values - returns_m).square()
        per_token_value = torch.maximum(unclipped, clipped)
        value_clipfrac = masked_mean((clipped > unclipped).to(logps.dtype), mask)
    value_loss = 0.5 * masked_mean(per_token_value, mask)

    with torch.no_grad():
        residual_var = _masked_variance(returns_m - values_m, mask)
        returns_var = _masked_variance(returns_m, mask)
        nan = torch.full((), float("nan"), dtype=logps.dtype, device=logps.device)
        explained = torch.where(returns_var > 0, 1 - residual_var / returns_var.clamp(min=1e-30), nan)
    metrics.update(
        {
            "loss/value": value_loss.detach(),
            "val/clipfrac": value_clipfrac.detach(),
            "val/vpred": masked_mean(values_m, mask).detach(),
            "val/explained_variance": explained,
        }
    )
    return LossResult(loss=policy_loss + vf_coef * value_loss, metrics=metrics)


def _masked_variance(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of ``x`` over the masked entries (a ratio of two of these needs no Bessel factor)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean).square(), mask)


def adaptive_kl_coef(
    current_coef: float, observed_kl: float, target_kl: float, horizon: float, n_steps: int
) -> float:
    """The next KL coefficient of Ziegler et al.'s proportional controller.

        e       = clip(KL_observed / KL_target - 1, -0.2, 0.2)
        beta'   = beta * (1 + e * n_steps / horizon)

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2 (K_beta = 1 / horizon,
    per sample of the ``n_steps`` seen since the last update; the paper's ``horizon`` was 10000). The clipped error
    bounds the change per update to a factor in ``[1 - 0.2 n/H, 1 + 0.2 n/H]``. ``observed_kl`` is the
    batch-mean sequence KL to the reference (a float or a 0-d tensor); returns a float.
    """
    if target_kl <= 0 or horizon <= 0:
        raise ValueError(f"adaptive_kl_coef: target_kl={target_kl} and horizon={horizon} must be > 0")
    if n_steps < 0:
        raise ValueError(f"adaptive_kl_coef: n_steps={n_steps} must be >= 0")
    error = min(max(float(observed_kl) / target_kl - 1.0, -0.2), 0.2)
    return float(current_coef) * (1.0 + error * n_steps / horizon)


# --------------------------------------------------------------------------------------------------------- GRPO


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    reference_logps: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: Optional[int] = None,
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
    - ``"dr_grpo"``: sum over all completion tokens / (B * max_completion_length) (Liu et al. 2025, "Understanding
      R1-Zero-Like Training": a constant normaliser, so no length bias). ``max_completion_length`` is required
      here; it must be the generation limit, a constant of the run, not this batch's padded width.

    Inputs: ``logps``, ``old_logps``, ``mask`` ``[B, T]``, ``advantages`` ``[B]``, ``reference_logps`` ``[B, T]``
    (required when ``beta != 0``). Defaults: beta 0 (no reference model, as DAPO and Dr. GRPO recommend and TRL
    defaults to), eps_low = eps_high = 0.2.

    Metrics (TRL 1.16 GRPOTrainer's names and definitions): ``kl`` (token mean of k3, whenever
    ``reference_logps`` is given); ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``
    (token means of the clipped indicators), ``clip_ratio/low_min``, ``clip_ratio/high_max`` (extreme
    per-completion fractions).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: loss_type={loss_type!r} is not one of {GRPO_LOSS_TYPES}")
    _check_clip("grpo_loss", eps_low, eps_high)
    mask = token_mask("grpo_loss", mask, logps=logps, old_logps=old_logps)
    if advantages.shape != mask.shape[:1]:
        raise ValueError(
            f"grpo_loss: advantages must have shape [B] = [{mask.shape[0]}], got {tuple(advantages.shape)}"
        )
    if beta != 0.0 and reference_logps is None:
        raise ValueError(f"grpo_loss: beta={beta} needs reference_logps")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError(
            "grpo_loss: loss_type='dr_grpo' needs max_completion_length (the generation limit, a constant of the "
            f"run), got {max_completion_length!r}"
        )

    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    ratio = torch.exp(torch.where(mask, logps - old_logps, zero))
    per_token, low, high = _clipped_surrogate(ratio, advantages[:, None].to(logps.dtype), eps_low, eps_high)
    metrics: Dict[str, torch.Tensor] = {}
    if reference_logps is not None:
        token_mask("grpo_loss", mask, reference_logps=reference_logps)
        per_token_kl = kl_penalty(logps, reference_logps, "k3", mask=mask)
        metrics["kl"] = masked_mean(per_token_kl, mask).detach()
        if beta != 0.0:
            per_token = per_token + beta * per_token_kl
    per_token = torch.where(mask, per_token, zero)

    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif loss_type == "dapo":
        loss = masked_mean(per_token, mask)
    else:
        loss = per_token.sum() / (mask.shape[0] * max_completion_length)
    metrics.update(_clip_metrics(low, high, mask, logps.dtype))
    return LossResult(loss=loss, metrics=metrics)


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


# --------------------------------------------------------------------------------------------------------- RLOO


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
    _check_clip("rloo_loss", eps, eps_high)
    check_batch(
        "rloo_loss", sequence_logps=sequence_logps, old_sequence_logps=old_sequence_logps, advantages=advantages
    )
    ratio = torch.exp(sequence_logps - old_sequence_logps)
    per_sequence, low, high = _clipped_surrogate(ratio, advantages.to(ratio.dtype), eps, eps_high)
    return LossResult(loss=per_sequence.mean(), metrics=_clip_metrics(low, high, None, ratio.dtype))


# ------------------------------------------------------------------------------- registered online objectives
#
# The ``online`` data format: a rollout of sampled completions, token-level ``[B, T]`` log-probs with a completion
# ``mask``, and one advantage per completion computed from the rollout's rewards by the trainer
# (:mod:`rlmf.modules.online`; group-relative for GRPO, leave-one-out for RLOO). Rollout settings and the advantage
# settings (``scale_rewards``, ``kl_coef``) live in ``algo.online``; what the objective itself takes is below.


@register_loss("grpo", data="online", reference=True)
def grpo(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: Optional[int] = None,
) -> LossResult:
    """GRPO on a rollout: the clipped token-level surrogate with the completion's group-relative advantage.

        loss = 1/B sum_i 1/|o_i| sum_t [-min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t]

    Shao et al. 2024, "DeepSeekMath" (eq. 3): :func:`grpo_loss`. ``loss_type`` ``grpo`` (above), ``dapo`` (token
    sum over the batch's token count) or ``dr_grpo`` (over B * max_completion_length; with the default None the
    online trainer fills ``max_completion_length`` with its generation limit). Defaults: beta 0.04 (the paper's KL
    coefficient), eps_low = eps_high = 0.2 (raise eps_high for DAPO's clip-higher, e.g. 0.28), loss_type grpo.

    Inputs: ``policy_logps`` (carries gradient), ``old_logps`` (the sampling policy's), ``reference_logps``,
    ``mask`` ``[B, T]``; ``advantages`` ``[B]``. Metrics: ``kl`` (token mean of k3) and ``clip_ratio/*``.
    """
    return grpo_loss(policy_logps, old_logps, advantages, mask, reference_logps, beta=beta, eps_low=eps_low,
                     eps_high=eps_high, loss_type=loss_type, max_completion_length=max_completion_length)


@register_loss("ppo", data="online", reference=False)
def ppo(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    value_clip: Optional[float] = 0.2,
    vf_coef: float = 0.1,
) -> LossResult:
    """PPO-RLHF on a rollout: the token-level clipped surrogate on whitened GAE advantages plus the clipped value loss.

        loss = masked_mean(-min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t))
               + vf_coef * 0.5 * masked_mean(max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2))

    Schulman et al. 2017 (PPO); Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (the
    per-token reward ``-kl_coef * (logp_t - ref_t)`` plus the score at the last token, GAE, a fixed or adaptive
    ``kl_coef``): :func:`ppo_loss`. The KL is in the advantages, built by the online trainer from
    ``algo.online`` (``kl_coef``, ``kl_target``, ``gamma``, ``lam``), so the objective takes no reference.
    ``values`` come from the value head on the policy's last hidden state (carrying gradient), ``old_values`` from
    the same head at sampling time. Defaults: eps_low = eps_high = 0.2, value_clip 0.2, vf_coef 0.1.

    Inputs: ``policy_logps``, ``old_logps``, ``advantages``, ``mask``, ``values``, ``old_values``, ``returns``, all
    ``[B, T]``. Metrics: ``loss/policy``, ``loss/value``, ``policy/clipfrac``, ``policy/approxkl``,
    ``val/explained_variance`` and the rest of :func:`ppo_loss`'s.
    """
    return ppo_loss(policy_logps, old_logps, advantages, mask, values, old_values, returns, eps_low=eps_low,
                    eps_high=eps_high, value_clip=value_clip, vf_coef=vf_coef)


@register_loss("rloo", data="online", reference=False)
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


# ---------------------------------------------------------------------------------------------------- online DPO

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


@register_loss("online_dpo", data="online", reference=True)
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
