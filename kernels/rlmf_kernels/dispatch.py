"""The public log-prob ops and the backend choice behind them.

Backends: ``"triton"`` (fused kernels, CUDA; CPU tensors only under ``TRITON_INTERPRET=1``), ``"torch"`` (the exact
chunked PyTorch twin in ``logprobs_torch.py``) and ``"auto"`` (triton for CUDA inputs when triton imports, torch
otherwise). ``backend=None`` in a call means the module default, ``"auto"`` until :func:`set_default_backend`
changes it (``generator.logprob_backend`` in the config does).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from typing import Optional, Tuple, Union

import torch

from rlmf.kernels.logprobs_torch import (
    ChunkSize,
    LogprobsFromHiddenTorch,
    LogprobsFromLogitsTorch,
    default_chunk_size,
)

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_default_backend = "auto"


def _check_backend_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown log-prob backend {name!r}; valid names: {', '.join(BACKENDS)}")
    return name


def set_default_backend(name: str) -> None:
    """Make ``name`` (one of ``BACKENDS``) the backend used when a call passes ``backend=None``."""
    global _default_backend
    _default_backend = _check_backend_name(name, "set_default_backend")


def get_default_backend() -> str:
    return _default_backend


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for inputs on ``device``; raises if ``triton`` cannot run there."""
    name = _check_backend_name(_default_backend if backend is None else backend, "backend")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' but triton is not installed; use backend='torch' or 'auto'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"backend='triton' with {device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before rlmf.kernels' Triton modules are first imported, or use backend='torch' or 'auto'"
            )
    return name


def _triton_module(name: str):
    module = importlib.import_module(f"rlmf.kernels.{name}")
    if not module.INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            f"rlmf.kernels.{name} was imported before TRITON_INTERPRET=1 was set, so its kernels are compiled for a "
            "GPU; set the variable before the first call"
        )
    return module


def _check_labels(labels: torch.Tensor, n: int, vocab_size: int, ignore_index: int, where: str) -> None:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{where}: labels must have shape [{n}], got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{where}: labels must be an integer tensor, got {labels.dtype}")
    # Checking values needs a host sync; do it where it is free (CPU). Out-of-range labels on CUDA are undefined.
    if labels.device.type == "cpu" and n:
        bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{where}: labels[{i}] = {int(labels[i])} is outside [0, {vocab_size}) and is not "
                f"ignore_index={ignore_index}"
            )


def _check_temperature(temperature: float, where: str) -> float:
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{where}: temperature must be a positive finite number, got {temperature}")
    return temperature


