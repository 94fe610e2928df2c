"""LD-DPO, WPO, SFT on the chosen completions and weighted mixtures of losses, against TRL 1.16's ``DPOTrainer``.

As in test_losses_against_trl.py, ``DPOTrainer._compute_loss`` runs unbound on a stand-in ``self`` and stand-in
models, in float64; loss, gradients with respect to the policy's (per-token) log-probs and the reward metrics must
agree to 1e-6. Here the stand-ins return real per-token log-probs rather than sums spread evenly, since LD-DPO and
WPO read the tokens: the policy's ``log_probs`` (and, for WPO, ``log_sum_sq_probs``) and a reference model's
``log_probs`` (``precompute_ref_logps=False``, so that TRL applies ``ld_alpha`` to the reference's tokens itself).

- ``ld_dpo``: TRL's ``sigmoid`` loss with ``ld_alpha``.
- ``wpo``: TRL's ``sigmoid`` loss with ``use_weighting=True``.
- ``sft_chosen``: TRL's ``sft`` loss type.
- ``mixture``: a ``loss_type`` list with ``loss_weights`` (MPO's recipe with parts TRL computes as we do: TRL 1.16's
  ``bco_pair`` has no reward shift, so the MPO default is compared with BCO's shift applied to TRL's reference as in
  test_losses_against_trl.py).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from test_losses_against_trl import (REWARD_METRICS, TOLERANCE, _accelerator, _StandInModel, assert_same_metrics,
                                     completion_masks)
from trl.trainer.dpo_trainer import DPOTrainer

from rlmf.losses import bind_loss


def token_batch(seed: int, batch_size: int = 6, prompt_length: int = 2) -> dict:
    """A paired batch in TRL's layout (``[2B, T]`` rows, chosen then rejected): per-token log-probs of the policy
    (a leaf that requires grad) and of the reference, the completion mask, and ``log sum_v p(v)^2``, each drawn
    from an explicit softmax over a small vocabulary so that they are mutually consistent."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (2 * batch_size,), generator=g)
    lengths[0], lengths[batch_size + 1] = 1, 1
    attention_mask, completion_mask = completion_masks(lengths, prompt_length)
    shifted = completion_mask[:, 1:].bool()
    vocab = 7

    def distribution():
        return torch.log_softmax(2.0 * torch.randn((*shifted.shape, vocab), generator=g, dtype=torch.float64), -1)

    tokens = torch.randint(0, vocab, shifted.shape, generator=g)
    policy, reference = distribution(), distribution()
    pick = lambda logp: torch.where(shifted, logp.gather(-1, tokens[..., None])[..., 0], 0.0)  # noqa: E731
    log_sum_sq = torch.where(shifted, torch.logsumexp(2 * policy, dim=-1), 0.0)
    return {"policy": pick(policy).requires_grad_(), "reference": pick(reference), "log_sum_sq": log_sum_sq,
            "mask": shifted, "attention_mask": attention_mask, "completion_mask": completion_mask}


def trl_loss(batch: dict, loss_types, loss_weights=None, beta: float = 0.1, ld_alpha=None, use_weighting=False,
             reference_shift: float = 0.0):
    """TRL's loss and metrics on ``batch`` (``reference_shift`` nats added to the reference's summed log-probs)."""
    outputs = SimpleNamespace(log_probs=batch["policy"], entropy=torch.zeros_like(batch["policy"]),
                              mean_logits=torch.zeros_like(batch["policy"]),
                              is_top1=torch.zeros_like(batch["mask"]), log_sum_sq_probs=batch["log_sum_sq"])
    first_token = batch["mask"] & (batch["mask"].long().cumsum(-1) == 1)
    reference_logps = batch["reference"] + reference_shift * first_token  # each row's sum moves by the shift
    model = _StandInModel(lambda **kwargs: outputs)
    model.is_gradient_checkpointing, model._modules = False, {}  # what TRL and accelerate read off a model
    reference = _StandInModel(lambda **kwargs: SimpleNamespace(log_probs=reference_logps))
    trainer = SimpleNamespace(
        model=model, ref_model=reference, accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=ld_alpha,
        precompute_ref_logps=False, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
        args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None), loss_types=list(loss_types),
        loss_weights=list(loss_weights or [1.0] * len(loss_types)), beta=beta, label_smoothing=0.0,
        use_weighting=use_weighting, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(batch["completion_mask"]), "attention_mask": batch["attention_mask"],
              "completion_mask": batch["completion_mask"]}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def assert_same_loss_and_grads(our_loss, trl_loss, batch):
    """Same loss, and same gradient with respect to the policy's log-prob of every completion token. (TRL's LD-DPO
    masks count positions after a completion's end as its tokens too, harmless since a causal LM's log-prob there
    is 0 and has no gradient; the gradients are compared where the tokens are.)"""
    torch.testing.assert_close(our_loss.detach(), trl_loss.detach(), **TOLERANCE)
    ours_g, = torch.autograd.grad(our_loss, [batch["policy"]], retain_graph=True)
    trl_g, = torch.autograd.grad(trl_loss, [batch["policy"]], retain_graph=True)
    torch.testing.assert_close(ours_g * batch["mask"], trl_g * batch["mask"], **TOLERANCE)
    assert (ours_g * batch["mask"]).abs().sum() > 0


