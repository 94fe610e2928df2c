"""The Triton log-prob kernels compiled for the GPU, against their PyTorch twin and naive PyTorch, on CUDA.

tests/kernels runs the same kernels through Triton's interpreter on CPU, with small blocks; here they are compiled
with the GPU block sizes (logits op: vocabulary blocks of up to 8192; hidden op: cuBLAS logits tiles and row
programs over 1024-column blocks), at shapes that leave ragged last blocks on every axis.

"Naive PyTorch" is ``torch.log_softmax(hidden @ weight.T + bias) / T`` gathered at the labels (entropy
``-sum p log p``), materialised on the same device in float64 from the very same (dtype-exact) inputs, so its own
rounding does not enter the tolerances; its gradients come from autograd. Each backend is compared with it, and the
Triton backend with the PyTorch twin (``backend="torch"``, also on CUDA). Upstream gradients are random for both the
log-probs and the entropies, so the backward checks vector-Jacobian products, not just sums.

Tolerances, ``|actual - expected| <= atol + rtol * |expected|``, ``s = max(1, max|logits| / T)``,
``g = max(1, max|reference grad|)``:

- float32 inputs (full float32: TF32 is off, see tests/gpu/conftest.py): log-probs and entropies atol = 2e-5 * s,
  rtol = 1e-5 (float32 matmul over H and accumulation over V); gradients atol = 5e-5 * g, rtol = 1e-4.
- bfloat16 inputs: log-probs and entropies atol = 2**-7 * s, rtol = 0 (the torch twin and F.linear round each logit
  to bf16, half an ulp = 2**-9 relative, moving the label logit and the log-sum-exp; the Triton hidden op takes
  the same bf16 logits from the same matmul); logits-op forward: inputs are exact, so float32 accumulation only:
  atol = 2e-5 * s;
  gradients (returned in bf16, the hidden op's after bf16 GEMMs) atol = 3e-2 * g, rtol = 3e-2.
- Triton vs the torch twin: the same tolerances, doubled (each is within one of the float64 result).
"""

from __future__ import annotations

import pytest
import torch

from rlmf.kernels import logprobs_from_hidden, logprobs_from_logits, resolve_backend

DTYPES = (torch.float32, torch.bfloat16)
BACKENDS = ("triton", "torch")

# name: (N tokens, H hidden, V vocabulary, temperature, bias, ignored rows, chunk_size for the backward)
HIDDEN_CASES = {
    # 300 = 4 * 64 + 44 tokens, H = 96 = 64 + 32, V = 1000 = 7 * 128 + 104: ragged on every axis; one backward tile.
    "ragged_bias_T0.7": (300, 96, 1000, 0.7, True, "some", 1 << 22),
    # V = 5003: 2 x 10 ragged tiles, forward and backward (the statistics carried across vocabulary tiles).
    "vocab_splits_T1.3": (70, 64, 5003, 1.3, False, "some", (64, 512)),
    # every row ignored: zeros forward, zero gradients.
    "all_ignored": (50, 64, 700, 1.0, True, "all", 1 << 22),
}

# name: (N tokens, V vocabulary, logit std, temperature, ignored rows, layout)
LOGITS_CASES = {
    "one_ragged_block_T0.8": (64, 1000, 3.0, 0.8, "some", "contiguous"),  # one 1024-wide block, masked tail
    "two_blocks_ragged": (40, 10000, 3.0, 1.0, "some", "contiguous"),  # 8192 + a ragged 1808
    "llama3_vocab_T1.5": (48, 128256, 4.0, 1.5, "some", "contiguous"),  # 15 full blocks + a ragged one
    "transposed_all_ignored": (33, 1000, 3.0, 1.0, "all", "transposed"),  # column-major logits, no valid row
}


def _labels(n, vocab_size, ignored, generator):
    labels = torch.randint(0, vocab_size, (n,), generator=generator)
    if ignored == "some":
        labels[::3] = -100
    elif ignored == "all":
        labels[:] = -100
    return labels


