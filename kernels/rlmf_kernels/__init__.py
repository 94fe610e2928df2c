"""Fused per-token log-prob kernels (imported as ``rlmf.kernels``).

Two ops, each with a Triton backend (CUDA) and an exact chunked PyTorch twin (CPU, and the reference):

- :func:`logprobs_from_logits` ``(logits [N, V], labels [N]) -> logprobs [N]``: one pass over the vocabulary with an
  online log-sum-exp; the backward recomputes the softmax instead of storing it.
- :func:`logprobs_from_hidden` ``(hidden [N, H], weight [V, H], labels [N], bias [V]?) -> logprobs [N]``: the same
  from the LM head's input, never materialising the ``[N, V]`` logits (forward or backward).

Both return float32 (float64 for float64 inputs), ``0`` at ``ignore_index``, take ``temperature`` and
``return_entropy``, and expect labels already shifted (``labels[i]`` is the token ``logits[i]`` predicts).

Backend choice (``backend=`` per call, or the module default): ``"auto"`` picks ``"triton"`` for CUDA tensors when
triton imports and ``"torch"`` otherwise; ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` (tests);
:func:`set_default_backend` sets the default (the config's ``generator.logprob_backend``).

Files: ``dispatch.py`` (public functions, validation, backend choice), ``logprobs_torch.py`` (PyTorch twins and the
math), ``logprobs_logits_triton.py`` and ``logprobs_hidden_triton.py`` (one op each). Benchmark:
``experiments/bench_logprobs.py``.
"""

from rlmf.kernels.dispatch import (
    BACKENDS,
    get_default_backend,
    logprobs_from_hidden,
    logprobs_from_logits,
    resolve_backend,
    set_default_backend,
)

__all__ = [
    "BACKENDS",
    "get_default_backend",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "resolve_backend",
    "set_default_backend",
]
