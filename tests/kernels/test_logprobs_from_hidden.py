"""logprobs_from_hidden (both backends) against float64 log-probs of the materialised ``hidden @ weight.T + bias``.

Tolerances (|actual - ref| <= atol + rtol * |ref|), on log-probs, entropies and the gradients of
``a.logp + b.entropy`` w.r.t. hidden, weight and bias:

- float64 inputs: atol = rtol = 1e-10.
- float32 inputs: forward atol = 1e-6 * max(1, |logits|_max / T), rtol = 1e-5 (float32 matmul and accumulation);
  gradients atol = (1e-5 + 2**-22 * max(1, |logits|_max / T)) * max(1, |grad|_max), rtol = 1e-4: the softmax's
  relative error is the absolute rounding error of the float32 logits, which grows with their magnitude.
- bfloat16 inputs: forward atol = 2**-7 * max(1, |logits|_max / T): the torch backend rounds each logit to bf16 like
  ``F.linear`` (half an ulp, up to 2**-9 relative, moves lse and the label logit each); gradients, returned in bf16
  after bf16 GEMMs: atol = 3e-2 * |grad|_max, rtol = 3e-2.
"""

import pytest
import torch

from logprobs_reference import BACKENDS, DEVICES, random_labels, reference_logprobs, upstream
from rlmf.kernels import logprobs_from_hidden

DTYPES = (torch.float64, torch.float32, torch.bfloat16)

# name: (N, H, V, logit scale, temperature, bias, ignored rows, layout, chunk_size)
CASES = {
    "vocab_1": (3, 16, 1, 1.0, 1.0, False, "some", "contiguous", (2, 1)),
    "odd_shapes_bias": (19, 20, 45, 2.0, 1.3, True, "some", "contiguous", (8, 16)),
    "no_bias_int_chunk": (33, 40, 70, 2.0, 1.0, False, "some", "contiguous", 600),
    "large_logits": (9, 24, 37, 1e3, 1.0, True, "some", "contiguous", (4, 8)),
    "all_ignored": (6, 16, 29, 1.0, 1.0, True, "all", "contiguous", (4, 8)),
    "strided": (10, 18, 35, 2.0, 0.8, True, "none", "strided", (16, 16)),
}


def _inputs(n, h, v, scale, bias, layout, dtype, device, generator):
    """Logits ~ N(0, scale^2); a scale above 100 becomes a bias offset instead (logits ~ scale + N(0, 4^2)).

    Large logits with a large spread are tested on logprobs_from_logits; here they would make the float32
    reference comparison ill-conditioned (the gradient moves by |W| times the matmul's rounding of the logits).
    """
    offset = scale if scale > 100 else 0.0
    scale = min(scale, 4.0)
    std = scale / h**0.5
    if layout == "strided":  # every other token row; weight stored [H, V] and viewed as [V, H]
        hidden = torch.randn(2 * n, h, generator=generator, dtype=torch.float64).to(dtype)[::2]
        weight = (torch.randn(h, v, generator=generator, dtype=torch.float64) * std).to(dtype).t()
        b = offset + torch.randn(2 * v, generator=generator, dtype=torch.float64) * scale
        b = b.to(dtype)[::2] if bias else None
        assert not hidden.is_contiguous() and not weight.is_contiguous()
    else:
        hidden = torch.randn(n, h, generator=generator, dtype=torch.float64).to(dtype)
        weight = (torch.randn(v, h, generator=generator, dtype=torch.float64) * std).to(dtype)
        b = (offset + torch.randn(v, generator=generator, dtype=torch.float64) * scale).to(dtype) if bias else None
    tensors = [hidden, weight] + ([b] if bias else [])
    return [t.to(device).requires_grad_() for t in tensors]


# bf16 logits of magnitude 1e3 carry an absolute rounding error of ~4: that pair is left out of the grid.
GRID = [
    (case, dtype, backend)
    for case in CASES
    for dtype in DTYPES
    for backend in BACKENDS
    if not (dtype == torch.bfloat16 and CASES[case][3] > 100)
]


