"""Every loss that TRL 1.16 also implements, checked against TRL on the same log-probs.

Float64 throughout; the loss, the gradients with respect to the policy log-probs and the shared metrics must agree
to 1e-6. TRL's losses live inside trainer methods that read ``self`` and call a model, so each is called unbound on
a stand-in ``self`` (a ``SimpleNamespace`` with only the attributes that method reads) and a stand-in model that
returns tensors built from our log-probs, so that TRL's own code does the sequence sums, length normalisation,
masking and loss composition:

- ``dpo`` (TRL ``sigmoid``), ``hinge``, ``ipo``, ``robust``, ``apo_zero``, ``apo_down``, ``sft``, and the DPO
  variants ``nca_pair``, ``exo_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``discopop`` and ``f_dpo`` (TRL
  ``sigmoid`` with its ``f_divergence_type``; the alpha-divergence in float32, whose TRL branch has no float64):
  ``DPOTrainer._compute_loss`` with ``precompute_ref_logps=True`` (reference log-probs come from the batch). The
  stand-in model returns per-token log-probs: each completion's summed log-prob spread evenly over its completion
  tokens, zero elsewhere, so TRL's sums give back our sequence log-probs and ``completion_mask`` gives our lengths.
  IPO: TRL divides each log-ratio by its completion length (``completion_mask.sum()``), as we do.
  SFT: TRL's ``sft`` loss type is the token mean of the chosen per-token log-probs, ``-sum(logps) / sum(lengths)``.
  ``bco_pair``: TRL 1.16's has no reward shift; ours (the batch-mean delta) equals TRL's with both reference
  log-probs moved by ``delta / beta``.
- ``kto``, ``apo_zero_unpaired``: ``KTOTrainer._compute_loss`` (and its ``_compute_kl_logps``) the same way; the
  stand-in model tells the main forward from the KL forward by the ``input_ids`` tensor it is given.
- ``orpo``: ``ORPOTrainer.get_batch_loss_metrics`` (with its ``concatenated_forward``, ``get_batch_logps`` and
  ``odds_ratio_loss``); the stand-in model returns two-token-vocabulary logits whose log-softmax at the label is
  the per-token log-prob we want. Convention difference: TRL's NLL term averages over prompt and completion
  tokens, ours over completion tokens only (a pure loss never sees the prompt). With a one-token prompt nothing
  of the prompt is predicted (the first token has no predecessor), so the two coincide and the test is exact.
  TRL's ``odds_ratio_loss`` casts to float32 (``.float()``): agreement there is at float32 precision, still
  inside 1e-6 for these magnitudes. TRL names the batch mean of ``log sigmoid(log odds ratio)`` ``log_odds_ratio``
  and the mean log odds ratio itself ``log_odds_chosen``; our ``log_odds_ratio`` is the latter, the quantity its
  name says.
- ``cpo``, ``simpo``: ``CPOTrainer.get_batch_loss_metrics`` with ``loss_type="sigmoid"`` / ``"simpo"``, same stand-in
  model. TRL's CPO NLL is over completion tokens (prompt labels are -100), as ours, so any prompt length matches.
  TRL's SimPO is run with ``cpo_alpha=0`` (no NLL term), which is SimPO.
- ``cdpo``: TRL 1.16's ``DPOTrainer`` has no label-smoothed sigmoid (its ``label_smoothing`` feeds only ``robust``,
  ``exo_pair`` and ``aot``). ``CPOTrainer.cpo_loss`` with ``loss_type="sigmoid"`` is exactly the label-smoothed
  sigmoid of ``beta * (a - b)`` for whatever ``a``, ``b`` it is given; given the log-ratios ``pi - ref`` it is
  cDPO, so that method is called directly on a stand-in ``self``.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # importing ORPO/CPO from trl.experimental is intended here

from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

from rlmf.losses import get_loss, loss_inputs

TOLERANCE = dict(atol=1e-6, rtol=1e-6)
CPU = torch.device("cpu")


def _accelerator():
    """Single-process stand-in: gathering is the identity."""
    return SimpleNamespace(
        device=CPU, gather=lambda t: t, gather_for_metrics=lambda t: t, autocast=contextlib.nullcontext
    )


class _StandInModel:
    """Callable like a causal LM; ``forward`` maps the keyword inputs to the outputs object."""

    training = True

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


def paired_batch(seed: int, batch_size: int = 6) -> dict:
    """Float64 leaf tensors for a paired loss: summed log-probs, log-ratios of both signs, lengths including 1."""
    g = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.randint(1, 12, (batch_size,), generator=g)
    rejected_lengths = torch.randint(1, 12, (batch_size,), generator=g)
    chosen_lengths[0] = 1
    rejected_lengths[1] = 1

    def summed(lengths):
        return -lengths.double() * (0.2 + 2.5 * torch.rand(batch_size, generator=g, dtype=torch.float64))

    policy_chosen = summed(chosen_lengths)
    policy_rejected = summed(rejected_lengths)
    reference_chosen = policy_chosen + 3.0 * torch.randn(batch_size, generator=g, dtype=torch.float64)
    reference_rejected = policy_rejected + 3.0 * torch.randn(batch_size, generator=g, dtype=torch.float64)
    return {
        "policy_chosen_logps": policy_chosen.requires_grad_(),
        "policy_rejected_logps": policy_rejected.requires_grad_(),
        "reference_chosen_logps": reference_chosen,
        "reference_rejected_logps": reference_rejected,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }


def ours(name: str, batch: dict, **hyperparameters):
    """Our loss called as the trainer calls it: with exactly the inputs it names."""
    return get_loss(name)(**{k: batch[k] for k in loss_inputs(name)}, **hyperparameters)


def assert_same_loss_and_grads(our_loss, trl_loss, wrt):
    torch.testing.assert_close(our_loss.detach(), trl_loss.detach().to(our_loss.dtype), **TOLERANCE)
    our_grads = torch.autograd.grad(our_loss, wrt, retain_graph=True, allow_unused=True)
    trl_grads = torch.autograd.grad(trl_loss, wrt, retain_graph=True, allow_unused=True)
    for tensor, ours_g, trl_g in zip(wrt, our_grads, trl_grads):
        ours_g = torch.zeros_like(tensor) if ours_g is None else ours_g
        trl_g = torch.zeros_like(tensor) if trl_g is None else trl_g
        assert torch.isfinite(ours_g).all()
        torch.testing.assert_close(ours_g, trl_g.to(ours_g.dtype), **TOLERANCE)
    # A comparison of two zero gradients would prove nothing.
    assert any(g is not None and g.abs().sum() > 0 for g in our_grads)


def assert_same_metrics(our_metrics: dict, trl_metrics: dict, names):
    for name in names:
        assert name in our_metrics, f"our metrics lack {name!r}"
        torch.testing.assert_close(our_metrics[name].item(), float(trl_metrics[name]), **TOLERANCE)


# ---------------------------------------------------------------------------------------------- DPOTrainer


def completion_masks(lengths: torch.Tensor, prompt_length: int):
    """``attention_mask`` and ``completion_mask`` ([N, T]) for rows of a prompt then a right-padded completion."""
    width = prompt_length + int(lengths.max())
    positions = torch.arange(width)
    attention_mask = (positions < prompt_length + lengths[:, None]).long()
    completion_mask = ((positions >= prompt_length) & (positions < prompt_length + lengths[:, None])).long()
    return attention_mask, completion_mask


def spread_over_tokens(summed_logps: torch.Tensor, lengths: torch.Tensor, shift_completion_mask: torch.Tensor):
    """Per-token log-probs ([N, T-1], aligned like a causal LM's): each sum spread evenly over its tokens."""
    return (summed_logps / lengths.to(summed_logps.dtype))[:, None] * shift_completion_mask


def trl_dpo_trainer_loss(loss_type: str, batch: dict, beta: float, label_smoothing: float = 0.0, *,
                         f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                         discopop_tau: float = 0.05):
    lengths = torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]])
    attention_mask, completion_mask = completion_masks(lengths, prompt_length=2)
    per_token = spread_over_tokens(
        torch.cat([batch["policy_chosen_logps"], batch["policy_rejected_logps"]]), lengths, completion_mask[:, 1:]
    )
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    model = _StandInModel(lambda **kwargs: outputs)
    trainer = SimpleNamespace(
        model=model,
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        args=SimpleNamespace(discopop_tau=discopop_tau),
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": batch["reference_chosen_logps"],
        "ref_rejected_logps": batch["reference_rejected_logps"],
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


DPO_TRAINER_CASES = [
    # (our registry name, TRL loss_type, hyperparameters); non-default values catch misplaced hyperparameters.
    ("dpo", "sigmoid", {"beta": 0.1}),
    ("dpo", "sigmoid", {"beta": 0.7}),
    ("hinge", "hinge", {"beta": 0.1}),
    ("hinge", "hinge", {"beta": 1.0}),
    ("ipo", "ipo", {"beta": 0.1}),
    ("ipo", "ipo", {"beta": 2.0}),
    ("robust", "robust", {"beta": 0.1, "label_smoothing": 0.1}),
    ("robust", "robust", {"beta": 0.3, "label_smoothing": 0.35}),
    ("apo_zero", "apo_zero", {"beta": 0.1}),
    ("apo_zero", "apo_zero", {"beta": 0.5}),
    ("apo_down", "apo_down", {"beta": 0.1}),
    ("apo_down", "apo_down", {"beta": 0.5}),
    ("nca_pair", "nca_pair", {"beta": 0.1}),
    ("nca_pair", "nca_pair", {"beta": 0.6}),
    ("exo_pair", "exo_pair", {"beta": 0.1, "label_smoothing": 0.001}),
    ("exo_pair", "exo_pair", {"beta": 0.4, "label_smoothing": 0.2}),
    ("sppo_hard", "sppo_hard", {"beta": 0.1}),
    ("sppo_hard", "sppo_hard", {"beta": 0.8}),
    ("aot", "aot", {"beta": 0.1, "label_smoothing": 0.0}),
    ("aot", "aot", {"beta": 0.5, "label_smoothing": 0.2}),
    ("aot_unpaired", "aot_unpaired", {"beta": 0.1, "label_smoothing": 0.0}),
    ("aot_unpaired", "aot_unpaired", {"beta": 0.5, "label_smoothing": 0.2}),
    ("discopop", "discopop", {"beta": 0.1, "tau": 0.05}),
    ("discopop", "discopop", {"beta": 0.3, "tau": 0.4}),
    ("f_dpo", "sigmoid", {"beta": 0.1, "f_divergence_type": "reverse_kl"}),
    ("f_dpo", "sigmoid", {"beta": 0.1, "f_divergence_type": "forward_kl"}),
    ("f_dpo", "sigmoid", {"beta": 0.5, "f_divergence_type": "forward_kl"}),
    ("f_dpo", "sigmoid", {"beta": 0.1, "f_divergence_type": "js_divergence"}),
    ("f_dpo", "sigmoid", {"beta": 0.5, "f_divergence_type": "js_divergence"}),
]
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def trl_options(hyperparameters: dict) -> dict:
    """Our hyperparameters under TRL's names: DiscoPOP's ``tau`` is TRL's ``discopop_tau``; our (the f-DPO
    paper's) alpha-divergence ``alpha`` is ``1 - alpha`` in TRL 1.16's code, ``(u**(alpha - 1) - 1) / (alpha - 1)``."""
    names = {"tau": "discopop_tau"}
    options = {names.get(k, k): v for k, v in hyperparameters.items()}
    if "f_alpha_divergence_coef" in options:
        options["f_alpha_divergence_coef"] = 1 - options["f_alpha_divergence_coef"]
    return options


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,trl_type,hyperparameters", DPO_TRAINER_CASES)
def test_dpo_trainer_losses_match_trl(name, trl_type, hyperparameters, seed):
    batch = paired_batch(seed)
    result = ours(name, batch, **hyperparameters)
    trl_loss, trl_metrics = trl_dpo_trainer_loss(trl_type, batch, **trl_options(hyperparameters))
    assert_same_loss_and_grads(
        result.loss, trl_loss, [batch["policy_chosen_logps"], batch["policy_rejected_logps"]]
    )
    assert_same_metrics(result.metrics, trl_metrics, REWARD_METRICS + ("logps/chosen", "logps/rejected"))


def test_hinge_cases_exercise_both_sides_of_the_kink():
    """Otherwise the hinge comparison could pass with the relu missing."""
    batch = paired_batch(0)
    margins = (batch["policy_chosen_logps"] - batch["reference_chosen_logps"]) - (
        batch["policy_rejected_logps"] - batch["reference_rejected_logps"]
    )
    assert (1.0 * margins > 1).any() and (1.0 * margins < 1).any()


def test_aot_and_f_dpo_cases_are_not_dpo():
    """The batch sorts differently from the pairs (else AOT would be a per-pair loss here) and the f-divergences
    move the loss away from DPO's (else the f_dpo cases would prove nothing beyond test_dpo)."""
    for seed in (0, 1):
        batch = paired_batch(seed)
        margins = batch["policy_chosen_logps"] - batch["policy_rejected_logps"]
        reference_margins = batch["reference_chosen_logps"] - batch["reference_rejected_logps"]
        assert not torch.equal(torch.argsort(margins), torch.argsort(reference_margins))
        dpo = ours("dpo", batch, beta=0.1).loss
        for divergence in ("forward_kl", "js_divergence", "alpha_divergence"):
            assert abs(ours("f_dpo", batch, beta=0.1, f_divergence_type=divergence).loss - dpo) > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 0.6])
