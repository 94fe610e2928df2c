"""The online-RL objectives of ``rlmf.losses.policy_gradient``, ``ppo`` and ``reinforce`` (RLOO): against
plain-Python references, gradcheck in float64, and against TRL 1.16 wherever it has the same computation. GSPO,
CISPO, GRPO's options and REINFORCE++ / ReMax are in ``test_policy_gradient_variants.py`` and ``test_reinforce.py``.

TRL's objectives live inside trainer methods that read ``self`` and call a model, so, as in
``test_losses_against_trl.py``, each is called unbound on a stand-in ``self`` (a ``SimpleNamespace`` holding only
the attributes the method reads, a single-process accelerator) whose ``_get_per_token_logps_and_entropies`` returns
our per-token log-probs, so that TRL's own code forms the ratios, clips, adds the KL, masks and aggregates:

- ``grpo_loss``: ``GRPOTrainer._compute_loss`` (``importance_sampling_level="token"``, no entropy mask, no vLLM
  correction, one accumulation step, ``num_items_in_batch`` = the batch's completion tokens). Loss, gradients with
  respect to the per-token log-probs and the ``kl`` / ``clip_ratio/*`` metrics agree to 1e-6 for each loss type,
  with beta 0 and > 0 and with eps_high != eps_low. Our ``"dapo"`` is TRL's ``"dapo"`` on one process and one
  micro-batch per generation batch (TRL normalises by the completion tokens of the whole generation batch across
  processes); it is also TRL's ``"bnpo"``, and our ``"bnpo"`` is too: the test checks both.
- ``rloo_loss``: ``RLOOTrainer._compute_loss`` (sequence log-prob = sum of per-token log-probs over the mask).
- ``rloo_rewards`` + ``rloo_advantages``: ``RLOOTrainer._generate_and_score_completions`` (generation, reward
  function and the two models replaced by stand-ins), which also checks the k1 estimator through TRL's ``kl`` metric.
- PPO, GAE, whitening and the adaptive KL controller have no counterpart in TRL 1.16 (its PPO trainer is gone), so
  they are checked against references written from the papers' formulas only.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.rloo_trainer import RLOOTrainer

from rlmf.losses import LossResult
from rlmf.losses.advantages import kl_penalty, masked_mean, rloo_advantages
from rlmf.losses.policy_gradient import drop_uniform_groups, grpo_loss
from rlmf.losses.ppo import adaptive_kl_coef, ppo_loss
from rlmf.losses.reinforce import rloo_loss, rloo_rewards

TOLERANCE = dict(atol=1e-10, rtol=1e-10)
TRL_TOLERANCE = dict(atol=1e-6, rtol=1e-6)
CPU = torch.device("cpu")
LENGTHS = [7, 3, 1, 5, 0, 6]  # includes a full row, a one-token row and an empty row


def token_batch(seed: int, lengths=LENGTHS, width: int = 7) -> dict:
    """Float64 [B, T] log-probs (``logps`` a leaf that requires grad), right-padded mask, [B] and [B, T] advantages.

    ``old_logps`` lie within about +-0.5 nats of ``logps``, so with eps 0.2 ratios fall on both sides of both clip
    bounds; ``reference_logps`` within about +-1 nat. When the first row has two tokens, its second token has
    ratio 1.25 and a positive advantage, and (with a fourth row of two tokens) that row's second token ratio 0.85
    and a negative advantage: inside the clip range at eps 0.2, outside at eps_high 0.2 / eps_low 0.1, so each
    bound is exercised separately.
    """
    g = torch.Generator().manual_seed(seed)
    batch_size = len(lengths)
    mask = torch.arange(width) < torch.tensor(lengths)[:, None]
    logps = -2.5 * torch.rand(batch_size, width, generator=g, dtype=torch.float64)
    old_logps = logps + 0.3 * torch.randn(batch_size, width, generator=g, dtype=torch.float64)
    reference_logps = logps + 0.6 * torch.randn(batch_size, width, generator=g, dtype=torch.float64)
    sequence_advantages = torch.randn(batch_size, generator=g, dtype=torch.float64)
    token_advantages = torch.randn(batch_size, width, generator=g, dtype=torch.float64)
    for row, ratio, sign in ((0, 1.25, 1.0), (3, 0.85, -1.0)):
        if row < batch_size and lengths[row] >= 2:
            old_logps[row, 1] = logps[row, 1] - math.log(ratio)
            sequence_advantages[row] = sign * sequence_advantages[row].abs()
            token_advantages[row, 1] = sign * token_advantages[row, 1].abs()
    return {
        "logps": logps.clone().requires_grad_(),
        "old_logps": old_logps,
        "reference_logps": reference_logps,
        "mask": mask,
        "sequence_advantages": sequence_advantages,
        "token_advantages": token_advantages,
        "values": torch.randn(batch_size, width, generator=g, dtype=torch.float64).requires_grad_(),
        "old_values": torch.randn(batch_size, width, generator=g, dtype=torch.float64),
        "returns": torch.randn(batch_size, width, generator=g, dtype=torch.float64),
    }


def with_garbage(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    garbage = torch.tensor([float("nan"), float("inf"), -1e30, float("-inf")], dtype=tensor.dtype)
    return torch.where(mask, tensor, garbage[torch.arange(tensor.numel()) % 4].view(tensor.shape))


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


def clipped_term(ratio: float, advantage: float, eps_low: float, eps_high: float) -> float:
    """-min(r A, clip(r) A) for Python floats."""
    clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
    return -min(ratio * advantage, clipped * advantage)


def assert_metrics_close(ours: dict, expected: dict, tolerance=TOLERANCE):
    for name, value in expected.items():
        assert name in ours, f"missing metric {name!r}"
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(ours[name].item()), name
        else:
            torch.testing.assert_close(ours[name].item(), float(value), **tolerance, msg=name)


def _accelerator():
    return SimpleNamespace(
        device=CPU,
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
        reduce=lambda t, reduction="sum": t,
        num_processes=1,
        process_index=0,
        pad_across_processes=lambda t, dim=0, pad_index=0: t,
        sync_gradients=True,
    )


# ------------------------------------------------------------------------------------------------------ PPO


def reference_ppo(batch, eps_low, eps_high, value_clip, vf_coef, with_values=True):
    """Python floats over the masked tokens: token means of the surrogate and the clipped value loss, and metrics."""
    tokens = [
        (i, t) for i in range(batch["mask"].shape[0]) for t in range(batch["mask"].shape[1]) if batch["mask"][i, t]
    ]
    n = len(tokens)
    lp, old, adv = (batch[k].detach() for k in ("logps", "old_logps", "token_advantages"))
    policy, clipped, approx, ratios = 0.0, 0, 0.0, 0.0
    for i, t in tokens:
        ratio = math.exp(lp[i, t].item() - old[i, t].item())
        a = adv[i, t].item()
        policy += clipped_term(ratio, a, eps_low, eps_high) / n
        clipped += (ratio < 1 - eps_low and a < 0) or (ratio > 1 + eps_high and a > 0)
        approx += 0.5 * (lp[i, t].item() - old[i, t].item()) ** 2 / n
        ratios += ratio / n
    metrics = {"loss/policy": policy, "policy/clipfrac": clipped / n, "policy/approxkl": approx,
               "policy/ratio": ratios}
    if not with_values:
        return policy, metrics
    v, v_old, ret = (batch[k].detach() for k in ("values", "old_values", "returns"))
    value, value_clipped = 0.0, 0
    for i, t in tokens:
        first = (v[i, t].item() - ret[i, t].item()) ** 2
        if value_clip is None:
            second = first
        else:
            low, high = v_old[i, t].item() - value_clip, v_old[i, t].item() + value_clip
            second = (min(max(v[i, t].item(), low), high) - ret[i, t].item()) ** 2
        value += 0.5 * max(first, second) / n
        value_clipped += second > first
    residuals = [ret[i, t].item() - v[i, t].item() for i, t in tokens]
    targets = [ret[i, t].item() for i, t in tokens]

    def population_variance(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / len(xs)

    metrics.update(
        {
            "loss/value": value,
            "val/clipfrac": value_clipped / n,
            "val/vpred": sum(v[i, t].item() for i, t in tokens) / n,
            "val/explained_variance": 1 - population_variance(residuals) / population_variance(targets),
        }
    )
    return policy + vf_coef * value, metrics


def call_ppo(batch, **hyperparameters):
    return ppo_loss(
        batch["logps"], batch["old_logps"], batch["token_advantages"], batch["mask"],
        batch["values"], batch["old_values"], batch["returns"], **hyperparameters,
    )


@pytest.mark.parametrize("value_clip", [0.2, None])
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.1, 0.28)])
def test_ppo_loss_matches_reference(eps_low, eps_high, value_clip):
    batch = token_batch(0)
    result = call_ppo(batch, eps_low=eps_low, eps_high=eps_high, value_clip=value_clip, vf_coef=0.3)
    assert isinstance(result, LossResult)
    expected, metrics = reference_ppo(batch, eps_low, eps_high, value_clip, vf_coef=0.3)
    torch.testing.assert_close(result.loss.item(), expected, **TOLERANCE)
    assert_metrics_close(result.metrics, metrics)
    assert 0 < result.metrics["policy/clipfrac"] < 1
    if value_clip is not None:
        assert 0 < result.metrics["val/clipfrac"] < 1
    for value in result.metrics.values():
        assert value.dim() == 0 and not value.requires_grad


def test_ppo_loss_without_a_critic_is_the_policy_term():
    batch = token_batch(1)
    result = ppo_loss(batch["logps"], batch["old_logps"], batch["token_advantages"], batch["mask"])
    expected, metrics = reference_ppo(batch, 0.2, 0.2, 0.2, 0.1, with_values=False)
    torch.testing.assert_close(result.loss.item(), expected, **TOLERANCE)
    assert_metrics_close(result.metrics, metrics)
    assert "loss/value" not in result.metrics


def test_ppo_on_policy_gradient_is_reinforce():
    """At r = 1 nothing is clipped: d loss / d logp_t = -A_t / (number of completion tokens)."""
    batch = token_batch(2)
    old = batch["logps"].detach()
    result = ppo_loss(batch["logps"], old, batch["token_advantages"], batch["mask"])
    (grad,) = grads(result.loss, [batch["logps"]])
    expected = torch.where(batch["mask"], -batch["token_advantages"], 0.0) / batch["mask"].sum()
    torch.testing.assert_close(grad, expected, **TOLERANCE)
    assert result.metrics["policy/clipfrac"] == 0 and result.metrics["policy/approxkl"] == 0


def test_ppo_gradcheck():
    batch = token_batch(3, lengths=[4, 2, 0], width=4)

    def fn(logps, values):
        return call_ppo(
            {**batch, "logps": logps, "values": values}, eps_low=0.1, eps_high=0.3, value_clip=0.2, vf_coef=0.5
        ).loss

    assert torch.autograd.gradcheck(fn, (batch["logps"], batch["values"]))


def test_ppo_ignores_padding():
    batch = token_batch(4)
    clean = call_ppo(batch)
    dirty_batch = dict(batch)
    for key in ("old_logps", "token_advantages", "old_values", "returns"):
        dirty_batch[key] = with_garbage(batch[key], batch["mask"])
    logps = batch["logps"].detach().clone()
    logps[~batch["mask"]] = float("nan")
    dirty_batch["logps"] = logps.requires_grad_()
    dirty = call_ppo(dirty_batch)
    torch.testing.assert_close(dirty.loss, clean.loss, **TOLERANCE)
    (clean_grad,) = grads(clean.loss, [batch["logps"]])
    (dirty_grad,) = grads(dirty.loss, [dirty_batch["logps"]])
    torch.testing.assert_close(dirty_grad, clean_grad, **TOLERANCE)
    for name, value in clean.metrics.items():
        torch.testing.assert_close(dirty.metrics[name], value, **TOLERANCE, msg=name)


def test_ppo_explained_variance_limits_and_errors():
    batch = token_batch(5)
    perfect = call_ppo({**batch, "values": batch["returns"].clone()})
    assert perfect.metrics["val/explained_variance"] == 1.0
    constant = call_ppo({**batch, "returns": torch.full_like(batch["returns"], 0.7)})
    assert math.isnan(constant.metrics["val/explained_variance"].item())
    with pytest.raises(ValueError, match="returns"):
        ppo_loss(batch["logps"], batch["old_logps"], batch["token_advantages"], batch["mask"], batch["values"])
    with pytest.raises(ValueError, match="old_values"):
        ppo_loss(batch["logps"], batch["old_logps"], batch["token_advantages"], batch["mask"], batch["values"],
                 returns=batch["returns"])
    with pytest.raises(ValueError, match="eps_low"):
        call_ppo(batch, eps_low=1.0)
    with pytest.raises(ValueError, match="eps_high"):
        call_ppo(batch, eps_high=-0.1)


def test_adaptive_kl_coef_follows_the_proportional_controller():
    # e = clip(KL / target - 1, -0.2, 0.2); beta' = beta (1 + e n / H).
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 10000, 256) == 0.1
    assert math.isclose(adaptive_kl_coef(0.1, 6.6, 6.0, 10000, 256), 0.1 * (1 + 0.1 * 256 / 10000))
    assert math.isclose(adaptive_kl_coef(0.1, 3.0, 6.0, 10000, 256), 0.1 * (1 - 0.2 * 256 / 10000))  # clipped
    assert math.isclose(adaptive_kl_coef(0.1, 60.0, 6.0, 10000, 256), 0.1 * (1 + 0.2 * 256 / 10000))  # clipped
    observed = torch.tensor(5.4, dtype=torch.float64)  # a 0-d tensor is accepted
    assert math.isclose(adaptive_kl_coef(0.2, observed, 6.0, 100, 10), 0.2 * (1 - 0.1 * 10 / 100))
    assert adaptive_kl_coef(0.1, 9.0, 6.0, 10000, 0) == 0.1
    with pytest.raises(ValueError, match="target_kl"):
        adaptive_kl_coef(0.1, 1.0, 0.0, 10000, 1)


# ----------------------------------------------------------------------------------------------------- GRPO


def trl_grpo_loss(batch: dict, *, loss_type: str, eps_low: float, eps_high: float, beta: float = 0.0,
             level: str = "token", delta=None, top_entropy_quantile: float = 1.0, entropy_coef: float = 0.0,
             max_length: int = 10):
    """``GRPOTrainer._compute_loss`` on a stand-in ``self`` (token or sequence ``level``, TRL's ``delta``, entropy
    mask and bonus); returns TRL's loss and its last logged metrics."""
    model = SimpleNamespace(training=True)
    logps, mask = batch["logps"], batch["mask"]
    entropies = batch.get("entropies")
    trainer = SimpleNamespace(
        accelerator=_accelerator(),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
        model=model, beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=None, importance_sampling_level=level,
        use_vllm=False, current_gradient_accumulation_steps=1, max_completion_length=max_length,
        _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    trainer.get_high_entropy_mask = lambda e, m, t: GRPOTrainer.get_high_entropy_mask(trainer, e, m, t)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (
        logps, entropies if entropies is not None else torch.zeros_like(logps), None)
    batch_size, width = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(batch_size, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch_size, 2, dtype=torch.long),
        "completion_ids": torch.zeros(batch_size, width, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": batch["sequence_advantages"],
        "old_per_token_logps": batch["old_logps"],
        "ref_per_token_logps": batch["reference_logps"],
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(trainer, model, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def call_grpo(batch, **hyperparameters):
    return grpo_loss(
        batch["logps"], batch["old_logps"], batch["sequence_advantages"], batch["mask"], batch["reference_logps"],
        **hyperparameters,
    )


GRPO_CASES = [("grpo", "grpo"), ("dapo", "dapo"), ("dapo", "bnpo"), ("bnpo", "bnpo"), ("dr_grpo", "dr_grpo")]
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                "clip_ratio/high_max")


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type,trl_loss_type", GRPO_CASES)
def test_grpo_loss_matches_trl(loss_type, trl_loss_type, beta, eps_low, eps_high):
    """TRL: ``GRPOTrainer._compute_loss`` with ``loss_type=trl_loss_type`` on a stand-in trainer (see the module
    docstring); loss, gradient with respect to the per-token log-probs, ``kl`` (beta > 0) and ``clip_ratio/*``."""
    batch = token_batch(10)
    hyperparameters = dict(beta=beta, eps_low=eps_low, eps_high=eps_high, loss_type=loss_type)
    result = call_grpo(batch, **hyperparameters, max_completion_length=10)
    trl_loss, trl_metrics = trl_grpo_loss(batch, loss_type=trl_loss_type, beta=beta, eps_low=eps_low,
                                          eps_high=eps_high, max_length=10)
    torch.testing.assert_close(result.loss, trl_loss, **TRL_TOLERANCE)
    (ours_grad,) = grads(result.loss, [batch["logps"]])
    (trl_grad,) = grads(trl_loss, [batch["logps"]])
    torch.testing.assert_close(ours_grad, trl_grad, **TRL_TOLERANCE)
    assert ours_grad.abs().sum() > 0
    names = CLIP_METRICS + (("kl",) if beta else ())
    assert_metrics_close(result.metrics, {name: trl_metrics[name] for name in names}, TRL_TOLERANCE)
    assert result.metrics["clip_ratio/low_mean"] > 0 and result.metrics["clip_ratio/high_mean"] > 0


def reference_grpo(batch, loss_type, beta, eps_low, eps_high, max_length):
    """Python floats, one completion at a time."""
    mask = batch["mask"]
    lp, old, ref = (batch[k].detach() for k in ("logps", "old_logps", "reference_logps"))
    per_row = []
    for i in range(mask.shape[0]):
        a = batch["sequence_advantages"][i].item()
        row = []
        for t in range(mask.shape[1]):
            if mask[i, t]:
                d = ref[i, t].item() - lp[i, t].item()
                kl = math.exp(d) - d - 1
                ratio = math.exp(lp[i, t].item() - old[i, t].item())
                row.append(clipped_term(ratio, a, eps_low, eps_high) + beta * kl)
        per_row.append(row)
    total = sum(sum(row) for row in per_row)
    if loss_type == "grpo":
        return sum(sum(row) / len(row) if row else 0.0 for row in per_row) / len(per_row)
    if loss_type in ("dapo", "bnpo"):
        return total / sum(len(row) for row in per_row)
    return total / (len(per_row) * max_length)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo"])
def test_grpo_loss_matches_reference_and_gradcheck(loss_type):
    batch = token_batch(11)
    result = call_grpo(batch, beta=0.1, eps_low=0.15, eps_high=0.3, loss_type=loss_type, max_completion_length=12)
    expected = reference_grpo(batch, loss_type, 0.1, 0.15, 0.3, 12)
    torch.testing.assert_close(result.loss.item(), expected, **TOLERANCE)

    small = token_batch(12, lengths=[3, 1, 0], width=3)

    def fn(logps):
        return call_grpo({**small, "logps": logps}, beta=0.1, eps_low=0.15, eps_high=0.3, loss_type=loss_type,
                         max_completion_length=4).loss

    assert torch.autograd.gradcheck(fn, (small["logps"],))


def test_grpo_on_policy_gradient():
    """With old = logps and beta 0 the "grpo" gradient is -A_i / (|o_i| B) on every token of completion i."""
    batch = token_batch(13)
    batch["old_logps"] = batch["logps"].detach()
    result = call_grpo(batch)
    (grad,) = grads(result.loss, [batch["logps"]])
    lengths = batch["mask"].sum(1).clamp(min=1)
    expected = -batch["sequence_advantages"][:, None] / lengths[:, None] / len(LENGTHS) * batch["mask"]
    torch.testing.assert_close(grad, expected, **TOLERANCE)
    assert "kl" in result.metrics  # logged whenever reference log-probs are given


def test_grpo_ignores_padding_and_handles_empty_batches():
    batch = token_batch(14)
    clean = call_grpo(batch, beta=0.05, loss_type="dapo")
    logps = batch["logps"].detach().clone()
    logps[~batch["mask"]] = float("nan")
    dirty_batch = {**batch, "logps": logps.requires_grad_()}
    for key in ("old_logps", "reference_logps"):
        dirty_batch[key] = with_garbage(batch[key], batch["mask"])
    dirty = call_grpo(dirty_batch, beta=0.05, loss_type="dapo")
    torch.testing.assert_close(dirty.loss, clean.loss, **TOLERANCE)
    (clean_grad,) = grads(clean.loss, [batch["logps"]])
    (dirty_grad,) = grads(dirty.loss, [dirty_batch["logps"]])
    torch.testing.assert_close(dirty_grad, clean_grad, **TOLERANCE)

    empty = {**batch, "mask": torch.zeros_like(batch["mask"])}
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        result = call_grpo(empty, beta=0.05, loss_type=loss_type, max_completion_length=7)
        assert result.loss.item() == 0.0
        assert math.isnan(result.metrics["clip_ratio/low_min"].item())
        assert result.metrics["clip_ratio/low_mean"].item() == 0.0


def test_grpo_rejects_bad_arguments():
    batch = token_batch(15)
    with pytest.raises(ValueError, match="max_completion_length"):
        call_grpo(batch, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        call_grpo(batch, loss_type="sapo")
    with pytest.raises(ValueError, match="reference_logps"):
        grpo_loss(batch["logps"], batch["old_logps"], batch["sequence_advantages"], batch["mask"], beta=0.1)
    with pytest.raises(ValueError, match=r"advantages must have shape \[B\]"):
        grpo_loss(batch["logps"], batch["old_logps"], batch["token_advantages"], batch["mask"])
    with pytest.raises(ValueError, match="eps_low"):
        call_grpo(batch, eps_low=-0.1)


def test_drop_uniform_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 2.0, -1.0, 2.0])
    expected = torch.tensor([False, True, False, True])
    assert torch.equal(drop_uniform_groups(rewards, 3), expected)
    assert torch.equal(drop_uniform_groups(rewards.view(4, 3), 3), expected)
    assert not drop_uniform_groups(rewards, 1).any()  # a group of one is uniform
    with pytest.raises(ValueError, match="group_size"):
        drop_uniform_groups(rewards, 5)


# ----------------------------------------------------------------------------------------------------- RLOO


def rloo_batch(seed: int, eps_scale: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed)
    per_token = token_batch(seed)
    old_sequence = (per_token["old_logps"] * per_token["mask"]).sum(1)
    return {
        "per_token_logps": per_token["logps"],
        "mask": per_token["mask"],
        "old_sequence_logps": old_sequence + eps_scale * torch.randn(old_sequence.shape, generator=g,
                                                                      dtype=torch.float64),
        "advantages": per_token["sequence_advantages"],
    }


def sequence_logps(batch):
    return (batch["per_token_logps"] * batch["mask"]).sum(1)


@pytest.mark.parametrize("eps,eps_high", [(0.2, None), (0.2, 0.28)])
def test_rloo_loss_matches_reference_and_trl(eps, eps_high):
    """TRL: ``RLOOTrainer._compute_loss`` on a stand-in trainer whose forward returns our per-token log-probs (TRL
    sums them over the completion mask into the sequence log-prob); loss, gradient with respect to the per-token
    log-probs and ``clip_ratio/*`` metrics."""
    batch = rloo_batch(20)
    result = rloo_loss(sequence_logps(batch), batch["old_sequence_logps"], batch["advantages"], eps=eps,
                       eps_high=eps_high)
    high = eps if eps_high is None else eps_high
    ratios = torch.exp(sequence_logps(batch) - batch["old_sequence_logps"]).tolist()
    expected = sum(clipped_term(r, a, eps, high) for r, a in zip(ratios, batch["advantages"].tolist())) / len(ratios)
    torch.testing.assert_close(result.loss.item(), expected, **TOLERANCE)

    model = SimpleNamespace(training=True)
    logps = batch["per_token_logps"]
    trainer = SimpleNamespace(
        accelerator=_accelerator(), model=model, epsilon_low=eps, epsilon_high=high, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, torch.zeros_like(logps), None)
    batch_size, width = batch["mask"].shape
    inputs = {
        "prompt_ids": torch.zeros(batch_size, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch_size, 2, dtype=torch.long),
        "completion_ids": torch.zeros(batch_size, width, dtype=torch.long),
        "completion_mask": batch["mask"].long(),
        "old_logps": batch["old_sequence_logps"],
        "advantages": batch["advantages"],
    }
    trl_loss = RLOOTrainer._compute_loss(trainer, model, inputs)
    torch.testing.assert_close(result.loss, trl_loss, **TRL_TOLERANCE)
    (ours_grad,) = grads(result.loss, [logps])
    (trl_grad,) = grads(trl_loss, [logps])
    torch.testing.assert_close(ours_grad, trl_grad, **TRL_TOLERANCE)
    assert ours_grad.abs().sum() > 0
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    assert_metrics_close(result.metrics, {name: trl_metrics[name] for name in CLIP_METRICS}, TRL_TOLERANCE)
    assert 0 < result.metrics["clip_ratio/region_mean"] < 1


def test_rloo_loss_gradcheck_and_errors():
    g = torch.Generator().manual_seed(21)
    logps = (-5 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_()
    old = logps.detach() + 0.4 * torch.randn(6, generator=g, dtype=torch.float64)
    advantages = torch.randn(6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: rloo_loss(x, old, advantages, eps_high=0.3).loss, (logps,))
    with pytest.raises(ValueError, match="B"):
        rloo_loss(logps, old[:3], advantages)
    with pytest.raises(ValueError, match="eps_low"):
        rloo_loss(logps, old, advantages, eps=1.5)


def test_rloo_rewards_subtract_the_summed_k1_kl():
    scores = torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64)
    logps_sum = torch.tensor([-10.0, -4.0, -7.0], dtype=torch.float64, requires_grad=True)
    reference_sum = torch.tensor([-12.0, -4.5, -6.0], dtype=torch.float64)
    rewards = rloo_rewards(scores, logps_sum, reference_sum, kl_coef=0.05)
    torch.testing.assert_close(rewards, torch.tensor([1.0 - 0.1, -0.025, -0.5 + 0.05], dtype=torch.float64))
    assert not rewards.requires_grad
    with pytest.raises(ValueError, match="alike"):
        rloo_rewards(scores, logps_sum[:2], reference_sum, 0.05)


def _rloo_generation_trainer(scores, lengths, old_per_token, reference_per_token, group_size, beta):
    """A stand-in ``self`` for ``RLOOTrainer._generate_and_score_completions``: generation returns completions of
    the given lengths, the policy and reference forwards return the given per-token log-probs, the one reward
    function returns ``scores``."""
    count = scores.numel()
    reference_model = SimpleNamespace()
    trainer = SimpleNamespace(
        accelerator=_accelerator(),
        args=SimpleNamespace(per_device_train_batch_size=count, gradient_checkpointing_kwargs=None),
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        ref_model=reference_model,
        beta=beta,
        mask_truncated_completions=False,
        pad_to_multiple_of=None,
        _tokenizer=SimpleNamespace(pad_token_id=0),
        num_generations=group_size,
        reward_clip_range=None,
        normalize_advantages=False,
        reward_weights=torch.ones(1, dtype=torch.float64),
        reward_func_names=["score"],
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list)},
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
    )
    trainer._generate = lambda prompts: (
        [[1, 2]] * len(prompts), [[3] * int(n) for n in lengths], ["c"] * len(prompts)
    )
    trainer._get_per_token_logps_and_entropies = lambda model, *args, **kwargs: (
        reference_per_token if model is reference_model else old_per_token, None, None
    )
    trainer._calculate_rewards = lambda inputs, prompts, completions, ids: scores[:, None].clone()
    return trainer


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_rloo_rewards_and_advantages_match_trl(beta):
    """TRL: ``RLOOTrainer._generate_and_score_completions`` on the stand-in above (``normalize_advantages=False``,
    no reward clipping): its ``advantages`` against ``rloo_advantages(rloo_rewards(...))`` with the sequence sums of
    the same per-token log-probs, its ``old_logps`` against our masked sum, and (beta > 0) its ``kl`` metric against
    the token mean of ``kl_penalty(..., "k1")``."""
    group_size, prompts, width = 3, 3, 6
    g = torch.Generator().manual_seed(22)
    count = group_size * prompts
    scores = torch.randn(count, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, width + 1, (count,), generator=g)
    lengths[0] = width
    mask = torch.arange(width) < lengths[:, None]
    old = -2.0 * torch.rand(count, width, generator=g, dtype=torch.float64)
    reference = old + 0.5 * torch.randn(count, width, generator=g, dtype=torch.float64)
    trainer = _rloo_generation_trainer(scores, lengths, old, reference, group_size, beta)
    output = RLOOTrainer._generate_and_score_completions(trainer, [{"prompt": "p"}] * count)

    old_sum = (old * mask).sum(1)
    rewards = rloo_rewards(scores, old_sum, (reference * mask).sum(1), kl_coef=beta)
    torch.testing.assert_close(rloo_advantages(rewards, group_size), output["advantages"].to(torch.float64),
                               **TRL_TOLERANCE)
    torch.testing.assert_close(old_sum, output["old_logps"], **TRL_TOLERANCE)
    if beta:
        kl = masked_mean(kl_penalty(old, reference, "k1"), mask).item()
        assert math.isclose(kl, trainer._metrics["train"]["kl"][-1], rel_tol=1e-6)
