"""More of the DPO family: other ways to turn a pair's policy-vs-reference log-ratios into a loss.

Same inputs and notation as :mod:`rlmf.losses.dpo`: four [B] tensors of sequence log-probs summed over completion
tokens (``policy_chosen_logps``, ``policy_rejected_logps``, ``reference_chosen_logps``,
``reference_rejected_logps``), and

    rho_c = pi_c - ref_c        rho_r = pi_r - ref_r        margin = rho_c - rho_r

Every loss here logs the implicit rewards ``beta * rho_c`` and ``beta * rho_r`` as ``rewards/chosen`` and
``rewards/rejected`` (batch means), their difference as ``rewards/margins`` and the fraction of pairs with
``rho_c > rho_r`` as ``rewards/accuracies``, as TRL does for them. What differs is the loss: another link on the
margin (``exo_pair``, ``discopop``, ``f_dpo``), a target for each log-ratio on its own (``nca_pair``, ``bco_pair``,
``sppo_hard``), or a comparison of distributions over the batch rather than pair by pair (``aot``,
``aot_unpaired``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from rlmf.losses.registry import LossResult, register_loss
from rlmf.losses._common import check_fraction, check_weights, implicit_reward_result, paired_log_ratios, weighted_mean


@register_loss("nca_pair", data="paired", reference=True)
def nca_pair(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
) -> LossResult:
    """Noise Contrastive Alignment on a pair: each response is classified as data or noise by its reward.

        loss = mean(-log sigmoid(beta * rho_c) - 0.5 * log sigmoid(-beta * rho_c) - 0.5 * log sigmoid(-beta * rho_r))

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards": NCA with K = 2
    responses and a hard preference (the chosen response takes all the target weight; each of the K responses pays
    1/K for being noise). Each log-ratio is pulled towards its own target, not only the margin, so the chosen
    likelihood cannot fall together with the rejected one as it may under DPO. Default beta 0.1 (TRL's).
    Inputs: four [B] summed log-probs (see the module docstring).
    """
    rho_c, rho_r = paired_log_ratios(
        "nca_pair", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    r_c, r_r = beta * rho_c, beta * rho_r
    per_pair = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, policy_chosen_logps,
                                  policy_rejected_logps)


@register_loss("exo_pair", data="paired", reference=True)
def exo_pair(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.001,
) -> LossResult:
    """EXO on a pair: the KL from the policy's preference distribution over the pair to a smoothed label.

        q = sigmoid(beta * margin)
        loss = mean(q * (log q - log(1 - eps)) + (1 - q) * (log(1 - q) - log(eps)))

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", EXO with K = 2 and
    preference labels: ``q`` is the softmax of ``beta * rho`` over {chosen, rejected}, the target puts
    ``1 - eps`` on the chosen, and the loss is KL(q || target), the reverse (mode-seeking) direction where DPO's
    logistic loss is the forward one. Its minimiser is the finite margin ``log((1 - eps) / eps) / beta``.
    ``label_smoothing`` is eps, as in TRL's ``exo_pair``; it must lie in (0, 0.5] (at 0 the target puts no mass on
    the rejected response and the loss is infinite, which is what TRL's default of 0 gives). Defaults: beta 0.1,
    label_smoothing 0.001 (the paper's recommended eps = 1e-3).
    Inputs: four [B] summed log-probs (see the module docstring).
    """
    if not 0 < label_smoothing <= 0.5:
        raise ValueError(f"exo_pair: label_smoothing={label_smoothing} must lie in (0, 0.5] (at 0 the loss is "
                         "infinite)")
    rho_c, rho_r = paired_log_ratios(
        "exo_pair", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (rho_c - rho_r)
    chosen = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-label_smoothing))
    rejected = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(label_smoothing))
    per_pair = chosen + rejected
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, policy_chosen_logps,
                                  policy_rejected_logps)


@register_loss("bco_pair", data="paired", reference=True)
def bco_pair(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
) -> LossResult:
    """BCO on pairs: a binary classifier of chosen (positive) against rejected (negative), whose logit is the
    implicit reward shifted by ``delta``.

        delta = batch mean of (beta * rho_c + beta * rho_r) / 2        (detached)
        loss = mean(-log sigmoid(beta * rho_c - delta) - log sigmoid(-(beta * rho_r - delta)))

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment". The paper's reward shift
    delta is a running mean of the rewards over training. A running mean is state carried from step to step; to
    keep the loss a pure function of its inputs delta is the mean over this batch (``weights``-weighted when given,
    so that integer weights equal repeated pairs): a running mean over a window of one batch, which is also what
    the running mean of earlier TRL versions held at their first step. TRL 1.16's ``bco_pair`` has no shift
    (delta = 0). delta is detached, as the paper's running mean is a constant to each step's gradient, so the
    gradient is not the full derivative of this batch function (finite differences would also move delta). Under
    DDP each rank shifts by its own batch's mean. delta is logged as ``rewards/delta``. Default beta 0.1 (TRL's).
    Inputs: four [B] summed log-probs (see the module docstring).
    """
    rho_c, rho_r = paired_log_ratios(
        "bco_pair", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    r_c, r_r = beta * rho_c, beta * rho_r
    delta = weighted_mean((r_c + r_r).detach() / 2, weights)
    per_pair = -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, policy_chosen_logps,
                                  policy_rejected_logps, {"rewards/delta": delta})


@register_loss("sppo_hard", data="paired", reference=True)
def sppo_hard(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
) -> LossResult:
    """SPPO with hard win probabilities: regress the chosen log-ratio onto ``1 / (2 beta)``, the rejected onto
    ``-1 / (2 beta)``.

        loss = mean((rho_c - 1 / (2 beta)) ** 2 + (rho_r + 1 / (2 beta)) ** 2)

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment". SPPO's square loss regresses
    each response's log-ratio onto ``eta * (P(y wins) - 1/2)``; the paper estimates P with a preference model on
    samples of the current policy. Here P is 1 for the chosen and 0 for the rejected response and eta = 1 / beta
    (TRL's ``sppo_hard``). beta must be > 0; default 0.1 (TRL's), i.e. targets of +-5 nats.
    Inputs: four [B] summed log-probs (see the module docstring).
    """
    if beta <= 0:
        raise ValueError(f"sppo_hard: beta={beta} must be > 0 (the targets are +-1 / (2 beta))")
    rho_c, rho_r = paired_log_ratios(
        "sppo_hard", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    per_pair = (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, policy_chosen_logps,
                                  policy_rejected_logps)


def quantile_coupling(a: torch.Tensor, b: torch.Tensor, weights: Optional[torch.Tensor] = None):
    """The monotone coupling of two samples ``a`` and ``b`` ([B] each, same weights): ``(a_q, b_q, mass)``.

    For every level q in (0, 1] the q-quantile of ``a`` is paired with the q-quantile of ``b``; this is the
    optimal-transport coupling of two distributions on the line. Without ``weights`` it is ``sort(a)`` against
    ``sort(b)`` with mass 1/B each. With ``weights`` [B] (row i of both samples weighs ``w_i``) the two cumulative
    weight curves are merged: each of the (up to) 2B segments between their steps pairs one ``a`` with one ``b``
    and has the segment's length as mass. Integer weights give exactly the coupling of the repeated rows.
    The masses sum to 1 (0 if every weight is 0) and carry no gradient.
    """
    a_sorted, a_order = torch.sort(a)
    b_sorted, b_order = torch.sort(b)
    if weights is None:
        return a_sorted, b_sorted, torch.full_like(a_sorted, 1.0 / a.shape[0])
    # Cumulative weights in float64: they only place the segments, and must not lose exactness in bf16.
    check_weights(a, weights)
    w = weights.detach().to(torch.float64)
    total = w.sum().clamp(min=1e-300)
    a_cdf = w[a_order].cumsum(0) / total
    b_cdf = w[b_order].cumsum(0) / total
    ends = torch.sort(torch.cat([a_cdf, b_cdf])).values
    mass = torch.diff(ends, prepend=ends.new_zeros(1))
    last = a.shape[0] - 1  # rounding may leave an end a hair above one curve's last step
    a_index = torch.searchsorted(a_cdf, ends).clamp(max=last)
    b_index = torch.searchsorted(b_cdf, ends).clamp(max=last)
    return a_sorted[a_index], b_sorted[b_index], mass.to(a.dtype)


def _aot_loss(a, b, weights, beta, label_smoothing):
    """Label-smoothed logistic loss on the quantile differences ``a_q - b_q``, integrated over q."""
    a_q, b_q, mass = quantile_coupling(a, b, weights)
    logits = beta * (a_q - b_q)
    per_quantile = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return per_quantile.mean() if weights is None else (mass * per_quantile).sum()


@register_loss("aot", data="paired", reference=True)
def aot(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossResult:
    """AOT, paired: the policy's distribution of margins should dominate the reference's, quantile by quantile.

        m = pi_c - pi_r        m_ref = ref_c - ref_r        d = sort(m) - sort(m_ref)        (each [B])
        loss = mean_k(-(1 - eps) * log sigmoid(beta * d_k) - eps * log sigmoid(-beta * d_k))

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport". Sorting pairs the k-th
    smallest policy margin with the k-th smallest reference margin (the optimal-transport coupling of the two
    one-dimensional distributions), so the loss penalises violations of first-order stochastic dominance over the
    batch rather than each pair's own margin: ``d_k`` is not the margin of any one pair, and the loss depends on
    which pairs share a batch. TRL's ``aot``. ``label_smoothing`` eps lies in [0, 0.5], as in cDPO. Defaults:
    beta 0.1, label_smoothing 0.0 (TRL's). With ``weights`` [B] both distributions are weighted and their
    quantiles coupled (:func:`quantile_coupling`; integer weights equal repeated pairs).
    Inputs: four [B] summed log-probs (see the module docstring).
    """
    check_fraction("aot", "label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=True)
    rho_c, rho_r = paired_log_ratios(
        "aot", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    loss = _aot_loss(policy_chosen_logps - policy_rejected_logps, reference_chosen_logps - reference_rejected_logps,
                     weights, beta, label_smoothing)
    return implicit_reward_result(loss, beta, rho_c, rho_r, policy_chosen_logps, policy_rejected_logps)


@register_loss("aot_unpaired", data="paired", reference=True)
def aot_unpaired(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossResult:
    """AOT, unpaired: the distribution of chosen log-ratios should dominate that of rejected log-ratios.

        d = sort(rho_c) - sort(rho_r)        ([B])
        loss = mean_k(-(1 - eps) * log sigmoid(beta * d_k) - eps * log sigmoid(-beta * d_k))

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport", the unpaired variant:
    which chosen response goes with which rejected one is ignored, only the two distributions of log-ratios are
    compared (by the same quantile coupling as :func:`aot`). It reads paired batches, as TRL 1.16's
    ``aot_unpaired`` does (TRL called it ``aot_pair`` before), so every batch holds both kinds of response.
    ``label_smoothing`` eps lies in [0, 0.5]. Defaults: beta 0.1, label_smoothing 0.0 (TRL's). With ``weights``
    [B] each pair's two log-ratios carry its weight.
    Inputs: four [B] summed log-probs (see the module docstring).
    """
    check_fraction("aot_unpaired", "label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=True)
    rho_c, rho_r = paired_log_ratios(
        "aot_unpaired", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    loss = _aot_loss(rho_c, rho_r, weights, beta, label_smoothing)
    return implicit_reward_result(loss, beta, rho_c, rho_r, policy_chosen_logps, policy_rejected_logps)


@register_loss("discopop", data="paired", reference=True)
def discopop(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    tau: float = 0.05,
) -> LossResult:
    """DiscoPOP (log-ratio modulated loss): DPO's logistic loss blended with an exponential loss by the margin.

        x = beta * margin        s = sigmoid(x / tau)
        loss = mean((1 - s) * -log sigmoid(x) + s * exp(-x))

    Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language Models" (the
    LRML objective an LLM proposed, DiscoPOP). Pairs with a negative margin get the logistic loss, pairs already
    separated the exponential one, and ``tau`` sets how sharp the switch is. Defaults: beta 0.1 (TRL's), tau 0.05
    (the paper's). ``s * exp(-x)`` is computed as ``exp(log sigmoid(x / tau) - x)``: the same value, but finite
    where ``exp(-x)`` alone overflows (0 * inf).
    Inputs: four [B] summed log-probs (see the module docstring).
    """
    if tau <= 0:
        raise ValueError(f"discopop: tau={tau} must be > 0")
    rho_c, rho_r = paired_log_ratios(
        "discopop", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    x = beta * (rho_c - rho_r)
    per_pair = torch.sigmoid(-x / tau) * -F.logsigmoid(x) + torch.exp(F.logsigmoid(x / tau) - x)
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, policy_chosen_logps,
                                  policy_rejected_logps)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# exp(80) ~ 5.5e34: far beyond any useful score, and still finite in bf16 and float32 after scaling by beta.
_MAX_EXPONENT = 80.0


def f_divergence_score(log_ratio: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """``f'(u)`` at the likelihood ratio ``u = exp(log_ratio)``, for the f-divergences of f-DPO.

    reverse_kl: ``log u``; forward_kl: ``1 - 1/u``; js_divergence: ``log(2u / (1 + u))``; alpha_divergence:
    ``(1 - u**-alpha) / alpha`` (alpha -> 0 is reverse_kl, alpha = 1 forward_kl). Exponents are capped at 80.
    """
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp((-log_ratio).clamp(max=_MAX_EXPONENT))
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(log_ratio)
    return (1 - torch.exp((-alpha * log_ratio).clamp(max=_MAX_EXPONENT))) / alpha


@register_loss("f_dpo", data="paired", reference=True)
def f_dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossResult:
    """f-DPO: DPO with the reverse-KL penalty to the reference replaced by another f-divergence.

        loss = mean(-log sigmoid(beta * (f'(exp(rho_c)) - f'(exp(rho_r)))))

    Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints". ``f'`` is the derivative of the divergence's generator (:func:`f_divergence_score`):
    ``f_divergence_type`` is one of reverse_kl (``log u``: DPO itself), forward_kl (``1 - 1/u``), js_divergence
    (``log(2u / (1 + u))``) and alpha_divergence (``(1 - u**-alpha) / alpha`` with alpha =
    ``f_alpha_divergence_coef`` in (0, 1), the paper's convention: alpha -> 0 tends to reverse KL, alpha -> 1 to
    forward KL). TRL 1.16's code computes ``(u**(alpha - 1) - 1) / (alpha - 1)``, i.e. its alpha is our
    ``1 - alpha``; the two agree at the default 0.5. Defaults: beta 0.1, f_divergence_type reverse_kl,
    f_alpha_divergence_coef 0.5 (TRL's); choose the divergence to get anything but DPO.
    Inputs: four [B] summed log-probs (see the module docstring).
    """
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_dpo: f_divergence_type={f_divergence_type!r} is not one of {', '.join(F_DIVERGENCES)}")
    if f_divergence_type == "alpha_divergence" and not 0 < f_alpha_divergence_coef < 1:
        raise ValueError(f"f_dpo: f_alpha_divergence_coef={f_alpha_divergence_coef} must lie in (0, 1) (its limits "
                         "are f_divergence_type=reverse_kl at 0 and forward_kl at 1)")
    rho_c, rho_r = paired_log_ratios(
        "f_dpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    score_c = f_divergence_score(rho_c, f_divergence_type, f_alpha_divergence_coef)
    score_r = f_divergence_score(rho_r, f_divergence_type, f_alpha_divergence_coef)
    per_pair = -F.logsigmoid(beta * (score_c - score_r))
    return implicit_reward_result(weighted_mean(per_pair, weights), beta, rho_c, rho_r, policy_chosen_logps,
                                  policy_rejected_logps)