def _naive(logits64: torch.Tensor, labels: torch.Tensor, temperature: float):
    """float64 ``(logp, entropy)`` of materialised logits, 0 at ignored rows."""
    log_p = torch.log_softmax(logits64 / temperature, dim=-1)
    valid = labels != -100
    picked = log_p.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=logits64.device)
    return torch.where(valid, picked, zero), torch.where(valid, entropy, zero)


def _grad_tol(dtype, top):
    if dtype == torch.float32:
        return dict(atol=5e-5 * top, rtol=1e-4)
    return dict(atol=3e-2 * top, rtol=3e-2)


def _close(actual, expected, tol, what, factor=1.0):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol["atol"] * factor,
                               rtol=tol["rtol"] * factor, msg=lambda m: f"{what}: {m}")


def test_auto_backend_is_triton_on_cuda(device):
    assert resolve_backend("auto", device) == "triton"
    from rlmf.kernels import logprobs_hidden_triton, logprobs_logits_triton

    assert not logprobs_hidden_triton.INTERPRETED and not logprobs_logits_triton.INTERPRETED, \
        "TRITON_INTERPRET=1 is set: the kernels would run in the interpreter, not compiled for the GPU"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", HIDDEN_CASES)
def test_logprobs_from_hidden_matches_naive_and_torch_twin(device, case, dtype):
    n, h, v, temperature, has_bias, ignored, chunk_size = HIDDEN_CASES[case]
    generator = torch.Generator().manual_seed(sum(map(ord, case)))
    hidden0 = torch.randn(n, h, generator=generator).to(dtype)
    weight0 = (torch.randn(v, h, generator=generator) * (4.0 / h**0.5)).to(dtype)  # logits ~ N(0, 4^2)
    bias0 = (torch.randn(v, generator=generator) * 2.0).to(dtype) if has_bias else None
    labels = _labels(n, v, ignored, generator).to(device)
    grad_logp = torch.randn(n, generator=generator, dtype=torch.float64).to(device)
    grad_entropy = torch.randn(n, generator=generator, dtype=torch.float64).to(device)

    # Naive float64 reference on the same device.
    ref = [t.to(device).double().requires_grad_() for t in (hidden0, weight0, bias0) if t is not None]
    logits = ref[0] @ ref[1].t() + (ref[2] if has_bias else 0)
    ref_logp, ref_entropy = _naive(logits, labels, temperature)
    ((ref_logp * grad_logp).sum() + (ref_entropy * grad_entropy).sum()).backward()
    s = max(1.0, logits.detach().abs().max().item() / temperature)
    if dtype == torch.float32:
        forward_tol = dict(atol=2e-5 * s, rtol=1e-5)
    else:
        forward_tol = dict(atol=2**-7 * s, rtol=0.0)

    results = {}
    for backend in BACKENDS:
        inputs = [t.to(device, copy=True).requires_grad_() for t in (hidden0, weight0, bias0) if t is not None]
        logp, entropy = logprobs_from_hidden(inputs[0], inputs[1], labels, inputs[2] if has_bias else None,
                                             temperature=temperature, return_entropy=True, backend=backend,
                                             chunk_size=chunk_size)
        assert logp.device.type == "cuda" and logp.dtype == entropy.dtype == torch.float32
        assert logp.shape == entropy.shape == (n,)
        ((logp.double() * grad_logp).sum() + (entropy.double() * grad_entropy).sum()).backward()
        _close(logp, ref_logp.detach(), forward_tol, f"{backend} logp")
        _close(entropy, ref_entropy.detach(), forward_tol, f"{backend} entropy")
        for ours, theirs, name in zip(inputs, ref, ("hidden", "weight", "bias")):
            assert ours.grad is not None and ours.grad.dtype == dtype and ours.grad.shape == ours.shape, name
            assert torch.isfinite(ours.grad).all(), f"{backend} grad {name} is not finite"
            top = max(1.0, theirs.grad.abs().max().item())
            _close(ours.grad, theirs.grad, _grad_tol(dtype, top), f"{backend} grad {name}")
        results[backend] = (logp.detach(), entropy.detach(), [t.grad for t in inputs], inputs)

    triton, twin = results["triton"], results["torch"]
    _close(triton[0], twin[0], forward_tol, "triton vs torch logp", factor=2.0)
    _close(triton[1], twin[1], forward_tol, "triton vs torch entropy", factor=2.0)
    for a, b, theirs, name in zip(triton[2], twin[2], ref, ("hidden", "weight", "bias")):
        top = max(1.0, theirs.grad.abs().max().item())
        _close(a, b, _grad_tol(dtype, top), f"triton vs torch grad {name}", factor=2.0)
    if ignored == "all":
        assert torch.all(triton[0] == 0) and torch.all(triton[1] == 0)
        assert all(torch.all(g == 0) for g in triton[2])
    else:
        valid = labels != -100
        assert (triton[0][valid] < 0).all() and (triton[0][~valid] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LOGITS_CASES)
