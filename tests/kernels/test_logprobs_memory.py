"""logprobs_from_hidden never allocates an [N, V] tensor, forward or backward.

Every ATen op executed (by autograd's backward too) is recorded with a ``TorchDispatchMode``; the largest tensor any
op returns (in bytes, all float32) must stay within one ``chunk_size`` tile or the parameter-sized tensors (``[V, H]``
for grad_weight, ``[N, H]`` for grad_hidden). The shapes make ``N * V`` four times larger than all of those, and a
control run of the naive ``log_softmax(hidden @ weight.T)`` shows that the probe catches a materialised logits tensor.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from logprobs_reference import BACKENDS, DEVICES, random_labels
from rlmf.kernels import logprobs_from_hidden

N, H, V = 64, 8, 256
TILE = (16, 128)  # two vocabulary tiles of two interpreter blocks each


class LargestTensor(TorchDispatchMode):
    """Remembers the op that produced the largest tensor, in bytes (the interpreter makes byte views)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.nbytes:
                self.nbytes, self.op = t.numel() * t.element_size(), f"{func} -> {list(t.shape)} {t.dtype}"
        return out


def _run(fn, device):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=generator).to(device).requires_grad_()
    weight = torch.randn(V, H, generator=generator).to(device).requires_grad_()
    bias = torch.randn(V, generator=generator).to(device).requires_grad_()
    labels = random_labels(N, V, "some", generator).to(device)
    probe = LargestTensor()
    with probe:
        logp, entropy = fn(hidden, weight, labels, bias)
        (logp.sum() + entropy.sum()).backward()
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None
    return probe


def _naive(hidden, weight, labels, bias):
    log_p = torch.log_softmax(hidden @ weight.t() + bias, dim=-1)
    valid = labels != -100
    picked = log_p.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1) * valid
    return picked, -(log_p.exp() * log_p).sum(-1) * valid


def test_probe_catches_materialised_logits():
    probe = _run(_naive, "cpu")
    assert probe.nbytes >= N * V * 4, probe.op


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_full_logits_forward_or_backward(backend):
    budget = 4 * max(TILE[0] * TILE[1], V * H, N * H, 4 * N)  # float32 bytes
    assert 4 * N * V >= 4 * budget  # so that a single [N, V] (or [N, V/2], ...) tensor would fail

    def ours(hidden, weight, labels, bias):
        return logprobs_from_hidden(
            hidden, weight, labels, bias, return_entropy=True, backend=backend, chunk_size=TILE
        )

    probe = _run(ours, DEVICES[backend])
    assert probe.nbytes <= budget, f"largest tensor: {probe.op} ({probe.nbytes} > {budget} bytes)"