def our_inputs(batch: dict) -> dict:
    """The same batch as the generator hands it to a loss: chosen and rejected halves, per-token and summed."""
    b = batch["policy"].shape[0] // 2
    per_row = {"policy_{}_token_logps": batch["policy"], "reference_{}_token_logps": batch["reference"],
               "{}_token_mask": batch["mask"], "policy_{}_logps": batch["policy"].sum(-1),
               "reference_{}_logps": batch["reference"].sum(-1), "{}_lengths": batch["mask"].sum(-1),
               "policy_{}_log_sum_sq_probs": batch["log_sum_sq"].sum(-1)}
    inputs = {}
    for pattern, value in per_row.items():
        inputs[pattern.format("chosen")], inputs[pattern.format("rejected")] = value[:b], value[b:]
    return inputs


def ours(name: str, batch: dict, **hyperparameters):
    loss = bind_loss(name, hyperparameters)
    inputs = our_inputs(batch)
    return loss(**{k: inputs[k] for k in loss.inputs})


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta,ld_alpha", [(0.1, 0.5), (0.5, 0.0), (0.3, 0.25), (0.1, 1.0)])
def test_ld_dpo_matches_trl_ld_alpha(seed, beta, ld_alpha):
    batch = token_batch(seed)
    result = ours("ld_dpo", batch, beta=beta, ld_alpha=ld_alpha)
    trl, trl_metrics = trl_loss(batch, ["sigmoid"], beta=beta, ld_alpha=ld_alpha)
    assert_same_loss_and_grads(result.loss, trl, batch)
    assert_same_metrics(result.metrics, trl_metrics, REWARD_METRICS + ("logps/chosen", "logps/rejected"))


def test_ld_dpo_cases_are_not_dpo():
    """The batch has pairs of different lengths, so that a wrong split of shared and excess tokens would show."""
    batch = token_batch(0)
    mask = batch["mask"]
    b = mask.shape[0] // 2
    assert (mask[:b].sum(-1) != mask[b:].sum(-1)).sum() >= 3
    dpo, _ = trl_loss(batch, ["sigmoid"])
    assert abs(ours("ld_dpo", batch, ld_alpha=0.5).loss - dpo) > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_wpo_matches_trl_use_weighting(seed, beta):
    batch = token_batch(seed)
    result = ours("wpo", batch, beta=beta)
    trl, trl_metrics = trl_loss(batch, ["sigmoid"], beta=beta, use_weighting=True)
    assert_same_loss_and_grads(result.loss, trl, batch)
    assert_same_metrics(result.metrics, trl_metrics, REWARD_METRICS + ("logps/chosen", "logps/rejected"))
    unweighted, _ = trl_loss(batch, ["sigmoid"], beta=beta)
    assert abs(unweighted - result.loss) > 1e-3  # the weights matter


@pytest.mark.parametrize("seed", [0, 1])
def test_sft_chosen_matches_trl_sft_loss_type(seed):
    batch = token_batch(seed)
    result = ours("sft_chosen", batch)
    trl, _ = trl_loss(batch, ["sft"])
    assert_same_loss_and_grads(result.loss, trl, batch)


MIXTURES = [
    # (our parts, TRL loss types, TRL weights)
    ({"dpo": {"weight": 0.8, "beta": 0.1}, "sppo_hard": {"weight": 0.2, "beta": 0.1}, "sft_chosen": {"weight": 1.0}},
     ["sigmoid", "sppo_hard", "sft"], [0.8, 0.2, 1.0]),
    ({"ipo": {"weight": 0.5, "beta": 0.3}, "hinge": {"weight": 1.5, "beta": 0.3}},
     ["ipo", "hinge"], [0.5, 1.5]),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("parts,loss_types,loss_weights", MIXTURES)
def test_mixture_matches_trl_loss_type_list(seed, parts, loss_types, loss_weights):
    batch = token_batch(seed)
    result = ours("mixture", batch, parts=parts)
    beta = next(spec["beta"] for spec in parts.values() if "beta" in spec)
    trl, trl_metrics = trl_loss(batch, loss_types, loss_weights, beta=beta)
    assert_same_loss_and_grads(result.loss, trl, batch)
    first = next(iter(parts))
    assert_same_metrics({k[len(first) + 1:]: v for k, v in result.metrics.items() if k.startswith(first + "/")},
                        trl_metrics, REWARD_METRICS)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_default_mixture_is_trl_mpo_with_bco_shifted(seed):
    """MPO's recipe (``sigmoid``, ``bco_pair``, ``sft`` at 0.8, 0.2, 1.0). Our ``bco_pair`` shifts the rewards by
    their batch mean delta (detached), TRL 1.16's does not; the difference is exactly 0.2 times the BCO part's, which
    is compared with TRL's ``bco_pair`` on a reference moved by delta / beta (test_losses_against_trl.py)."""
    batch = token_batch(seed)
    result = ours("mixture", batch)  # the defaults: MPO
    delta = result.metrics["bco_pair/rewards/delta"].item()
    sigmoid_and_sft, _ = trl_loss(batch, ["sigmoid", "sft"], [0.8, 1.0])
    shifted_bco, _ = trl_loss(batch, ["bco_pair"], reference_shift=delta / 0.1)
    assert_same_loss_and_grads(result.loss, sigmoid_and_sft + 0.2 * shifted_bco, batch)
    torch.testing.assert_close(result.metrics["bco_pair/loss"], shifted_bco.detach(), **TOLERANCE)
