"""PPO-RLHF: the token-level clipped surrogate on GAE advantages plus a clipped value loss, as a pure function.

Registered as ``ppo`` (data format ``online``; its targets are built by the trainer's ``gae`` estimator,
:mod:`rlmf.modules.targets`: per-token KL penalty plus the score at the last token, GAE with the value head's old
values, whitened advantages). Token-level inputs and masks follow :mod:`rlmf.losses.policy_gradient`. Metrics use
the names of TRL's former PPO trainers (``loss/policy``, ``policy/clipfrac``, ...): TRL 1.16 has no PPO trainer.
"""

from __future__ import annotations

from typing import Optional

import torch

from rlmf.losses.registry import LossResult, register_loss
from rlmf.losses.advantages import masked_mean, token_mask
from rlmf.losses.policy_gradient import check_clip, clipped_surrogate


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
    check_clip("ppo_loss", eps_low, eps_high)
    mask = token_mask("ppo_loss", mask, logps=logps, old_logps=old_logps, advantages=advantages)
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    log_ratio = torch.where(mask, logps - old_logps, zero)
    ratio = torch.exp(log_ratio)
    per_token, low, high = clipped_surrogate(ratio, torch.where(mask, advantages, zero), eps_low, eps_high)
    policy_loss = masked_mean(per_token, mask)
    metrics = {
        "loss/policy": policy_loss.detach(),
        "policy/clipfrac": masked_mean((low | high).to(logps.dtype), mask).detach(),
        "policy/approxkl": masked_mean(0.5 * log_ratio.square(), mask).detach(),
        "policy/ratio": masked_mean(ratio, mask).detach(),
    }
    if values is None:
        return LossResult(loss=policy_loss, metrics=metrics)

    value_loss, value_metrics = _value_loss(values, old_values, returns, mask, value_clip, zero)
    metrics.update(value_metrics)
    return LossResult(loss=policy_loss + vf_coef * value_loss, metrics=metrics)


def _value_loss(values: torch.Tensor, old_values: Optional[torch.Tensor], returns: Optional[torch.Tensor],
                mask: torch.Tensor, value_clip: Optional[float], zero: torch.Tensor):
    """PPO's clipped value loss ``0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))`` and
    its metrics (see :func:`ppo_loss`); ``zero`` is a 0-d zero of the log-probs' dtype and device."""
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
        value_clipfrac = torch.zeros((), dtype=zero.dtype, device=zero.device)
    else:
        old_values_m = torch.where(mask, old_values, zero)
        clipped_values = torch.clamp(values_m, old_values_m - value_clip, old_values_m + value_clip)
        clipped = (clipped_values - returns_m).square()
        per_token_value = torch.maximum(unclipped, clipped)
        value_clipfrac = masked_mean((clipped > unclipped).to(zero.dtype), mask)
    value_loss = 0.5 * masked_mean(per_token_value, mask)

    with torch.no_grad():
        residual_var = _masked_variance(returns_m - values_m, mask)
        returns_var = _masked_variance(returns_m, mask)
        nan = torch.full((), float("nan"), dtype=zero.dtype, device=zero.device)
        explained = torch.where(returns_var > 0, 1 - residual_var / returns_var.clamp(min=1e-30), nan)
    return value_loss, {"loss/value": value_loss.detach(), "val/clipfrac": value_clipfrac.detach(),
                        "val/vpred": masked_mean(values_m, mask).detach(), "val/explained_variance": explained}


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


@register_loss("ppo", data="online", reference=False, targets="gae")
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
