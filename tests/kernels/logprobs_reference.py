"""The independent reference for the log-prob kernels: plain float64 PyTorch over materialised logits."""

import torch

BACKENDS = ("torch", "triton")
# Triton runs on the GPU when there is one, through the interpreter (TRITON_INTERPRET=1, see conftest) otherwise.
DEVICES = {"torch": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}


def reference_logprobs(logits, labels, ignore_index=-100, temperature=1.0):
    """``(logp, entropy)`` in float64: ``log_softmax(logits.double() / T).gather(labels)``, 0 at ignored rows."""
    z = logits.double() / temperature
    log_p = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    picked = log_p.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    p = log_p.exp()
    # -sum p log p, with 0 log 0 = 0 in the forward *and* a finite gradient where p underflows to 0.
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(dim=-1)
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    return torch.where(valid, picked, zero), torch.where(valid, entropy, zero)


def random_labels(n, vocab_size, ignored, generator):
    """Labels in ``[0, V)`` with ``ignored`` = "none" | "some" | "all" rows set to -100."""
    labels = torch.randint(0, vocab_size, (n,), generator=generator)
    if ignored == "some":
        labels[::3] = -100
    elif ignored == "all":
        labels[:] = -100
    return labels


def upstream(n, generator):
    """Random upstream gradients for logp and entropy, so the test checks vector-Jacobian products."""
    return tuple(torch.randn(n, generator=generator, dtype=torch.float64) for _ in range(2))