def test_bco_pair_matches_trl_with_the_reference_moved_by_the_shift(seed, beta):
    """TRL 1.16's ``bco_pair`` has no reward shift; shifting both reference log-probs by delta / beta moves both
    rewards by -delta, which is our shift exactly (delta is detached, so the gradients agree too). The reference
    log-probs are lowered by 4 nats so that the rewards, and so delta, are far from 0."""
    batch = paired_batch(seed)
    for side in ("chosen", "rejected"):
        batch[f"reference_{side}_logps"] = batch[f"reference_{side}_logps"] - 4.0
    result = ours("bco_pair", batch, beta=beta)
    rewards = beta * torch.cat([batch["policy_chosen_logps"] - batch["reference_chosen_logps"],
                                batch["policy_rejected_logps"] - batch["reference_rejected_logps"]]).detach()
    delta = rewards.mean()
    torch.testing.assert_close(result.metrics["rewards/delta"], delta, **TOLERANCE)
    shifted = {**batch, "reference_chosen_logps": batch["reference_chosen_logps"] + delta / beta,
               "reference_rejected_logps": batch["reference_rejected_logps"] + delta / beta}
    trl_loss, _ = trl_dpo_trainer_loss("bco_pair", shifted, beta)
    assert_same_loss_and_grads(
        result.loss, trl_loss, [batch["policy_chosen_logps"], batch["policy_rejected_logps"]]
    )
    unshifted_loss, trl_metrics = trl_dpo_trainer_loss("bco_pair", batch, beta)
    assert abs(unshifted_loss - result.loss) > 1e-2  # the shift matters
    assert_same_metrics(result.metrics, trl_metrics, REWARD_METRICS + ("logps/chosen", "logps/rejected"))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta,alpha", [(0.1, 0.5), (0.5, 0.5), (0.1, 0.3), (0.3, 0.8)])
