"""Triton kernels for ``logprobs_from_hidden``: logits tiles ``hidden @ weight.T + bias`` that never reach memory.

Forward (``_hidden_forward_kernel``, fully fused): the grid is ``(token tiles, vocabulary splits)``. A program owns
``BLOCK_M`` tokens and a contiguous run of ``BLOCK_N``-wide vocabulary tiles; for each tile it computes the logits
with ``tl.dot`` over ``BLOCK_K`` slices of the hidden size (float32 accumulator), folds them into a running
per-row max / sum-exp (and entropy sum), and picks out the label's logit. The per-split partial statistics
(``[splits, N]``) are then merged by a few torch ops (the :func:`merge_softmax_stats` formula over the split axis);
splitting the vocabulary gives enough programs to fill the GPU when N is small. Nothing of size ``[N, V]`` exists at
any point.

Backward: the bulk of the work is two GEMMs per tile, ``grad_hidden += G @ W[v]`` and ``grad_weight[v] = G.T @ h``
(G = dL/dlogits), which cuBLAS does best; so ``_hidden_tile_grad_kernel`` recomputes one ``[token chunk, vocab
chunk]`` tile of logits with ``tl.dot`` and writes ``G`` for it directly (softmax - onehot, scaled, no logits
round-trip), and :func:`rlmf.kernels.logprobs_torch.hidden_backward` (shared with the PyTorch backend) runs the GEMMs
chunk by chunk. Only one ``chunk_size`` tile of ``G`` is alive at a time. The alternative, accumulating both
gradients inside the kernel, needs atomics on ``[N, H]`` and ``[V, H]`` per tile or a second recomputation.

Block sizes are constexpr; the values below are a standard Hopper/Ampere tiling that has not yet been tuned on a GPU.
Jitted in interpreter mode when ``TRITON_INTERPRET=1`` was set before this module was imported (``INTERPRETED``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rlmf.kernels.logprobs_torch import (
    M_FLOOR,
    accumulation_dtype,
    finish_softmax_stats,
    hidden_backward,
    plan_tiles,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRETED:  # small tiles so that test shapes take several of them (and ragged last ones)
    BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 16, 16, 16, 4, 1
else:
    BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 64, 128, 64, 8, 3


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_config(dtype: torch.dtype):
    """``(DOT_IN_ACC, PRECISION)``: cast dot operands to the accumulator dtype? which fp32 dot precision?

    The interpreter mishandles bf16 arithmetic, so there the operands are upcast (bit-identical products). On a GPU
    bf16/fp16 operands go to the tensor cores as they are, and fp32 ones follow
    ``torch.backends.cuda.matmul.allow_tf32`` like ``torch.mm`` does.
    """
    if INTERPRETED or dtype == torch.float64:
        return True, "ieee"
    if dtype == torch.float32:
        return True, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return False, None  # 16-bit operands: the precision setting does not apply


def _scalar(value: float, dtype: torch.dtype, device) -> torch.Tensor:
    """A one-element tensor: Triton would pass a Python float as float32, too coarse for float64 inputs."""
    return torch.full((1,), value, dtype=dtype, device=device)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H,
    stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT_IN_ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``(hidden[rows] @ weight[cols].T + bias[cols]) / T`` as a ``[BLOCK_M, BLOCK_N]`` accumulator tile."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        h = tl.load(
            h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh,
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )
        w = tl.load(  # W^T tile: [BLOCK_K, BLOCK_N]
            w_ptr + ks[:, None] * stride_wh + cols[None, :] * stride_wv,
            mask=k_mask[:, None] & col_mask[None, :], other=0.0,
        )
        if DOT_IN_ACC:
            h = h.to(ACC)
            w = w.to(ACC)
        acc = tl.dot(h, w, acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    return acc * inv_temperature


@triton.jit
def _hidden_forward_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, temperature_ptr,
    m_ptr, s_ptr, t_ptr, z_label_ptr,
    N, V, H, stride_hn, stride_hh, stride_wv, stride_wh, tiles_per_split,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr,
    DOT_IN_ACC: tl.constexpr, PRECISION: tl.constexpr, M_INIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    inv_temperature = 1.0 / tl.load(temperature_ptr).to(ACC)
    m = tl.full([BLOCK_M], M_INIT, ACC)
    s = tl.zeros([BLOCK_M], ACC)
    t = tl.zeros([BLOCK_M], ACC)
    z_label = tl.zeros([BLOCK_M], ACC)
    first_tile = split.to(tl.int64) * tiles_per_split
    for i in range(0, tiles_per_split):
        cols = (first_tile + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < V
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H,
            stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
            HAS_BIAS, ACC, DOT_IN_ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        z = tl.where(col_mask[None, :], z, float("-inf"))
        z_label += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = m - m_new
        alpha = tl.exp(shift)
        e = tl.exp(z - m_new[:, None])
        if WITH_ENTROPY:
            e_log_e = e * tl.where(e > 0, z - m_new[:, None], 0.0)  # 0 * -inf never evaluated
            t = alpha * (t + shift * s) + tl.sum(e_log_e, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = split.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(z_label_ptr + out, z_label, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_mask)


@triton.jit
def _hidden_tile_grad_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, temperature_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    g_ptr, stride_gm, stride_gn, t0, n_rows, v0, n_cols, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, ACC: tl.constexpr,
    DOT_IN_ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of ``dL/dlogits = a * onehot - p * (a + b * (log p + entropy))`` (``a``, ``b`` carry 1/T)."""
    local_rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    local_cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = local_rows < n_rows
    col_mask = local_cols < n_cols
    rows = t0 + local_rows
    cols = v0 + local_cols
    inv_temperature = 1.0 / tl.load(temperature_ptr).to(ACC)
    z = _logits_tile(
        h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H,
        stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
        HAS_BIAS, ACC, DOT_IN_ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=float("inf"))  # p = 0 on padding rows
    a = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    coef = a[:, None] + tl.zeros([BLOCK_M, BLOCK_N], ACC)
    if HAS_GRAD_ENTROPY:
        b = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        coef += b[:, None] * (tl.maximum(log_p, -1e4) + entropy[:, None])
    g = tl.where(cols[None, :] == labels[:, None], a[:, None], 0.0) - p * coef
    tl.store(
        g_ptr + local_rows[:, None] * stride_gm + local_cols[None, :] * stride_gn,
        g.to(g_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


def _vocab_splits(n_tokens: int, vocab_size: int, device: torch.device):
    """``(splits, tiles_per_split)``: split the vocabulary so that about two programs per SM are launched."""
    row_tiles = triton.cdiv(n_tokens, BLOCK_M)
    col_tiles = triton.cdiv(vocab_size, BLOCK_N)
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: a few splits, to exercise the merge
    splits = min(col_tiles, max(1, triton.cdiv(target, row_tiles)))
    tiles_per_split = triton.cdiv(col_tiles, splits)
    return triton.cdiv(col_tiles, tiles_per_split), tiles_per_split


class LogprobsFromHiddenTriton(torch.autograd.Function):
    """Triton twin of :class:`rlmf.kernels.logprobs_torch.LogprobsFromHiddenTorch` (same inputs and outputs)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk_size):
        n, h_size = hidden.shape
        v = weight.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        dev = hidden.device
        labels = labels.contiguous()
        bias = None if bias is None else bias.contiguous()
        valid = labels != ignore_index
        temp = _scalar(temperature, acc, dev)
        splits, tiles_per_split = _vocab_splits(n, v, dev)
        m, s, t, z_label = torch.empty((4, splits, n), dtype=acc, device=dev).unbind(0)
        dot_in_acc, precision = _dot_config(hidden.dtype)
        if n:
            _hidden_forward_kernel[(triton.cdiv(n, BLOCK_M), splits)](
                hidden, weight, bias if bias is not None else temp, labels, temp, m, s, t, z_label,
                n, v, h_size, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                tiles_per_split,
                HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, ACC=_tl_dtype(acc),
                DOT_IN_ACC=dot_in_acc, PRECISION=precision, M_INIT=M_FLOOR,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
            )
        # Merge the splits (the same formula as merge_softmax_stats, over a leading axis).
        m_all = m.amax(dim=0)
        shift = m - m_all
        alpha = torch.exp(shift)
        s_all = (alpha * s).sum(dim=0)
        t_all = (alpha * (t + shift * s)).sum(dim=0) if with_entropy else None
        lse, entropy = finish_softmax_stats(m_all, s_all, t_all)
        logp = (z_label.sum(dim=0) - lse).masked_fill_(~valid, 0.0)
        if with_entropy:
            entropy.masked_fill_(~valid, 0.0)
        else:
            entropy = torch.empty(0, dtype=acc, device=dev)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, bias, labels, valid, lse, entropy)
        ctx.temperature = temperature
        ctx.tiles = plan_tiles(n, v, chunk_size)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, valid, lse, entropy = ctx.saved_tensors
        acc, dev, temperature = lse.dtype, hidden.device, ctx.temperature
        zero = torch.zeros((), dtype=acc, device=dev)
        a = torch.zeros_like(lse) if grad_logp is None else torch.where(valid, grad_logp.to(acc), zero) / temperature
        has_entropy = grad_entropy is not None and entropy.numel() > 0
        b = torch.where(valid, grad_entropy.to(acc), zero) / temperature if has_entropy else lse
        temp = _scalar(temperature, acc, dev)
        dot_in_acc, precision = _dot_config(hidden.dtype)
        token_chunk, vocab_chunk = ctx.tiles
        buffer = torch.empty((token_chunk, vocab_chunk), dtype=hidden.dtype, device=dev)

        def tile_grad(t0, t1, v0, v1):
            g = buffer[: t1 - t0, : v1 - v0]
            grid = (triton.cdiv(t1 - t0, BLOCK_M), triton.cdiv(v1 - v0, BLOCK_N))
            _hidden_tile_grad_kernel[grid](
                hidden, weight, bias if bias is not None else temp, labels, temp, lse,
                entropy if has_entropy else lse, a, b,
                g, g.stride(0), g.stride(1), t0, t1 - t0, v0, v1 - v0, hidden.shape[1],
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_entropy, ACC=_tl_dtype(acc),
                DOT_IN_ACC=dot_in_acc, PRECISION=precision,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
            )
            return g

        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grad_h, grad_w, grad_b = hidden_backward(tile_grad, hidden, weight, bias, ctx.tiles, needs)
        return grad_h, grad_w, grad_b, None, None, None, None, None