def test_logprobs_from_logits_matches_naive_and_torch_twin(device, case, dtype):
    n, v, std, temperature, ignored, layout = LOGITS_CASES[case]
    generator = torch.Generator().manual_seed(sum(map(ord, case)))
    labels = _labels(n, v, ignored, generator).to(device)
    if layout == "transposed":
        logits0 = (torch.randn(v, n, generator=generator) * std).to(dtype).to(device).t()
        assert not logits0.is_contiguous()
    else:
        logits0 = (torch.randn(n, v, generator=generator) * std).to(dtype).to(device)
    grad_logp = torch.randn(n, generator=generator, dtype=torch.float64).to(device)
    grad_entropy = torch.randn(n, generator=generator, dtype=torch.float64).to(device)

    reference = logits0.detach().double().requires_grad_()
    ref_logp, ref_entropy = _naive(reference, labels, temperature)
    ((ref_logp * grad_logp).sum() + (ref_entropy * grad_entropy).sum()).backward()
    s = max(1.0, reference.detach().abs().max().item() / temperature)
    forward_tol = dict(atol=2e-5 * s, rtol=1e-5)  # exact inputs: float32 accumulation only, whatever the dtype
    top = max(1.0, reference.grad.abs().max().item())

    results = {}
    for backend in BACKENDS:
        logits = logits0.detach().requires_grad_()  # a fresh leaf (same strides) per backend
        logp, entropy = logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True,
                                             backend=backend)
        assert logp.device.type == "cuda" and logp.dtype == entropy.dtype == torch.float32
        ((logp.double() * grad_logp).sum() + (entropy.double() * grad_entropy).sum()).backward()
        _close(logp, ref_logp.detach(), forward_tol, f"{backend} logp")
        _close(entropy, ref_entropy.detach(), forward_tol, f"{backend} entropy")
        assert logits.grad.dtype == dtype and logits.grad.shape == (n, v)
        _close(logits.grad, reference.grad, _grad_tol(dtype, top), f"{backend} grad logits")
        ignored_rows = labels == -100
        assert torch.all(logp[ignored_rows] == 0) and torch.all(logits.grad[ignored_rows] == 0)
        results[backend] = (logp.detach(), entropy.detach(), logits.grad)

    for a, b, name in zip(results["triton"], results["torch"], ("logp", "entropy")):
        _close(a, b, forward_tol, f"triton vs torch {name}", factor=2.0)
    _close(results["triton"][2], results["torch"][2], _grad_tol(dtype, top), "triton vs torch grad", factor=2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprobs_only_call_and_frozen_head(device, dtype):
    """The default call (no entropy, backend auto = triton on CUDA) with a frozen head: only hidden gets a grad."""
    generator = torch.Generator().manual_seed(11)
    n, h, v = 130, 64, 2000
    hidden = torch.randn(n, h, generator=generator).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=generator) * 0.5).to(dtype).to(device)
    labels = _labels(n, v, "some", generator).to(device)
    logp = logprobs_from_hidden(hidden, weight, labels, temperature=0.9, backend="auto")
    assert isinstance(logp, torch.Tensor) and logp.shape == (n,)
    logp.sum().backward()
    reference = hidden.detach().double().requires_grad_()
    logits = reference @ weight.double().t()
    ref_logp, _ = _naive(logits, labels, 0.9)
    ref_logp.sum().backward()
    s = max(1.0, logits.detach().abs().max().item() / 0.9)
    forward_tol = dict(atol=2e-5 * s, rtol=1e-5) if dtype == torch.float32 else dict(atol=2**-7 * s, rtol=0.0)
    _close(logp, ref_logp.detach(), forward_tol, "logp")
    _close(hidden.grad, reference.grad, _grad_tol(dtype, max(1.0, reference.grad.abs().max().item())), "grad hidden")
    assert weight.grad is None