def test_f_dpo_alpha_divergence_matches_trl_in_float32(seed, beta, alpha):
    """TRL's alpha-divergence branch looks up a clamp per dtype that has no float64 entry, so this comparison runs
    in float32 (ours and TRL's on the same float32 inputs) at float32 tolerances. At alpha = 0.5 the two
    conventions coincide; elsewhere TRL is given ``1 - alpha`` (see ``trl_options``)."""
    batch = {k: (v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
             for k, v in paired_batch(seed).items()}
    hyperparameters = {"beta": beta, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": alpha}
    result = ours("f_dpo", batch, **hyperparameters)
    assert result.loss.dtype == torch.float32
    trl_loss, trl_metrics = trl_dpo_trainer_loss("sigmoid", batch, **trl_options(hyperparameters))
    wrt = [batch["policy_chosen_logps"], batch["policy_rejected_logps"]]
    torch.testing.assert_close(result.loss, trl_loss, atol=1e-5, rtol=1e-5)
    for ours_g, trl_g in zip(torch.autograd.grad(result.loss, wrt, retain_graph=True),
                             torch.autograd.grad(trl_loss, wrt)):
        torch.testing.assert_close(ours_g, trl_g, atol=1e-5, rtol=1e-5)
        assert ours_g.abs().sum() > 0
    for name in REWARD_METRICS:
        torch.testing.assert_close(result.metrics[name].item(), float(trl_metrics[name]), atol=1e-5, rtol=1e-5)


def test_trl_exo_pair_at_its_default_label_smoothing_is_infinite():
    """Why exo_pair defaults to the paper's eps = 1e-3 rather than TRL's label_smoothing default of 0."""
    trl_loss, _ = trl_dpo_trainer_loss("exo_pair", paired_batch(0), beta=0.1, label_smoothing=0.0)
    assert torch.isinf(trl_loss)


@pytest.mark.parametrize("seed", [0, 1])
def test_sft_matches_trl_sft_loss_type(seed):
    batch = paired_batch(seed)
    result = get_loss("sft")(policy_logps=batch["policy_chosen_logps"], lengths=batch["chosen_lengths"])
    trl_loss, _ = trl_dpo_trainer_loss("sft", batch, beta=0.1)
    assert_same_loss_and_grads(
        result.loss, trl_loss, [batch["policy_chosen_logps"], batch["policy_rejected_logps"]]
    )


# ---------------------------------------------------------------------------------------------- KTOTrainer


def unpaired_batch(seed: int, desirable: list, kl_offset: float) -> dict:
    """Float64 leaf tensors for an unpaired loss; ``kl_offset`` shifts the mismatched log-ratios (so z > 0 or = 0)."""
    batch_size = len(desirable)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (batch_size,), generator=g)
    kl_lengths = torch.randint(1, 10, (batch_size,), generator=g)
    policy = -lengths.double() * (0.2 + 2.0 * torch.rand(batch_size, generator=g, dtype=torch.float64))
    policy_kl = -kl_lengths.double() * (0.2 + 2.0 * torch.rand(batch_size, generator=g, dtype=torch.float64))
    return {
        "policy_logps": policy.requires_grad_(),
        "reference_logps": policy.detach() + 3.0 * torch.randn(batch_size, generator=g, dtype=torch.float64),
        "desirable": torch.tensor(desirable),
        "policy_kl_logps": policy_kl,
        "reference_kl_logps": policy_kl - kl_offset + torch.randn(batch_size, generator=g, dtype=torch.float64),
        "lengths": lengths,
        "kl_lengths": kl_lengths,
    }


def trl_kto_trainer_loss(loss_type: str, batch: dict, beta: float, desirable_weight=1.0, undesirable_weight=1.0):
    calculate_kl = loss_type == "kto"
    attention_mask, completion_mask = completion_masks(batch["lengths"], prompt_length=2)
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "label": batch["desirable"],
        "ref_logps": batch["reference_logps"],
    }
    main_log_probs = spread_over_tokens(batch["policy_logps"], batch["lengths"], completion_mask[:, 1:])
    log_probs_for = {id(inputs["input_ids"]): main_log_probs}
    if calculate_kl:
        kl_attention_mask, kl_completion_mask = completion_masks(batch["kl_lengths"], prompt_length=3)
        inputs.update(
            KL_input_ids=torch.zeros_like(kl_completion_mask),
            KL_attention_mask=kl_attention_mask,
            KL_completion_mask=kl_completion_mask,
            ref_KL_logps=batch["reference_kl_logps"],
        )
        log_probs_for[id(inputs["KL_input_ids"])] = spread_over_tokens(
            batch["policy_kl_logps"], batch["kl_lengths"], kl_completion_mask[:, 1:]
        )

    def forward(**kwargs):
        per_token = log_probs_for[id(kwargs["input_ids"])]
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)

    model = _StandInModel(forward)
    trainer = SimpleNamespace(
        model=model,
        accelerator=_accelerator(),
        calculate_KL=calculate_kl,
        precompute_ref_logps=True,
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


UNPAIRED_LABELS = {
    "mixed": [True, False, True, True, False, False, True],
    "all_desirable": [True, True, True, True],
    "all_undesirable": [False, False, False],
}


@pytest.mark.parametrize("labels", sorted(UNPAIRED_LABELS))
@pytest.mark.parametrize("kl_offset", [2.0, -2.0], ids=["z_positive", "z_clamped"])
@pytest.mark.parametrize(
    "hyperparameters",
    [
        {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
        {"beta": 0.4, "desirable_weight": 1.33, "undesirable_weight": 0.8},
    ],
)
def test_kto_matches_trl(labels, kl_offset, hyperparameters):
    batch = unpaired_batch(3, UNPAIRED_LABELS[labels], kl_offset)
    result = ours("kto", batch, **hyperparameters)
    trl_loss, trl_metrics = trl_kto_trainer_loss("kto", batch, **hyperparameters)
    assert_same_loss_and_grads(result.loss, trl_loss, [batch["policy_logps"]])
    names = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins")
    assert_same_metrics(result.metrics, trl_metrics, [n for n in names if n in trl_metrics])
    assert set(result.metrics) & set(names) == set(trl_metrics) & set(names)
    if kl_offset > 0:
        assert result.metrics["kl"] > 0
    else:
        assert result.metrics["kl"] == 0


@pytest.mark.parametrize("labels", sorted(UNPAIRED_LABELS))
@pytest.mark.parametrize("beta", [0.1, 0.6])
def test_apo_zero_unpaired_matches_trl(labels, beta):
    batch = unpaired_batch(4, UNPAIRED_LABELS[labels], kl_offset=0.0)
    result = ours("apo_zero_unpaired", batch, beta=beta)
    trl_loss, trl_metrics = trl_kto_trainer_loss("apo_zero_unpaired", batch, beta=beta)
    assert_same_loss_and_grads(result.loss, trl_loss, [batch["policy_logps"]])
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins")
    assert_same_metrics(result.metrics, trl_metrics, [n for n in names if n in trl_metrics])


# ------------------------------------------------------------------------------- ORPOTrainer and CPOTrainer


def concatenated_batch_and_model(batch: dict, prompt_length: int):
    """A chosen/rejected batch in ORPO/CPO's format and a stand-in model for it.

    All tokens are id 0 over a two-token vocabulary; the logit row that predicts a completion token is
    ``[a, 0]`` with ``a = v - log(1 - exp(v))``, so ``log_softmax(...)[0] = v``, the per-token log-prob (each
    completion's sum spread evenly over its tokens). Rows that predict nothing we score get logits 0.
    """
    sides = {}
    for side in ("chosen", "rejected"):
        lengths = batch[f"{side}_lengths"]
        attention_mask, completion_mask = completion_masks(lengths, prompt_length)
        sides[side] = dict(
            input_ids=torch.zeros_like(completion_mask),
            attention_mask=attention_mask,
            labels=torch.zeros_like(completion_mask).masked_fill(completion_mask == 0, -100),
        )
    trl_batch = {f"{side}_{key}": value for side, tensors in sides.items() for key, value in tensors.items()}

    lengths = torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]])
    summed = torch.cat([batch["policy_chosen_logps"], batch["policy_rejected_logps"]])
    per_token = summed / lengths.double()
    log_odds = per_token - torch.log(-torch.expm1(per_token))

    def forward(input_ids, attention_mask=None, **kwargs):
        width = input_ids.shape[1]
        predicted = torch.arange(1, width + 1)  # logits at position t predict token t + 1
        predicts_completion = (predicted >= prompt_length) & (predicted < prompt_length + lengths[:, None])
        first = torch.where(predicts_completion, log_odds[:, None], torch.zeros((), dtype=torch.float64))
        logits = torch.stack([first, torch.zeros_like(first)], dim=-1)
        return SimpleNamespace(logits=logits)

    return trl_batch, _StandInModel(forward)


