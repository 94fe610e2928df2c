"""Triton backend of ``logprobs_from_hidden``: the matrix products go to the BLAS, Triton does the softmax of each tile.

The work splits the way Liger-Kernel's fused linear cross-entropy splits it (the design, not the code): the three
kinds of matrix product (logits, ``dL/dhidden``, ``dL/dweight``) are plain ``torch.mm`` calls, which cuBLAS runs
near the GPU's peak, and only the memory-bound softmax work is a Triton kernel. The ``[N, V]`` logits never exist:
everything walks :func:`rlmf.kernels.logprobs_torch.plan_tiles` tiles of ``[token chunk, vocab chunk]``, and one
tile buffer in the input dtype is reused throughout.

Forward, per tile: ``torch.mm`` writes ``hidden[t] @ weight[v].T (+ bias[v])`` into the buffer; then
``_tile_stats_kernel`` (one program per token row) reads that row once and folds it into the token's running
float32 statistics (max ``m``, ``s = sum exp(z - m)``, for the entropy ``t = sum exp(z - m)(z - m)``, and the label's
logit), which live in ``[N]`` vectors across tiles. ``lse = m + log s`` at the end.

Backward, per tile: the same ``torch.mm`` recomputes the logits, ``_tile_grad_kernel`` overwrites them in place with
``dL/dlogits = a * onehot - p * (a + b * (log p + entropy))`` (``a``, ``b``: upstream gradients of logp and entropy,
with 1/T folded in; ``p`` from the saved ``lse``), and :func:`rlmf.kernels.logprobs_torch.hidden_backward` (shared
with the PyTorch twin) runs ``grad_hidden += G @ W[v]`` and ``grad_weight[v] = G.T @ hidden`` on it. That is four
matrix products per step against Liger's three: Liger returns a scalar loss, so it knows the upstream gradient in
the forward and computes the weight gradient there; this op returns per-token values whose upstream gradient only
arrives in the backward, which therefore recomputes the logits once.

Exactness: the logits tile is the same ``torch.mm`` in the input dtype as the PyTorch twin's (for bf16, logits
rounded to bf16 like ``F.linear``), and the statistics are float32 (float64 for float64 inputs); the two backends
differ only in the order of the float32 sums.

Recompiles: Triton specialises integer arguments on their value (1, multiples of 16) and pointers on their
alignment, and compiles a kernel again for each new combination. Every integer that changes from tile to tile or
step to step (the tile's row and column offsets and widths) is listed in ``do_not_specialize``, and the kernels get
base pointers plus offsets rather than views, so a new token count never compiles anything
(``tests/kernels/test_logprobs_specialisation.py`` checks the lists against what the launches pass).

Jitted in interpreter mode when ``TRITON_INTERPRET=1`` was set before this module was imported (``INTERPRETED``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from rlmf.kernels.logprobs_torch import (
    LOGP_FLOOR,
    M_FLOOR,
    accumulation_dtype,
    finish_softmax_stats,
    hidden_backward,
    plan_tiles,
    tile_ranges,
    tile_view,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Vocabulary columns per loop step of a row program, fixed (not fitted to the tile's width, which changes with the
# token count: a fitted block would be a new constexpr, hence a new compile, at every new width). The interpreter
# gets a narrower block, so that the test tiles of 70 columns take two blocks and a ragged last one, yet a
# real-vocabulary call (a tiny checkpoint's reference log-probs, ~1000 columns) is not a thousand steps a row:
# the interpreter's cost is per operation, whatever the block's width.
BLOCK_V, NUM_WARPS = (64, 4) if INTERPRETED else (1024, 4)

# The entropy gradient's log p floor, as a constant the kernels can read.
LOGP_FLOOR_C = tl.constexpr(LOGP_FLOOR)

# Integer arguments that change between launches (tile offsets and widths): never specialised on their value. The
# labels may be a view at any offset: their alignment is not specialised on either (one scalar load per row).
VARYING_INTEGERS = ("stride_zm", "n_cols", "t0", "v0")
ANY_ALIGNMENT = ("labels_ptr",)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _scalar(value: float, dtype: torch.dtype, device) -> torch.Tensor:
    """A one-element tensor: Triton would pass a Python float as float32, too coarse for float64 inputs."""
    return torch.full((1,), value, dtype=dtype, device=device)


@triton.jit
def _tile_row(z_ptr, stride_zm, t0, v0, labels_ptr, temperature_ptr, ACC: tl.constexpr):
    """This program's row of the tile: ``(its token in the batch, the label's column in the tile (maybe outside
    it), 1/T, a pointer to the row)``."""
    local_row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + t0 + local_row).to(tl.int64) - v0
    return t0 + local_row, label, 1.0 / tl.load(temperature_ptr).to(ACC), z_ptr + local_row * stride_zm


@triton.jit(do_not_specialize=VARYING_INTEGERS, do_not_specialize_on_alignment=ANY_ALIGNMENT)
def _tile_stats_kernel(
    z_ptr, stride_zm, stride_zn, n_cols, t0, v0,
    labels_ptr, temperature_ptr, m_ptr, s_ptr, t_ptr, z_label_ptr,
    WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Fold row ``i`` of a logits tile (columns ``v0 ..``) into token ``t0 + i``'s running softmax statistics."""
    row, label, inv_temperature, row_ptr = _tile_row(z_ptr, stride_zm, t0, v0, labels_ptr, temperature_ptr, ACC)
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    z_label = tl.load(z_label_ptr + row)
    t = tl.zeros([], ACC)
    if WITH_ENTROPY:
        t = tl.load(t_ptr + row)
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        in_tile = cols < n_cols
        z = tl.load(row_ptr + cols * stride_zn, mask=in_tile, other=float("-inf")).to(ACC) * inv_temperature
        # A label past this tile's last column may still fall inside the block: only columns in the tile count.
        z_label += tl.sum(tl.where((cols == label) & in_tile, z, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = m - m_new
        alpha = tl.exp(shift)
        e = tl.exp(z - m_new)
        if WITH_ENTROPY:
            t = alpha * (t + shift * s) + tl.sum(e * tl.where(e > 0, z - m_new, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(z_label_ptr + row, z_label)
    if WITH_ENTROPY:
        tl.store(t_ptr + row, t)


@triton.jit(do_not_specialize=VARYING_INTEGERS, do_not_specialize_on_alignment=ANY_ALIGNMENT)
def _tile_grad_kernel(
    z_ptr, stride_zm, stride_zn, n_cols, t0, v0,
    labels_ptr, temperature_ptr, lse_ptr, entropy_ptr, a_ptr, b_ptr,
    HAS_GRAD_ENTROPY: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Overwrite row ``i`` of a logits tile with ``dL/dlogits`` of token ``t0 + i`` (``a``, ``b`` carry 1/T)."""
    row, label, inv_temperature, row_ptr = _tile_row(z_ptr, stride_zm, t0, v0, labels_ptr, temperature_ptr, ACC)
    lse = tl.load(lse_ptr + row)
    a = tl.load(a_ptr + row)
    b = tl.zeros([], ACC)
    entropy = tl.zeros([], ACC)
    if HAS_GRAD_ENTROPY:
        b = tl.load(b_ptr + row)
        entropy = tl.load(entropy_ptr + row)
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        in_tile = cols < n_cols
        z = tl.load(row_ptr + cols * stride_zn, mask=in_tile, other=float("-inf")).to(ACC)
        log_p = z * inv_temperature - lse
        p = tl.exp(log_p)
        coef = a
        if HAS_GRAD_ENTROPY:  # p == 0 where log_p == -inf: the floor keeps 0 * -inf out
            coef = a + b * (tl.maximum(log_p, LOGP_FLOOR_C) + entropy)
        g = tl.where(cols == label, a, 0.0) - p * coef
        tl.store(row_ptr + cols * stride_zn, g.to(z_ptr.dtype.element_ty), mask=in_tile)


def _logits_tile(out: torch.Tensor, hidden_rows, weight_rows, bias_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """``hidden_rows @ weight_rows.T (+ bias_rows)`` into ``out`` (input dtype; 1/T is applied by the kernels)."""
    if bias_rows is None:
        return torch.mm(hidden_rows, weight_rows.t(), out=out)
    return torch.addmm(bias_rows, hidden_rows, weight_rows.t(), out=out)


def _launch(kernel, tile: torch.Tensor, t0: int, v0: int, *args, **constants):
    """One program per row of ``tile`` (rows ``t0 ..`` of the batch, vocabulary columns ``v0 ..``)."""
    rows, cols = tile.shape
    kernel[(rows,)](
        tile, tile.stride(0), tile.stride(1), cols, t0, v0, *args,
        BLOCK_V=BLOCK_V, num_warps=NUM_WARPS, **constants,
    )


class LogprobsFromHiddenTriton(torch.autograd.Function):
    """Triton twin of :class:`rlmf.kernels.logprobs_torch.LogprobsFromHiddenTorch` (same inputs and outputs)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk_size):
        n, v = hidden.shape[0], weight.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        dev = hidden.device
        labels = labels.contiguous()
        valid = labels != ignore_index
        temp = _scalar(temperature, acc, dev)
        tiles = plan_tiles(n, v, chunk_size)
        buffer = torch.empty(tiles[0] * tiles[1], dtype=hidden.dtype, device=dev)
        m = torch.full((n,), M_FLOOR, dtype=acc, device=dev)
        # Separate allocations: views into one block would start at offsets whose alignment depends on n.
        s, t, z_label = (torch.zeros(n, dtype=acc, device=dev) for _ in range(3))
        for t0, t1, v0, v1 in tile_ranges(n, v, tiles):
            tile = _logits_tile(
                tile_view(buffer, t1 - t0, v1 - v0), hidden[t0:t1], weight[v0:v1],
                None if bias is None else bias[v0:v1],
            )
            _launch(
                _tile_stats_kernel, tile, t0, v0, labels, temp, m, s, t, z_label,
                WITH_ENTROPY=with_entropy, ACC=_tl_dtype(acc),
            )
        lse, entropy = finish_softmax_stats(m, s, t if with_entropy else None)
        logp = (z_label - lse).masked_fill_(~valid, 0.0)
        if with_entropy:
            entropy.masked_fill_(~valid, 0.0)
        else:
            entropy = torch.empty(0, dtype=acc, device=dev)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, bias, labels, valid, lse, entropy)
        ctx.temperature = temperature
        ctx.tiles = tiles
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
        buffer = torch.empty(ctx.tiles[0] * ctx.tiles[1], dtype=hidden.dtype, device=dev)

        def tile_grad(t0, t1, v0, v1):
            tile = _logits_tile(
                tile_view(buffer, t1 - t0, v1 - v0), hidden[t0:t1], weight[v0:v1],
                None if bias is None else bias[v0:v1],
            )
            _launch(
                _tile_grad_kernel, tile, t0, v0, labels, temp, lse, entropy if has_entropy else lse, a, b,
                HAS_GRAD_ENTROPY=has_entropy, ACC=_tl_dtype(acc),
            )
            return tile

        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grad_h, grad_w, grad_b = hidden_backward(tile_grad, hidden, weight, bias, ctx.tiles, needs)
        return grad_h, grad_w, grad_b, None, None, None, None, None