def _check_float(x: torch.Tensor, name: str, where: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: {name} must be one of {FLOAT_DTYPES}, got {x.dtype}")


def _result(logp: torch.Tensor, entropy: torch.Tensor, return_entropy: bool):
    return (logp, entropy) if return_entropy else logp


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Per-token ``log softmax(logits / T)[label]`` without materialising the softmax.

    ``logprobs[i] = logits[i, y_i] / T - logsumexp_j(logits[i, j] / T)``, and ``0`` where ``y_i == ignore_index``.
    ``labels[i]`` is the token that ``logits[i]`` predicts; shift before calling (for a causal LM,
    ``logits[:, :-1]`` with ``labels[:, 1:]``, flattened).

    Args:
        logits: ``[N, V]`` float16 / bfloat16 / float32 / float64, any strides (flatten batch and sequence first;
            rows are independent, so sequence-parallel shards can call this on their own rows).
        labels: ``[N]`` integer token ids in ``[0, V)`` or ``ignore_index``.
        temperature: ``T > 0``; logits are divided by it before the softmax.
        return_entropy: also return the per-token entropy ``-sum_j p_ij log p_ij`` of ``softmax(logits / T)``
            (``0`` at ignored tokens), differentiable like the log-probs.
        backend: ``"auto"``, ``"triton"``, ``"torch"``, or ``None`` for :func:`get_default_backend`.

    Returns:
        ``logprobs [N]`` (and ``entropy [N]`` if asked), float32 (float64 for float64 logits), accumulated in
        float32 whatever the input dtype. The gradient w.r.t. ``logits`` has the logits dtype; ignored rows get
        zero gradient. One pass over the vocabulary forward (online log-sum-exp), one more backward.
    """
    where = "logprobs_from_logits"
    if logits.dim() != 2:
        raise ValueError(f"{where}: logits must be [N, V], got shape {list(logits.shape)}; flatten batch dims first")
    n, v = logits.shape
    if v < 1:
        raise ValueError(f"{where}: the vocabulary is empty (logits shape {list(logits.shape)})")
    _check_float(logits, "logits", where)
    _check_labels(labels, n, v, ignore_index, where)
    temperature = _check_temperature(temperature, where)
    if labels.device != logits.device:
        raise ValueError(f"{where}: labels on {labels.device} but logits on {logits.device}")
    name = resolve_backend(backend, logits.device)
    if name == "triton" and n:
        fn = _triton_module("logprobs_logits_triton").LogprobsFromLogitsTriton
    else:
        fn = LogprobsFromLogitsTorch
    logp, entropy = fn.apply(logits, labels, temperature, int(ignore_index), bool(return_entropy))
    return _result(logp, entropy, return_entropy)


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    backend: Optional[str] = None,
    chunk_size: Optional[ChunkSize] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``logprobs_from_logits(hidden @ weight.T + bias, labels, ...)`` without ever holding the ``[N, V]`` logits.

    ``labels[i]`` is the token that ``hidden[i]`` predicts; shift before calling.

    Args:
        hidden: ``[N, H]`` final hidden states (flattened), any strides.
        weight: ``[V, H]`` the LM head (``lm_head.weight``), same dtype as ``hidden``, any strides.
        labels: ``[N]`` integer token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias, same dtype.
        temperature, return_entropy, backend: as in :func:`logprobs_from_logits`.
        chunk_size: logits held at once: an int (at most that many per ``[tokens, vocab]`` tile; all tokens in one
            tile when that leaves >= 1024 vocabulary columns), an explicit ``(tokens, vocab)`` pair, or ``None`` for
            the device's default (4M elements on CPU, 64M on CUDA). Both backends compute the logits tile by tile
            with a matmul, forward and again backward, and never hold more than one tile.

    Returns:
        As :func:`logprobs_from_logits`. Gradients flow to ``hidden``, ``weight`` and ``bias`` in their dtypes
        (``grad_hidden`` and multi-chunk ``grad_weight`` slices are accumulated in float32). Both backends
        compute each logits tile with ``torch.mm`` in the input dtype, like ``F.linear`` (bf16 logits are rounded
        to bf16), and the softmax statistics in float32; they differ in the order of float32 sums and, for
        float32 inputs at T != 1, in where 1/T is applied (the twin folds it into the matmul).
    """
    where = "logprobs_from_hidden"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{where}: need hidden [N, H] and weight [V, H], got {list(hidden.shape)} and {list(weight.shape)}"
        )
    n, v = hidden.shape[0], weight.shape[0]
    if v < 1:
        raise ValueError(f"{where}: the vocabulary is empty (weight shape {list(weight.shape)})")
    _check_float(hidden, "hidden", where)
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(
            f"{where}: hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}, "
            f"{None if bias is None else bias.dtype}"
        )
    if bias is not None and list(bias.shape) != [v]:
        raise ValueError(f"{where}: bias must have shape [{v}], got {list(bias.shape)}")
    for name_, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{where}: {name_} on {t.device} but hidden on {hidden.device}")
    _check_labels(labels, n, v, ignore_index, where)
    temperature = _check_temperature(temperature, where)
    name = resolve_backend(backend, hidden.device)
    if name == "triton" and n:
        fn = _triton_module("logprobs_hidden_triton").LogprobsFromHiddenTriton
    else:
        fn = LogprobsFromHiddenTorch
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.device)
    logp, entropy = fn.apply(
        hidden, weight, bias, labels, temperature, int(ignore_index), bool(return_entropy), chunk_size
    )
    return _result(logp, entropy, return_entropy)