def _pairwise_trainer(trainer_class, **attributes):
    trainer = SimpleNamespace(
        accelerator=_accelerator(), is_encoder_decoder=False, aux_loss_enabled=False, **attributes
    )
    trainer.concatenated_inputs = trainer_class.concatenated_inputs
    trainer.get_batch_logps = trainer_class.get_batch_logps
    trainer.concatenated_forward = types.MethodType(trainer_class.concatenated_forward, trainer)
    return trainer


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("odds_ratio_weight", [0.1, 0.5])
def test_orpo_matches_trl(seed, odds_ratio_weight):
    batch = paired_batch(seed)
    result = ours("orpo", batch, odds_ratio_weight=odds_ratio_weight)
    trl_batch, model = concatenated_batch_and_model(batch, prompt_length=1)
    trainer = _pairwise_trainer(ORPOTrainer, beta=odds_ratio_weight, padding_value=0)
    trainer.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, trainer)
    trl_loss, trl_metrics = ORPOTrainer.get_batch_loss_metrics(trainer, model, trl_batch)
    assert_same_loss_and_grads(
        result.loss, trl_loss, [batch["policy_chosen_logps"], batch["policy_rejected_logps"]]
    )
    assert_same_metrics(result.metrics, trl_metrics, REWARD_METRICS)
    torch.testing.assert_close(result.metrics["nll"].item(), trl_metrics["nll_loss"], **TOLERANCE)
    torch.testing.assert_close(result.metrics["log_odds_ratio"].item(), trl_metrics["log_odds_chosen"], **TOLERANCE)


