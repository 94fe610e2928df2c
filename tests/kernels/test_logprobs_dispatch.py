"""Backend choice and input validation of rlmf.kernels."""

import pytest
import torch

from rlmf import kernels
from rlmf.kernels import logprobs_from_hidden, logprobs_from_logits, resolve_backend, set_default_backend


@pytest.fixture(autouse=True)
def _restore_default_backend():
    before = kernels.get_default_backend()
    yield
    set_default_backend(before)


def test_unknown_backend_lists_the_valid_names():
    with pytest.raises(ValueError, match="'cuda'.*auto, triton, torch"):
        set_default_backend("cuda")
    with pytest.raises(ValueError, match="auto, triton, torch"):
        logprobs_from_logits(torch.randn(2, 3), torch.tensor([0, 1]), backend="fused")


def test_auto_picks_torch_on_cpu_and_triton_on_cuda():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"


def test_default_backend_is_used_when_none_is_passed(monkeypatch):
    assert kernels.get_default_backend() == "auto"
    set_default_backend("triton")
    assert resolve_backend(None, torch.device("cpu")) == "triton"  # allowed: the conftest set TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        logprobs_from_logits(torch.randn(2, 3), torch.tensor([0, 1]))
    set_default_backend("torch")
    assert logprobs_from_logits(torch.randn(2, 3), torch.tensor([0, 1])).shape == (2,)


def test_bad_inputs_are_named():
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, -100, 4])
    with pytest.raises(ValueError, match=r"labels\[1\] = 5 is outside \[0, 5\)"):
        logprobs_from_logits(logits, torch.tensor([0, 5, 1, 1]))
    with pytest.raises(ValueError, match="flatten"):
        logprobs_from_logits(logits[None], labels)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, labels, temperature=0.0)
    with pytest.raises(TypeError, match="integer"):
        logprobs_from_logits(logits, labels.float())
    with pytest.raises(TypeError, match="share a dtype"):
        logprobs_from_hidden(torch.randn(4, 3), torch.randn(5, 3, dtype=torch.float64), labels)
    with pytest.raises(ValueError, match=r"bias must have shape \[5\]"):
        logprobs_from_hidden(torch.randn(4, 3), torch.randn(5, 3), labels, bias=torch.randn(4))
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs_from_hidden(torch.randn(4, 3), torch.randn(5, 3), labels, chunk_size=0)


def test_empty_batch():
    logp = logprobs_from_logits(torch.randn(0, 7, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,)
    hidden = torch.randn(0, 3, requires_grad=True)
    logp = logprobs_from_hidden(hidden, torch.randn(7, 3), torch.zeros(0, dtype=torch.long))
    logp.sum().backward()
    assert logp.shape == (0,) and hidden.grad.shape == (0, 3)