@pytest.mark.parametrize("case, dtype, backend", GRID, ids=[f"{c}-{d}-{b}" for c, d, b in GRID])
def test_forward_and_backward_match_float64_reference(case, dtype, backend):
    n, h, v, scale, temperature, has_bias, ignored, layout, chunk_size = CASES[case]
    device = DEVICES[backend]
    generator = torch.Generator().manual_seed(sum(map(ord, case)))
    inputs = _inputs(n, h, v, scale, has_bias, layout, dtype, device, generator)
    hidden, weight = inputs[:2]
    bias = inputs[2] if has_bias else None
    labels = random_labels(n, v, ignored, generator).to(device)
    grad_logp, grad_entropy = (g.to(device) for g in upstream(n, generator))

    logp, entropy = logprobs_from_hidden(
        hidden, weight, labels, bias, temperature=temperature,
        return_entropy=True, backend=backend, chunk_size=chunk_size,
    )
    assert logp.dtype == entropy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ((logp.double() * grad_logp).sum() + (entropy.double() * grad_entropy).sum()).backward()

    refs = [t.detach().double().requires_grad_() for t in inputs]
    logits = refs[0] @ refs[1].t() + (refs[2] if has_bias else 0)
    ref_logp, ref_entropy = reference_logprobs(logits, labels, temperature=temperature)
    ((ref_logp * grad_logp).sum() + (ref_entropy * grad_entropy).sum()).backward()

    logit_scale = max(1.0, logits.detach().abs().max().item() / temperature)
    if dtype == torch.float64:
        forward_tol = dict(atol=1e-10, rtol=1e-10)
    elif dtype == torch.float32:
        forward_tol = dict(atol=1e-6 * logit_scale, rtol=1e-5)
    else:
        forward_tol = dict(atol=2**-7 * logit_scale, rtol=0.0)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), **forward_tol)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), **forward_tol)

    for ours, ref, name in zip(inputs, refs, ("hidden", "weight", "bias")):
        assert ours.grad is not None and ours.grad.dtype == dtype and ours.grad.shape == ours.shape, name
        top = max(1.0, ref.grad.abs().max().item())
        if dtype == torch.float64:
            tol = dict(atol=1e-10, rtol=1e-10)
        elif dtype == torch.float32:
            tol = dict(atol=(1e-5 + 2**-22 * logit_scale) * top, rtol=1e-4)
        else:
            tol = dict(atol=3e-2 * top, rtol=3e-2)
        torch.testing.assert_close(ours.grad.double(), ref.grad, **tol, msg=lambda m: f"grad {name}: {m}")
    if ignored == "all":
        assert torch.all(logp == 0) and torch.all(entropy == 0)
        assert all(torch.all(t.grad == 0) for t in inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_and_logprobs_only(backend):
    """weight without grad (a frozen LM head): only hidden gets a gradient; the default call returns logp alone."""
    device = DEVICES[backend]
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(12, 16, generator=generator).to(device).requires_grad_()
    weight = (torch.randn(50, 16, generator=generator) * 0.5).to(device)
    labels = random_labels(12, 50, "some", generator).to(device)
    logp = logprobs_from_hidden(hidden, weight, labels, backend=backend, chunk_size=(5, 20))
    logp.sum().backward()
    reference = hidden.detach().double().requires_grad_()
    ref_logp, _ = reference_logprobs(reference @ weight.double().t(), labels)
    ref_logp.sum().backward()
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), reference.grad, atol=1e-5, rtol=1e-4)
    assert weight.grad is None


def test_chunk_size_does_not_change_the_result():
    """One tile, token-and-vocab tiles and vocab-only tiles give the same float64 result."""
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(21, 12, generator=generator, dtype=torch.float64)
    weight = torch.randn(53, 12, generator=generator, dtype=torch.float64)
    labels = random_labels(21, 53, "some", generator)
    results = []
    for chunk_size in ((21, 53), (4, 7), (21, 10), 1 << 20, 1):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, entropy = logprobs_from_hidden(h, w, labels, return_entropy=True, backend="torch", chunk_size=chunk_size)
        (logp.sum() + entropy.sum()).backward()
        results.append([logp, entropy, h.grad, w.grad])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_gradient(backend):
    """A loss on the entropy alone (an entropy bonus) gets the entropy's gradient and nothing else."""
    device = DEVICES[backend]
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(10, 16, generator=generator, dtype=torch.float64).to(device).requires_grad_()
    weight = torch.randn(40, 16, generator=generator, dtype=torch.float64).to(device).requires_grad_()
    labels = random_labels(10, 40, "some", generator).to(device)
    _, entropy = logprobs_from_hidden(hidden, weight, labels, return_entropy=True, backend=backend, chunk_size=(4, 16))
    entropy.sum().backward()
    refs = [t.detach().requires_grad_() for t in (hidden, weight)]
    reference_logprobs(refs[0] @ refs[1].t(), labels)[1].sum().backward()
    for ours, ref in zip((hidden, weight), refs):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-10, rtol=1e-10)