def _cpo_trainer(loss_type, beta, label_smoothing=0.0, cpo_alpha=0.0, simpo_gamma=0.5):
    trainer = _pairwise_trainer(
        CPOTrainer,
        pad_token_id=0,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        cpo_alpha=cpo_alpha,
        simpo_gamma=simpo_gamma,
        alpha=0.0,
    )
    trainer.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, trainer)
    return trainer


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("prompt_length", [1, 4])
@pytest.mark.parametrize("beta,nll_weight", [(0.1, 1.0), (0.5, 0.3)])
def test_cpo_matches_trl(seed, prompt_length, beta, nll_weight):
    batch = paired_batch(seed)
    result = ours("cpo", batch, beta=beta, nll_weight=nll_weight)
    trl_batch, model = concatenated_batch_and_model(batch, prompt_length)
    trainer = _cpo_trainer("sigmoid", beta=beta, cpo_alpha=nll_weight)
    trl_loss, trl_metrics = CPOTrainer.get_batch_loss_metrics(trainer, model, trl_batch)
    assert_same_loss_and_grads(
        result.loss, trl_loss, [batch["policy_chosen_logps"], batch["policy_rejected_logps"]]
    )
    assert_same_metrics(result.metrics, trl_metrics, REWARD_METRICS)
    torch.testing.assert_close(result.metrics["nll"].item(), trl_metrics["nll_loss"], **TOLERANCE)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.3), (0.5, 0.0)])
