"""Exact, chunked PyTorch twins of the fused log-prob kernels: the CPU backend and the reference for the Triton ones.

Math (per token i, vocabulary j, temperature T; ``y = labels[i]``)::

    z_j      = logits_j / T                      (float32 accumulation; float64 for float64 inputs)
    lse      = log sum_j exp(z_j)
    logp     = z_y - lse                         (0 where y == ignore_index)
    p_j      = exp(z_j - lse)
    entropy  = -sum_j p_j log p_j  =  lse - sum_j p_j z_j
    d logp    / d logits_j = (onehot_j - p_j) / T
    d entropy / d logits_j = -p_j (log p_j + entropy) / T

so with upstream gradients ``a = dL/dlogp`` and ``b = dL/dentropy`` the logits gradient is
``(a * onehot - p * (a + b * (log p + entropy))) / T``; the backward recomputes ``p`` from the saved ``lse``
instead of storing the softmax.

``logprobs_from_logits`` works on chunks of whole rows (``torch.logsumexp``), so its float32 temporaries stay small.
``logprobs_from_hidden`` computes its logits ``hidden @ weight.T + bias`` one ``[token chunk, vocab chunk]`` tile at a
time and streams the vocabulary with the online log-sum-exp, like the Triton kernels: a tile gives, per row, its max
``m``, ``s = sum exp(z - m)`` and (for the entropy) ``t = sum exp(z - m) (z - m)``, and tiles merge with
:func:`merge_softmax_stats`. Neither its forward nor its backward ever holds the full ``[N, V]`` logits; the backward
loops over vocabulary chunks so that each slice of ``grad_weight`` is finished in one pass.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple, Union

import torch

# Finite stand-in for -inf as a running max: keeps exp(m_old - m_new) and (m_old - m_new) * s free of inf - inf.
M_FLOOR = -1e30
# log p below this is exp() == 0 even in float64; clamping there keeps 0 * (-inf) out of the entropy gradient.
LOGP_FLOOR = -1e4
# Rows per chunk in logprobs_from_logits (bounds its float32 temporaries to about this many elements).
LOGITS_CHUNK_ELEMENTS = 1 << 20
# Logits held at once by logprobs_from_hidden (one [token chunk, vocab chunk] tile): 4M elements, 16 MiB in float32.
# On CPU, tiles from 1M to 16M elements ran within ~5% of each other (2k x 256 x 128k); the smaller ones were ahead.
DEFAULT_CHUNK_SIZE = 1 << 22
# On CUDA: 64M elements (128 MiB in bf16). Each vocabulary chunk adds one [N, H] product into the float32
# grad_hidden, a pass over N * H * 10 bytes; at N = 16k, H = 4096, V = 128k, 4M-element tiles (1024 columns) make
# that ~85 GB of traffic per backward, these (4096 columns) ~21 GB. Chosen by that arithmetic, not yet timed on a GPU.
CUDA_CHUNK_SIZE = 1 << 26

# The vocabulary chunk never gets narrower than this (unless V is smaller); tokens are chunked instead.
MIN_VOCAB_CHUNK = 1024

ChunkSize = Union[int, Tuple[int, int]]


def default_chunk_size(device: torch.device) -> int:
    """Logits per tile when a call does not say: ``CUDA_CHUNK_SIZE`` on CUDA, ``DEFAULT_CHUNK_SIZE`` elsewhere."""
    return CUDA_CHUNK_SIZE if device.type == "cuda" else DEFAULT_CHUNK_SIZE


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (bf16, fp16, fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def plan_tiles(n_tokens: int, vocab_size: int, chunk_size: ChunkSize) -> Tuple[int, int]:
    """``(token_chunk, vocab_chunk)`` for a tile of at most ``chunk_size`` logits (or the explicit pair).

    All tokens go in one chunk when that leaves at least ``MIN_VOCAB_CHUNK`` vocabulary columns: then every
    ``grad_weight`` slice is a single GEMM with no cross-chunk accumulation.
    """
    if isinstance(chunk_size, (tuple, list)):
        token_chunk, vocab_chunk = (int(c) for c in chunk_size)
        if token_chunk < 1 or vocab_chunk < 1:
            raise ValueError(f"chunk_size={tuple(chunk_size)} must be positive (tokens, vocab)")
        return min(token_chunk, max(n_tokens, 1)), min(vocab_chunk, vocab_size)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of logits per tile")
    n = max(n_tokens, 1)
    vocab_chunk = min(vocab_size, max(min(vocab_size, MIN_VOCAB_CHUNK), chunk_size // n))
    token_chunk = min(n, max(1, chunk_size // vocab_chunk))
    return token_chunk, vocab_chunk


def merge_softmax_stats(m1, s1, t1, m2, s2, t2):
    """Combine ``(max, sum exp(z - max), sum exp(z - max)(z - max))`` of two disjoint vocabulary slices.

    ``t1``/``t2`` may be ``None`` (no entropy). Maxima must be finite (clamped at ``M_FLOOR``).
    """
    m = torch.maximum(m1, m2)
    d1, d2 = m1 - m, m2 - m
    a1, a2 = torch.exp(d1), torch.exp(d2)
    s = a1 * s1 + a2 * s2
    t = None if t1 is None else a1 * (t1 + d1 * s1) + a2 * (t2 + d2 * s2)
    return m, s, t


def finish_softmax_stats(m, s, t):
    """``lse = m + log s`` and, when ``t`` is given, ``entropy = log s - t / s``."""
    log_s = torch.log(s)
    return m + log_s, (None if t is None else log_s - t / s)


def _tile_softmax_stats(z: torch.Tensor, with_entropy: bool):
    """Per-row stats of one tile; consumes ``z`` (overwritten in place)."""
    m = z.amax(dim=-1).clamp_min_(M_FLOOR)
    e = z.sub_(m[:, None]).exp_()
    s = e.sum(dim=-1)
    t = -torch.special.entr(e).sum(dim=-1) if with_entropy else None  # sum e log e = sum e (z - m)
    return m, s, t


def _scaled_copy(x: torch.Tensor, temperature: float, acc: torch.dtype) -> torch.Tensor:
    """A fresh ``acc`` tensor holding ``x / T`` (safe to modify in place)."""
    z = x.to(acc, copy=True)
    return z.div_(temperature) if temperature != 1.0 else z


def _label_rows(labels: torch.Tensor, ignore_index: int):
    valid = labels != ignore_index
    return valid, torch.where(valid, labels, torch.zeros_like(labels))


def _upstream(grad, valid, temperature, acc):
    """Upstream gradient with ignored rows zeroed and the 1/T of d z / d logits folded in (None if absent)."""
    if grad is None:
        return None
    return torch.where(valid, grad.to(acc), torch.zeros((), dtype=acc, device=grad.device)) / temperature


def _softmax_grad_(lp: torch.Tensor, a, b, entropy_rows) -> torch.Tensor:
    """``-p * (a + b * (log p + entropy))`` from a tile of log-probs ``lp`` (overwritten in place).

    ``a``/``b`` are per-row ``[rows]`` (``None`` means zero); the ``+ a * onehot`` term is added by the caller.
    """
    if b is None:
        coef = a[:, None] if a is not None else None
        p = lp.exp_()
        return p.mul_(-coef) if coef is not None else p.zero_()
    coef = lp.clamp_min(LOGP_FLOOR).add_(entropy_rows[:, None]).mul_(b[:, None])
    if a is not None:
        coef.add_(a[:, None])
    return lp.exp_().mul_(coef).neg_()


# --------------------------------------------------------------------------------------------- logits [N, V]


class LogprobsFromLogitsTorch(torch.autograd.Function):
    """``(logp [N], entropy [N] or empty)`` from ``logits [N, V]``; see the module docstring for the math.

    Works on ``LOGITS_CHUNK_ELEMENTS``-sized row chunks. For float32/float64 logits the backward builds each chunk of
    the gradient in place in the output tensor; other dtypes go through one float32 chunk buffer.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, with_entropy):
        n, v = logits.shape
        acc = accumulation_dtype(logits.dtype)
        valid, safe = _label_rows(labels, ignore_index)
        logp = torch.empty(n, dtype=acc, device=logits.device)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=acc, device=logits.device)
        no_copy = logits.dtype == acc and temperature == 1.0 and not with_entropy
        rows = max(1, LOGITS_CHUNK_ELEMENTS // v)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            z = logits[r0:r1] if no_copy else _scaled_copy(logits[r0:r1], temperature, acc)
            lse_c = torch.logsumexp(z, dim=-1)
            lse[r0:r1] = lse_c
            logp[r0:r1] = z.gather(1, safe[r0:r1, None]).squeeze(1).to(acc) - lse_c
            if with_entropy:
                lp = z.sub_(lse_c[:, None]).clamp_min_(LOGP_FLOOR)
                entropy[r0:r1] = torch.special.entr(lp.exp_()).sum(dim=-1)
        logp.masked_fill_(~valid, 0.0)
        if with_entropy:
            entropy.masked_fill_(~valid, 0.0)
        else:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(logits, valid, safe, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, valid, safe, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 5
        n, v = logits.shape
        acc, temperature = lse.dtype, ctx.temperature
        a = _upstream(grad_logp, valid, temperature, acc)
        b = _upstream(grad_entropy, valid, temperature, acc) if entropy.numel() else None
        grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
        rows = max(1, LOGITS_CHUNK_ELEMENTS // v)
        in_place = logits.dtype == acc
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            lp = grad[r0:r1] if in_place else torch.empty((r1 - r0, v), dtype=acc, device=logits.device)
            if temperature == 1.0:
                torch.sub(logits[r0:r1], lse[r0:r1, None], out=lp)
            else:  # copy first: a half-precision torch.div would round z / T to half before writing lp
                lp.copy_(logits[r0:r1]).div_(temperature).sub_(lse[r0:r1, None])
            a_c = None if a is None else a[r0:r1]
            g = _softmax_grad_(lp, a_c, None if b is None else b[r0:r1], entropy[r0:r1] if b is not None else None)
            if a_c is not None:
                g.scatter_add_(1, safe[r0:r1, None], a_c[:, None])
            if not in_place:
                grad[r0:r1] = g
        return grad, None, None, None, None


# ------------------------------------------------------------------------------- hidden [N, H] @ weight[V, H].T


def logits_tile_(out, hidden_rows, weight_rows, bias_rows, temperature, row_offset=None) -> torch.Tensor:
    """Fill ``out`` ([rows, cols], float32/64) with ``(hidden_rows @ weight_rows.T + bias_rows) / T - row_offset``.

    For float32/float64 inputs this is one in-place GEMM (``addmm_`` with ``alpha = 1/T`` onto the bias and offset)
    into a reused buffer: no temporary tile, no page faults from a fresh allocation per tile. For bf16/fp16 the
    matmul runs in the input dtype, as ``F.linear`` would (so bf16 logits are rounded to bf16 before the float32
    softmax); the Triton backend keeps its float32 dot accumulator instead.
    """
    inv_t = 1.0 / temperature
    if hidden_rows.dtype == out.dtype:
        if bias_rows is None and row_offset is None:
            return out.addmm_(hidden_rows, weight_rows.t(), beta=0.0, alpha=inv_t)
        if bias_rows is None:
            out.copy_(row_offset[:, None].expand_as(out)).neg_()
        elif row_offset is None:
            torch.mul(bias_rows[None, :].expand_as(out), inv_t, out=out)
        else:
            torch.sub(bias_rows[None, :] * inv_t, row_offset[:, None], out=out)
        return out.addmm_(hidden_rows, weight_rows.t(), alpha=inv_t)
    if bias_rows is None:
        out.copy_(torch.mm(hidden_rows, weight_rows.t()))
    else:
        out.copy_(torch.addmm(bias_rows, hidden_rows, weight_rows.t()))
    if temperature != 1.0:
        out.div_(temperature)
    return out if row_offset is None else out.sub_(row_offset[:, None])


def tile_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous ``[rows, cols]`` view at the start of a flat buffer (ragged last tiles stay contiguous)."""
    return buffer[: rows * cols].view(rows, cols)


def tile_ranges(n_tokens: int, vocab_size: int, tiles: Tuple[int, int]) -> Iterator[Tuple[int, int, int, int]]:
    """``(t0, t1, v0, v1)`` of every ``plan_tiles`` tile, vocabulary chunks outermost (each weight slice read once)."""
    token_chunk, vocab_chunk = tiles
    for v0 in range(0, vocab_size, vocab_chunk):
        for t0 in range(0, n_tokens, token_chunk):
            yield t0, min(n_tokens, t0 + token_chunk), v0, min(vocab_size, v0 + vocab_chunk)


def hidden_backward(
    tile_grad: Callable[[int, int, int, int], torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    tiles: Tuple[int, int],
    needs: Tuple[bool, bool, bool],
):
    """Gradients for ``(hidden, weight, bias)`` from a ``tile_grad(t0, t1, v0, v1)`` that returns ``dL/dlogits``.

    ``tile_grad`` gives one ``[t1 - t0, v1 - v0]`` tile of the logits gradient (already scaled by the upstream
    gradient and 1/T) in ``hidden.dtype``. Shared by the PyTorch and Triton backends: the GEMMs are plain
    ``torch.mm``. The vocabulary is the outer loop, so each ``grad_weight[v0:v1]`` is completed (a single GEMM
    when all tokens fit one chunk); ``grad_hidden`` accumulates over vocabulary chunks in float32.
    """
    need_h, need_w, need_b = needs
    n, _ = hidden.shape
    v = weight.shape[0]
    token_chunk, vocab_chunk = tiles
    acc = accumulation_dtype(hidden.dtype)
    grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
    grad_b = torch.zeros(v, dtype=acc, device=hidden.device) if need_b else None
    one_token_chunk = token_chunk >= n
    for v0 in range(0, v, vocab_chunk):
        v1 = min(v, v0 + vocab_chunk)
        weight_rows = weight[v0:v1]
        grad_w_rows = None
        for t0 in range(0, n, token_chunk):
            t1 = min(n, t0 + token_chunk)
            g = tile_grad(t0, t1, v0, v1)
            if need_h:
                if g.dtype == acc:
                    grad_h[t0:t1].addmm_(g, weight_rows)
                else:
                    grad_h[t0:t1] += torch.mm(g, weight_rows)
            if need_w:
                if one_token_chunk:
                    torch.mm(g.t(), hidden[t0:t1], out=grad_w[v0:v1])
                elif grad_w_rows is None:
                    grad_w_rows = torch.mm(g.t(), hidden[t0:t1]).to(acc)
                elif g.dtype == acc:
                    grad_w_rows.addmm_(g.t(), hidden[t0:t1])
                else:
                    grad_w_rows += torch.mm(g.t(), hidden[t0:t1])
            if need_b:
                grad_b[v0:v1] += g.sum(dim=0, dtype=acc)
        if grad_w_rows is not None:
            grad_w[v0:v1] = grad_w_rows
    return (
        None if grad_h is None else grad_h.to(hidden.dtype),
        grad_w,
        None if grad_b is None else grad_b.to(bias.dtype),
    )


class LogprobsFromHiddenTorch(torch.autograd.Function):
    """``(logp [N], entropy [N] or empty)`` from ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` (or None).

    Never materialises the ``[N, V]`` logits: the forward streams ``plan_tiles`` tiles through the online
    log-sum-exp; the backward recomputes each tile from the saved ``lse`` (see :func:`hidden_backward`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk_size):
        n = hidden.shape[0]
        v = weight.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        dev = hidden.device
        valid, safe = _label_rows(labels, ignore_index)
        tiles = plan_tiles(n, v, chunk_size)
        token_chunk, vocab_chunk = tiles
        buffer = torch.empty(token_chunk * vocab_chunk, dtype=acc, device=dev)
        m = torch.full((n,), M_FLOOR, dtype=acc, device=dev)
        s = torch.zeros(n, dtype=acc, device=dev)
        t = torch.zeros(n, dtype=acc, device=dev) if with_entropy else None
        z_label = torch.zeros(n, dtype=acc, device=dev)
        for t0, t1, v0, v1 in tile_ranges(n, v, tiles):
            tile = tile_view(buffer, t1 - t0, v1 - v0)
            z = logits_tile_(tile, hidden[t0:t1], weight[v0:v1], None if bias is None else bias[v0:v1], temperature)
            rel = safe[t0:t1] - v0
            hit = (rel >= 0) & (rel < v1 - v0)
            picked = z.gather(1, rel.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            z_label[t0:t1] += torch.where(hit, picked, torch.zeros_like(picked))
            tile = _tile_softmax_stats(z, with_entropy)
            merged = merge_softmax_stats(m[t0:t1], s[t0:t1], None if t is None else t[t0:t1], *tile)
            m[t0:t1], s[t0:t1] = merged[0], merged[1]
            if t is not None:
                t[t0:t1] = merged[2]
        lse, entropy = finish_softmax_stats(m, s, t)
        logp = (z_label - lse).masked_fill_(~valid, 0.0)
        if with_entropy:
            entropy.masked_fill_(~valid, 0.0)
        else:
            entropy = torch.empty(0, dtype=acc, device=dev)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, bias, valid, safe, lse, entropy)
        ctx.temperature = temperature
        ctx.tiles = tiles
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, valid, safe, lse, entropy = ctx.saved_tensors
        temperature = ctx.temperature
        acc = lse.dtype
        a = _upstream(grad_logp, valid, temperature, acc)
        b = _upstream(grad_entropy, valid, temperature, acc) if entropy.numel() else None

        token_chunk, vocab_chunk = ctx.tiles
        buffer = torch.empty(token_chunk * vocab_chunk, dtype=acc, device=hidden.device)
        cast = None if hidden.dtype == acc else torch.empty_like(buffer, dtype=hidden.dtype)

        def tile_grad(t0, t1, v0, v1):
            lp = logits_tile_(
                tile_view(buffer, t1 - t0, v1 - v0), hidden[t0:t1], weight[v0:v1],
                None if bias is None else bias[v0:v1], temperature, row_offset=lse[t0:t1],
            )
            a_c = None if a is None else a[t0:t1]
            g = _softmax_grad_(lp, a_c, None if b is None else b[t0:t1], entropy[t0:t1] if b is not None else None)
            if a_c is not None:
                rel = safe[t0:t1] - v0
                hit = (rel >= 0) & (rel < v1 - v0)
                g.scatter_add_(1, rel.clamp(0, v1 - v0 - 1)[:, None], (a_c * hit)[:, None])
            return g if cast is None else tile_view(cast, t1 - t0, v1 - v0).copy_(g)

        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grad_h, grad_w, grad_b = hidden_backward(tile_grad, hidden, weight, bias, ctx.tiles, needs)
        return grad_h, grad_w, grad_b, None, None, None, None, None
