"""``make_inputs``: valid random inputs for any registered loss, built from the names of the inputs it declares."""

from __future__ import annotations

import pytest
import torch

from rlmf.losses import get_loss, loss_inputs


def _make_inputs(
    name: str,
    batch_size: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    max_length: int = 9,
    online_samples: int = 3,
    per_token_scale: float = 1.5,
) -> dict:
    """Inputs for loss ``name``: summed log-probs ([B], or [B, k] for online samples) of about ``-per_token_scale``
    per token, reference log-probs a few nats away, lengths in [1, max_length], a mix of desirable rows. Per-token
    inputs (``*_token_logps``, ``*_token_mask``: [B, max_length + 1], the completion after a one-token offset, 0
    elsewhere) and WPO's summed ``log sum_v p(v)^2`` (between ``2 log p`` and ``-10`` nats per token, as a
    distribution over a vocabulary of about e^10 tokens allows) where the loss names them.

    Raises for an input name it does not know, so a new loss with a new kind of input cannot slip past the
    generic tests.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = {}

    def length(key):
        if key not in lengths:
            lengths[key] = torch.randint(1, max_length + 1, (batch_size,), generator=g)
        return lengths[key]

    def summed(key, shape=None):
        n = length(key).to(dtype)
        noise = torch.rand(shape or (batch_size,), generator=g, dtype=torch.float64).to(dtype)
        per_token = per_token_scale * (0.2 + 1.6 * noise)
        return -(n if shape is None else n[:, None]) * per_token

    if get_loss(name).data_format == "online":  # a rollout: token-level [B, T] log-probs, one advantage per row
        mask = torch.arange(max_length)[None] < length("chosen")[:, None]
        logps = -per_token_scale * (0.2 + 1.6 * torch.rand((batch_size, max_length), generator=g, dtype=torch.float64))
        rollout = {"policy_logps": logps, "old_logps": logps + 0.1 * torch.randn(logps.shape, generator=g, dtype=torch.float64),
                   "reference_logps": logps + 0.5 * torch.randn(logps.shape, generator=g, dtype=torch.float64),
                   "advantages": torch.randn(batch_size, generator=g, dtype=torch.float64), "mask": mask}
        if name == "ppo":  # token-level advantages, and the critic's values and returns
            token = lambda: torch.randn(logps.shape, generator=g, dtype=torch.float64)  # noqa: E731
            rollout.update(advantages=token(), values=token(), returns=token())
            rollout["old_values"] = rollout["values"] + 0.1 * token()
        # online DPO: alternate chosen/rejected rows (a trailing odd row is in no pair)
        preferences = torch.tensor([1 if i % 2 == 0 else -1 for i in range(batch_size)])
        rollout["preferences"] = torch.where(torch.arange(batch_size) < batch_size // 2 * 2, preferences, 0)
        keep_dtype = ("mask", "preferences")
        return {k: rollout[k].to(dtype) if k not in keep_dtype else rollout[k] for k in loss_inputs(name)}

    def token_mask(side):
        positions = torch.arange(max_length + 1)[None]
        return (positions >= 1) & (positions < 1 + length(side)[:, None])

    def per_token(side):
        values = -per_token_scale * (0.2 + 1.6 * torch.rand((batch_size, max_length + 1), generator=g,
                                                              dtype=torch.float64))
        return torch.where(token_mask(side), values, 0.0).to(dtype)

    inputs = {}
    for input_name in loss_inputs(name):
        side = "rejected" if "rejected" in input_name else "kl" if "kl" in input_name else "chosen"
        if input_name.endswith("_token_mask"):
            inputs[input_name] = token_mask(side)
        elif input_name.startswith("policy_") and input_name.endswith("_token_logps"):
            inputs[input_name] = per_token(side)
        elif input_name.startswith("reference_") and input_name.endswith("_token_logps"):
            policy = inputs["policy_" + input_name[len("reference_"):]]
            noise = 0.5 * torch.randn(policy.shape, generator=g, dtype=torch.float64).to(dtype)
            inputs[input_name] = torch.where(token_mask(side), policy + noise, 0.0)
        elif input_name.endswith("_log_sum_sq_probs"):
            policy = inputs["policy_" + side + "_logps"]
            floor = -10.0 * length(side).to(dtype)
            mix = torch.rand(batch_size, generator=g, dtype=torch.float64).to(dtype)
            inputs[input_name] = torch.maximum(2 * policy, floor) * (0.3 + 0.7 * mix)
        elif input_name == "desirable":
            inputs[input_name] = torch.arange(batch_size) % 3 != 1
        elif input_name.endswith("lengths"):
            inputs[input_name] = length(side)
        elif input_name.startswith("policy_") and "online" in input_name:
            inputs[input_name] = summed("online", (batch_size, online_samples))
        elif input_name.startswith("policy_"):
            inputs[input_name] = summed(side)
        elif input_name.startswith("reference_"):
            policy = inputs.get("policy_" + input_name[len("reference_"):])
            if policy is None:
                raise KeyError(f"{name}: {input_name} is declared before its policy counterpart")
            inputs[input_name] = policy + 2.0 * torch.randn(policy.shape, generator=g, dtype=torch.float64).to(dtype)
        else:
            raise KeyError(f"make_inputs does not know how to build input {input_name!r} of loss {name!r}")
    return inputs


@pytest.fixture
def make_inputs():
    return _make_inputs