def test_simpo_matches_trl(seed, beta, gamma):
    batch = paired_batch(seed)
    result = ours("simpo", batch, beta=beta, gamma=gamma)
    trl_batch, model = concatenated_batch_and_model(batch, prompt_length=3)
    # TRL's simpo_gamma is the same margin as ours: it subtracts gamma / beta inside beta * (...).
    trainer = _cpo_trainer("simpo", beta=beta, cpo_alpha=0.0, simpo_gamma=gamma)
    trl_loss, trl_metrics = CPOTrainer.get_batch_loss_metrics(trainer, model, trl_batch)
    assert_same_loss_and_grads(
        result.loss, trl_loss, [batch["policy_chosen_logps"], batch["policy_rejected_logps"]]
    )
    assert_same_metrics(result.metrics, trl_metrics, REWARD_METRICS)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.1), (0.4, 0.3), (0.1, 0.0)])
def test_cdpo_matches_trl_label_smoothed_sigmoid(seed, beta, label_smoothing):
    batch = paired_batch(seed)
    result = ours("cdpo", batch, beta=beta, label_smoothing=label_smoothing)
    trainer = SimpleNamespace(
        accelerator=_accelerator(), alpha=0.0, beta=beta, label_smoothing=label_smoothing, loss_type="sigmoid"
    )
    chosen_log_ratios = batch["policy_chosen_logps"] - batch["reference_chosen_logps"]
    rejected_log_ratios = batch["policy_rejected_logps"] - batch["reference_rejected_logps"]
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen_log_ratios, rejected_log_ratios)
    assert_same_loss_and_grads(
        result.loss, losses.mean(), [batch["policy_chosen_logps"], batch["policy_rejected_logps"]]
    )
    torch.testing.assert_close(result.metrics["rewards/chosen"], chosen_rewards.mean(), **TOLERANCE)
    torch.testing.assert_close(result.metrics["rewards/rejected"], rejected_rewards.mean(), **TOLERANCE)
    if label_smoothing == 0.0:
        dpo = ours("dpo", batch, beta=beta)
        torch.testing.assert_close(result.loss, dpo.loss, **TOLERANCE)
