"""HyPO's reverse-KL term: its gradient is an unbiased estimate of the gradient of KL(pi || ref).

The policy is a softmax over a few outcomes with logits ``theta``, so KL(pi || ref) and its gradient are exact
(autograd through the closed form). Each row of the online batch holds k samples for one "prompt" (all prompts
share ``theta``); to get one gradient per row, every row gets its own copy of ``theta`` and the gradient of the
batch-mean loss with respect to copy b is 1/R times row b's gradient.

- Enumeration: every one of the n^k sample tuples is a row; weighting each row's gradient by the tuple's
  probability gives the estimator's exact expectation, which must equal the exact gradient to float64 rounding.
- Sampling: R rows drawn from pi; the mean of the row gradients must lie within 5 standard errors (the sample
  standard deviation over sqrt(R)) of the exact gradient in every coordinate. For a fixed seed this is
  deterministic; were the seed changed, a correct estimator would fail a coordinate with probability about 6e-7
  (normal tails; R = 20000 makes the mean close to normal). The same tolerance is shown to reject a baseline
  that includes the sample itself, whose expectation is (k - 1) / k times the true gradient.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from rlmf.losses import get_loss, loss_inputs

hypo = get_loss("hypo")
F64 = torch.float64


def exact_kl_and_gradient(theta: torch.Tensor, log_ref: torch.Tensor):
    theta = theta.detach().clone().requires_grad_()
    log_pi = torch.log_softmax(theta, dim=-1)
    kl = (log_pi.exp() * (log_pi - log_ref)).sum()
    (grad,) = torch.autograd.grad(kl, theta)
    return kl.detach(), grad


def per_row_gradients(theta: torch.Tensor, log_ref: torch.Tensor, samples: torch.Tensor, kl_weight: float = 1.0):
    """Row b's gradient of the KL term with respect to theta, for samples [R, k] of outcome indices."""
    rows = samples.shape[0]
    theta_rows = theta.detach().repeat(rows, 1).requires_grad_()
    log_pi = torch.log_softmax(theta_rows, dim=-1)
    # The offline pairs do not depend on theta: all-zero log-probs make the DPO part a constant (log 2).
    offline = torch.zeros(rows, dtype=F64)
    result = hypo(
        policy_chosen_logps=offline,
        policy_rejected_logps=offline,
        reference_chosen_logps=offline,
        reference_rejected_logps=offline,
        policy_online_logps=log_pi.gather(1, samples),
        reference_online_logps=log_ref[samples],
        kl_weight=kl_weight,
    )
    (grad,) = torch.autograd.grad(result.loss, theta_rows)
    return grad * rows / kl_weight, result


def policy_and_reference(outcomes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    theta = 1.5 * torch.randn(outcomes, generator=g, dtype=F64)
    log_ref = torch.log_softmax(torch.randn(outcomes, generator=g, dtype=F64), dim=-1)
    return theta, log_ref


@pytest.mark.parametrize("outcomes,k", [(3, 2), (3, 3), (4, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_expected_gradient_equals_exact_kl_gradient_by_enumeration(outcomes, k, seed):
    theta, log_ref = policy_and_reference(outcomes, seed)
    exact_kl, exact_grad = exact_kl_and_gradient(theta, log_ref)
    assert exact_grad.abs().max() > 1e-2  # a zero gradient would make the comparison vacuous

    samples = torch.tensor(list(itertools.product(range(outcomes), repeat=k)))
    pi = torch.softmax(theta, dim=-1)
    tuple_probability = pi[samples].prod(dim=1)
    torch.testing.assert_close(tuple_probability.sum(), torch.tensor(1.0, dtype=F64))

    grads, _ = per_row_gradients(theta, log_ref, samples, kl_weight=0.37)
    expected_grad = (tuple_probability[:, None] * grads).sum(dim=0)
    torch.testing.assert_close(expected_grad, exact_grad, atol=1e-12, rtol=1e-10)

    # The reported value is the Monte Carlo KL estimate: its expectation is the exact KL.
    per_tuple_kl = torch.stack([per_row_gradients(theta, log_ref, s[None])[1].metrics["kl"] for s in samples])
    torch.testing.assert_close((tuple_probability * per_tuple_kl).sum(), exact_kl, atol=1e-12, rtol=1e-10)


def test_sampled_gradient_mean_is_within_five_standard_errors():
    outcomes, k, rows = 4, 4, 20_000
    theta, log_ref = policy_and_reference(outcomes, seed=5)
    exact_kl, exact_grad = exact_kl_and_gradient(theta, log_ref)
    g = torch.Generator().manual_seed(6)
    samples = torch.multinomial(torch.softmax(theta, -1), rows * k, replacement=True, generator=g).view(rows, k)

    grads, result = per_row_gradients(theta, log_ref, samples)
    mean = grads.mean(dim=0)
    standard_error = grads.std(dim=0) / rows**0.5
    assert ((mean - exact_grad).abs() <= 5 * standard_error).all(), (mean, exact_grad, standard_error)
    # The KL metric over the whole batch is the plain sample mean of the log-ratios; same 5-SE criterion.
    log_ratios = torch.log_softmax(theta, -1)[samples] - log_ref[samples]
    kl_standard_error = log_ratios.std() / log_ratios.numel() ** 0.5
    assert (result.metrics["kl"] - exact_kl).abs() <= 5 * kl_standard_error

    # Power: a baseline that includes the sample itself (the plain group mean) scales every advantage, hence
    # the whole gradient, by (k - 1) / k. The tolerance above must be tight enough to reject that.
    biased_mean = mean * (k - 1) / k
    assert ((biased_mean - exact_grad).abs() > 5 * standard_error).any()


def test_online_gradient_is_the_leave_one_out_advantage(make_inputs):
    """d loss / d policy_online_logps[b, i] = kl_weight * (r_bi - mean_{j != i} r_bj) / (B k), computed here by
    an explicit loop; and the value is DPO plus kl_weight times the mean log-ratio."""
    inputs = make_inputs("hypo", batch_size=3, online_samples=4)
    inputs["policy_online_logps"].requires_grad_()
    kl_weight = 0.2
    result = hypo(**inputs, kl_weight=kl_weight)
    (grad,) = torch.autograd.grad(result.loss, inputs["policy_online_logps"])

    r = (inputs["policy_online_logps"] - inputs["reference_online_logps"]).detach()
    rows, k = r.shape
    expected = torch.empty_like(r)
    for b in range(rows):
        for i in range(k):
            others = [r[b, j] for j in range(k) if j != i]
            expected[b, i] = kl_weight * (r[b, i] - sum(others) / (k - 1)) / (rows * k)
    torch.testing.assert_close(grad, expected, atol=1e-14, rtol=1e-12)

    dpo = get_loss("dpo")(**{key: inputs[key] for key in loss_inputs("dpo")})
    torch.testing.assert_close(result.metrics["kl"], r.mean())
    torch.testing.assert_close(result.loss, dpo.loss + kl_weight * r.mean(), atol=1e-14, rtol=1e-12)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        torch.testing.assert_close(result.metrics[name], dpo.metrics[name])


def test_offline_gradient_is_dpos(make_inputs):
    inputs = make_inputs("hypo", batch_size=3)
    chosen = inputs["policy_chosen_logps"].requires_grad_()
    ours = torch.autograd.grad(hypo(**inputs).loss, chosen)[0]
    dpo_inputs = {key: inputs[key] for key in loss_inputs("dpo")}
    reference = torch.autograd.grad(get_loss("dpo")(**dpo_inputs).loss, chosen)[0]
    torch.testing.assert_close(ours, reference, atol=1e-15, rtol=1e-12)
