"""Triton kernels for ``logprobs_from_logits``: one program per token row, streaming the vocabulary in blocks.

Forward: one read of the row, an online log-sum-exp (running max ``m``, ``s = sum exp(z - m)``, and for the entropy
``t = sum exp(z - m)(z - m)``, all float32), writes ``logp``, ``lse`` and ``entropy`` ([N] each). Backward: a second
read of the row, recomputes ``p = exp(z - lse)`` and writes
``dL/dlogits = (a * onehot - p * (a + b * (log p + entropy))) / T`` in the logits dtype (``a``, ``b``: upstream
gradients of logp and entropy). No softmax is stored. Ignored rows (label == ignore_index) skip their loads and get
zeros. The math and its PyTorch twin are in ``logprobs_torch.py``.

Jitted in interpreter mode when ``TRITON_INTERPRET=1`` was set before this module was imported (``INTERPRETED``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rlmf.kernels.logprobs_torch import M_FLOOR, accumulation_dtype

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Vocabulary block per loop step. On a GPU a wide block keeps enough bytes in flight to stream at HBM speed;
# the interpreter gets a narrow one so that small test shapes still take several blocks and a ragged last block.
MAX_BLOCK_V = 16 if INTERPRETED else 8192


# Per-row scalars that may be views at any offset (shifted labels, upstream gradients): their alignment is not
# specialised on, else a new view offset would compile the kernel again. The logits' own pointer and row stride stay
# specialised (the row loads are vectorised on them); the token count is the grid, never an argument.
FORWARD_ANY_ALIGNMENT = ("labels_ptr",)
BACKWARD_ANY_ALIGNMENT = ("labels_ptr", "grad_logp_ptr", "grad_entropy_ptr")


def _launch_config(vocab_size: int):
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    return block_v, num_warps


def _scalar(value: float, dtype: torch.dtype, device) -> torch.Tensor:
    """A one-element tensor: Triton would pass a Python float as float32, too coarse for float64 inputs."""
    return torch.full((1,), value, dtype=dtype, device=device)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit(do_not_specialize_on_alignment=FORWARD_ANY_ALIGNMENT)
def _logits_forward_kernel(
    logits_ptr,
    stride_ln,
    stride_lv,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    V,
    temperature_ptr,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    M_INIT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    inv_temperature = 1.0 / tl.load(temperature_ptr).to(ACC)
    row_ptr = logits_ptr + row * stride_ln
    v_end = tl.where(valid, V, 0)  # ignored rows load nothing
    m = tl.full([], M_INIT, ACC)
    s = tl.zeros([], ACC)
    t = tl.zeros([], ACC)
    # The block pointer advances in 64-bit pointer arithmetic; offsets inside a block are int32 (the wrapper keeps
    # BLOCK_V * stride below 2**31), so no index product can overflow whatever N * V is.
    block_ptr = row_ptr
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(block_ptr + tl.arange(0, BLOCK_V) * stride_lv, mask=cols < v_end, other=float("-inf")).to(ACC)
        block_ptr += BLOCK_V * stride_lv
        z = z * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = m - m_new
        alpha = tl.exp(shift)
        e = tl.exp(z - m_new)
        if WITH_ENTROPY:
            t = alpha * (t + shift * s) + tl.sum(e * tl.where(e > 0, z - m_new, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    z_label = tl.load(row_ptr + label * stride_lv, mask=valid, other=0.0).to(ACC) * inv_temperature
    s = tl.where(valid, s, 1.0)  # ignored rows summed nothing; keep log(0) and 0/0 out
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(logp_ptr + row, tl.where(valid, z_label - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, log_s - t / s, 0.0))


@triton.jit(do_not_specialize_on_alignment=BACKWARD_ANY_ALIGNMENT)
def _logits_backward_kernel(
    logits_ptr,
    stride_ln,
    stride_lv,
    labels_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_ptr,
    stride_gn,
    V,
    temperature_ptr,
    ignore_index,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + row)
    inv_temperature = 1.0 / tl.load(temperature_ptr).to(ACC)
    a = tl.zeros([], ACC)
    b = tl.zeros([], ACC)
    entropy = tl.zeros([], ACC)
    if HAS_GRAD_LOGP:
        a = tl.where(valid, tl.load(grad_logp_ptr + row).to(ACC) * inv_temperature, 0.0)
    if HAS_GRAD_ENTROPY:
        b = tl.where(valid, tl.load(grad_entropy_ptr + row).to(ACC) * inv_temperature, 0.0)
        entropy = tl.load(entropy_ptr + row)
    row_ptr = logits_ptr + row * stride_ln
    v_end = tl.where(valid, V, 0)
    grad_row_ptr = grad_ptr + row * stride_gn
    block_ptr = row_ptr
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        in_vocab = cols < V
        z = tl.load(block_ptr + tl.arange(0, BLOCK_V) * stride_lv, mask=cols < v_end, other=float("-inf")).to(ACC)
        block_ptr += BLOCK_V * stride_lv
        log_p = z * inv_temperature - lse
        p = tl.exp(log_p)
        coef = a
        if HAS_GRAD_ENTROPY:
            # p == 0 where log_p == -inf (masked loads, -inf logits): keep 0 * -inf out.
            coef = a + b * (tl.maximum(log_p, -1e4) + entropy)
        g = tl.where(cols == label, a, 0.0) - p * coef
        tl.store(grad_row_ptr + v0 + tl.arange(0, BLOCK_V), g.to(grad_ptr.dtype.element_ty), mask=in_vocab)


def _kernel_layout(logits: torch.Tensor, block_v: int) -> torch.Tensor:
    """Logits whose in-block offsets fit int32 (any realistic stride does; a copy otherwise)."""
    if logits.stride(1) * block_v >= 2**31:
        return logits.contiguous()
    return logits


class LogprobsFromLogitsTriton(torch.autograd.Function):
    """Triton twin of :class:`rlmf.kernels.logprobs_torch.LogprobsFromLogitsTorch` (same inputs and outputs)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, with_entropy):
        n, v = logits.shape
        acc = accumulation_dtype(logits.dtype)
        labels = labels.contiguous()
        logp = torch.empty(n, dtype=acc, device=logits.device)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=acc, device=logits.device)
        block_v, num_warps = _launch_config(v)
        logits = _kernel_layout(logits, block_v)
        if n:
            _logits_forward_kernel[(n,)](
                logits, logits.stride(0), logits.stride(1), labels, logp, lse, entropy if with_entropy else lse,
                v, _scalar(temperature, acc, logits.device), ignore_index,
                WITH_ENTROPY=with_entropy, ACC=_tl_dtype(acc), M_INIT=M_FLOOR, BLOCK_V=block_v,
                num_warps=num_warps,
            )
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 5
        n, v = logits.shape
        has_entropy = grad_entropy is not None and entropy.numel() > 0
        grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
        grad_logp = grad_logp.contiguous() if grad_logp is not None else None
        grad_entropy = grad_entropy.contiguous() if has_entropy else None
        block_v, num_warps = _launch_config(v)
        if n:
            _logits_backward_kernel[(n,)](
                logits, logits.stride(0), logits.stride(1), labels, lse, entropy if has_entropy else lse,
                grad_logp if grad_logp is not None else lse, grad_entropy if has_entropy else lse,
                grad, grad.stride(0),
                v, _scalar(ctx.temperature, lse.dtype, logits.device), ctx.ignore_index,
                HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=has_entropy,
                ACC=_tl_dtype(lse.dtype), BLOCK_V=block_v, num_warps=num_warps,
            )
        return grad, None, None, None, None
