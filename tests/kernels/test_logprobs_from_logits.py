"""logprobs_from_logits (both backends) against float64 ``log_softmax(logits.double() / T).gather(labels)``.

Tolerances (|actual - ref| <= atol + rtol * |ref|), on log-probs, entropies and d(a.logp + b.entropy)/dlogits:

- float64 inputs: atol = rtol = 1e-10 (float64 accumulation).
- float32 / bfloat16 / float16 inputs, forward: atol = 2e-6 * max(1, |logits|_max / T), rtol = 1e-5. The inputs are
  exact in float64, so this is float32 accumulation error alone, whatever the input dtype.
- gradients: float32 as the forward; bfloat16 atol = rtol = 2e-2 (relative to the largest reference entry; the
  gradient is returned in bf16, and the interpreter truncates where a GPU rounds); float16 atol = rtol = 2e-3.
"""

import pytest
import torch

from logprobs_reference import BACKENDS, DEVICES, random_labels, reference_logprobs, upstream
from rlmf.kernels import logprobs_from_logits

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# name: (N, V, logit scale, temperature, ignored rows, layout)
CASES = {
    "vocab_1": (5, 1, 1.0, 1.0, "some", "contiguous"),
    "odd_vocab": (7, 37, 3.0, 1.0, "some", "contiguous"),
    "temperature": (6, 50, 2.0, 0.6, "none", "contiguous"),
    "large_logits": (4, 40, 1e3, 1.0, "some", "contiguous"),
    "all_ignored": (5, 20, 1.0, 1.0, "all", "contiguous"),
    "strided_columns": (6, 33, 2.0, 1.7, "some", "every_other_column"),
    "transposed": (9, 18, 2.0, 1.0, "some", "transposed"),
    "minus_inf_logits": (5, 24, 2.0, 1.0, "some", "minus_inf"),
}


def _tolerances(dtype, scale, temperature):
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-10), dict(atol=1e-10, rtol=1e-10)
    forward = dict(atol=2e-6 * max(1.0, scale / temperature), rtol=1e-5)
    grad = {
        torch.float32: forward,
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
        torch.float16: dict(atol=2e-3, rtol=2e-3),
    }
    return forward, grad[dtype]


def _make_logits(n, v, scale, layout, dtype, device, generator, labels):
    if layout == "every_other_column":
        base = torch.randn(n, 2 * v, generator=generator, dtype=torch.float64) * scale
        logits = base.to(dtype)[:, ::2]
    elif layout == "transposed":
        base = torch.randn(v, n, generator=generator, dtype=torch.float64) * scale
        logits = base.to(dtype).t()
    else:
        logits = (torch.randn(n, v, generator=generator, dtype=torch.float64) * scale).to(dtype)
    if layout == "minus_inf":  # e.g. a vocabulary mask; never on the label
        mask = torch.rand(n, v, generator=generator) < 0.3
        mask[torch.arange(n), labels.clamp_min(0)] = False
        logits = logits.masked_fill(mask, float("-inf"))
    logits = logits.to(device)
    assert (layout in ("contiguous", "minus_inf")) == logits.is_contiguous()
    return logits.requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_float64_reference(backend, dtype, case):
    n, v, scale, temperature, ignored, layout = CASES[case]
    device = DEVICES[backend]
    generator = torch.Generator().manual_seed(sum(map(ord, case)))
    labels = random_labels(n, v, ignored, generator)
    logits = _make_logits(n, v, scale, layout, dtype, device, generator, labels)
    labels = labels.to(device)
    grad_logp, grad_entropy = (g.to(device) for g in upstream(n, generator))

    logp, entropy = logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True, backend=backend)
    assert logp.dtype == entropy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert logp.shape == entropy.shape == (n,)
    ((logp.double() * grad_logp).sum() + (entropy.double() * grad_entropy).sum()).backward()

    reference = logits.detach().double().requires_grad_()
    ref_logp, ref_entropy = reference_logprobs(reference, labels, temperature=temperature)
    ((ref_logp * grad_logp).sum() + (ref_entropy * grad_entropy).sum()).backward()

    forward_tol, grad_tol = _tolerances(dtype, scale, temperature)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), **forward_tol)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), **forward_tol)
    assert logits.grad.dtype == dtype and logits.grad.shape == (n, v)
    grad_scale = max(1.0, reference.grad.abs().max().item()) if dtype in (torch.bfloat16, torch.float16) else 1.0
    torch.testing.assert_close(
        logits.grad.double(), reference.grad, atol=grad_tol["atol"] * grad_scale, rtol=grad_tol["rtol"]
    )
    ignored_rows = labels == -100
    assert torch.all(logp[ignored_rows] == 0) and torch.all(entropy[ignored_rows] == 0)
    assert torch.all(logits.grad[ignored_rows] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_only_matches_reference(backend):
    """The default call (no entropy): returns one tensor, gradient of logp alone; bf16 in, bf16 grad out."""
    device = DEVICES[backend]
    generator = torch.Generator().manual_seed(1)
    labels = random_labels(11, 45, "some", generator).to(device)
    logits = (torch.randn(11, 45, generator=generator) * 4).to(torch.bfloat16).to(device).requires_grad_()
    logp = logprobs_from_logits(logits, labels, temperature=0.9, backend=backend)
    logp.sum().backward()
    reference = logits.detach().double().requires_grad_()
    ref_logp, _ = reference_logprobs(reference, labels, temperature=0.9)
    ref_logp.sum().backward()
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad.double(), reference.grad, atol=2e-2, rtol=2e-2)


def test_backends_agree_with_each_other():
    """The Triton kernel and its PyTorch twin give the same numbers (float32, several vocabulary blocks)."""
    generator = torch.Generator().manual_seed(2)
    labels = random_labels(8, 77, "some", generator)
    logits = torch.randn(8, 77, generator=generator) * 5
    outs = {}
    for backend in BACKENDS:
        x = logits.to(DEVICES[backend]).requires_grad_()
        logp, entropy = logprobs_from_logits(x, labels.to(x.device), return_entropy=True, backend=backend)
        (logp.sum() + entropy.sum()).backward()
        outs[backend] = [t.detach().cpu() for t in (logp, entropy, x.grad)]
    for ours, theirs in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_gradient(backend):
    """A loss on the entropy alone (an entropy bonus) gets the entropy's gradient and nothing else."""
    device = DEVICES[backend]
    generator = torch.Generator().manual_seed(5)
    labels = random_labels(6, 30, "some", generator).to(device)
    logits = (torch.randn(6, 30, generator=generator, dtype=torch.float64) * 3).to(device).requires_grad_()
    _, entropy = logprobs_from_logits(logits, labels, return_entropy=True, backend=backend)
    entropy.sum().backward()
    reference = logits.detach().requires_grad_()
    reference_logprobs(reference, labels)[1].sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad, atol=1e-10, rtol=1e-10)