def test_hidden_op_never_holds_the_logits_on_the_gpu(device):
    """A Llama-3-sized head (V = 128256, H = 256) over 4096 tokens in bf16: the [N, V] logits would take 2 GiB in
    float32 (1 GiB in bf16). Forward + backward may allocate the gradients ([N, H] + [V, H], ~66 MiB) and 256 MiB
    more (one backward tile of dL/dlogits is 8 MiB here), not the logits."""
    generator = torch.Generator(device=device).manual_seed(0)
    n, h, v = 4096, 256, 128256
    hidden = torch.randn(n, h, generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, generator=generator, device=device) * 0.06).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=generator, device=device)
    labels[::5] = -100
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    logp, entropy = logprobs_from_hidden(hidden, weight, labels, return_entropy=True, backend="triton")
    (logp.sum() + 0.1 * entropy.sum()).backward()
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - start
    grads = (n * h + v * h) * 2  # grad_hidden and grad_weight, bf16
    logits_bytes = n * v * 4
    assert extra < grads + logits_bytes // 8, (
        f"peak {extra / 2**20:.0f} MiB above the inputs; the float32 logits alone would be "
        f"{logits_bytes / 2**20:.0f} MiB")
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert torch.isfinite(hidden.grad.float()).all() and torch.isfinite(weight.grad.float()).all()
    # The same numbers as the PyTorch twin at this size (bf16 tolerances, see the module docstring).
    h2, w2 = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    logp2, entropy2 = logprobs_from_hidden(h2, w2, labels, return_entropy=True, backend="torch")
    (logp2.sum() + 0.1 * entropy2.sum()).backward()
    s = max(1.0, float((hidden[:256].detach().float() @ weight.detach().float().t()).abs().max()))
    torch.testing.assert_close(logp, logp2, atol=2 * 2**-7 * s, rtol=0)
    torch.testing.assert_close(entropy, entropy2, atol=2 * 2**-7 * s, rtol=0)
    for a, b in ((hidden.grad, h2.grad), (weight.grad, w2.grad)):
        top = max(1.0, float(b.float().abs().max()))
        torch.testing.assert_close(a.float(), b.float(), atol=6e-2 * top, rtol=6e-2)


def _compiled(kernel) -> int:
    """How many specialisations of ``kernel`` Triton has compiled in this process (all devices)."""
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


def test_a_new_token_count_compiles_nothing(device):
    """Steps of 1000, 1024, 1 and 777 tokens after one warm-up step: no kernel is compiled again (the padded GRPO
    runs of 2026-11 compiled the head's kernels 11 times). The same check runs on CPU against Triton's own
    specialisation rules in tests/kernels/test_logprobs_specialisation.py."""
    from rlmf.kernels import logprobs_hidden_triton, logprobs_logits_triton

    kernels = [logprobs_hidden_triton._tile_stats_kernel, logprobs_hidden_triton._tile_grad_kernel,
               logprobs_logits_triton._logits_forward_kernel, logprobs_logits_triton._logits_backward_kernel]
    generator = torch.Generator(device=device).manual_seed(0)
    h, v = 64, 5003
    weight = torch.randn(v, h, generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()

    def step(n):
        hidden = torch.randn(n, h, generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
        labels = torch.randint(0, v, (n + 1,), generator=generator, device=device)[1:]  # an offset view
        logp, entropy = logprobs_from_hidden(hidden, weight, labels, return_entropy=True, backend="triton",
                                             chunk_size=(256, 1024))
        (logp.sum() + entropy.sum()).backward()
        logits = torch.randn(n, v, generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
        logprobs_from_logits(logits, labels, backend="triton").sum().backward()

    step(513)
    before = [_compiled(k) for k in kernels]
    for n in (1000, 1024, 1, 777):
        step(n)
    torch.cuda.synchronize(device)
    assert [_compiled(k) for k in kernels] == before
    assert all(c >= 1 for c in before)
