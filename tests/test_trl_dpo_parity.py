"""Three optimiser steps of our DPO (the real ``Generator`` under a Lightning ``Trainer``) against three of TRL 1.16's
``DPOTrainer``, on a tiny saved Llama (tests/checkpoints.py), step by step.

Both trainers are run by experiments/bench_dpo_trl_parity.py (:func:`rlmf_dpo_steps`, :func:`trl_dpo_steps`; the
same functions that compare them on the real SmolLM2-135M): the same checkpoint, float32 on CPU, no dropout, AdamW
(lr 1e-3, no weight decay), gradient clipping at 1.0, a cosine schedule without warm-up, ``beta`` 0.1, the same six
pairs in the same batches of two in the same order (ours shuffles with its seeded sampler; TRL is given the pairs in
that order and samples sequentially). The reference is either a frozen copy of the policy (the usual set-up: TRL
loads it again from the checkpoint, ours copies the policy) or a second tiny Llama of another seed, so that from the
first step the margins are far from zero and ``rewards/accuracies`` is decided by more than rounding.

Checked: TRL's tokenised pairs are our features token for token, and each step's collated ``[2B, T]`` ``input_ids``
are identical; then per step, ``loss`` and ``rewards/margins`` (and ``rewards/chosen`` / ``rewards/rejected``) agree
to 1e-5 absolute and ``rewards/accuracies`` exactly. The difference left is float32 rounding: TRL scores every
position with its chunked fused LM head, ours only the completion positions with its own fused kernel, on padded
rows (``packing=none``) or shared-prompt packed rows (``shared_prompt``), and the AdamW updates inherit it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from bench_dpo_trl_parity import METRICS, rlmf_dpo_steps, same_batches, training_order, trl_dpo_steps  # noqa: E402
from checkpoints import TEXTS, save_tiny_checkpoint, tiny_tokenizer  # noqa: E402

from rlmf.data import PreferencePair, tokenize_pairs  # noqa: E402

STEPS, BATCH_SIZE, MAX_LENGTH = 3, 2, 64
HYPERPARAMETERS = dict(batch_size=BATCH_SIZE, steps=STEPS, max_length=MAX_LENGTH, beta=0.1, lr=1e-3, seed=0)
TOLERANCE = 1e-5  # absolute, on loss and the reward metrics


def parity_pairs():
    """Six pairs of the tiny texts: each prompt with its own completion chosen and another text's rejected."""
    return [PreferencePair(prompt, completion, TEXTS[(i + shift) % len(TEXTS)][1])
            for shift in (1, 2) for i, (prompt, completion) in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    """The checkpoints, our features, the batch order and TRL's run for each reference (run once, on first use)."""
    policy = str(tiny_checkpoint("llama"))
    references = {"frozen_copy": None,
                  "other_model": str(save_tiny_checkpoint("llama", tmp_path_factory.mktemp("reference"), seed=1))}
    pairs = parity_pairs()
    features, counts = tokenize_pairs(pairs, tiny_tokenizer(), MAX_LENGTH, None)
    assert counts.kept == len(pairs) and not counts.completion_truncated and not counts.boundary_mismatch
    order = training_order(len(pairs), BATCH_SIZE, HYPERPARAMETERS["seed"], STEPS)
    trl_runs = {}

    def trl(reference: str):
        if reference not in trl_runs:
            trl_runs[reference] = trl_dpo_steps(policy, [pairs[i] for i in order],
                                                reference_checkpoint=references[reference], **HYPERPARAMETERS)
        return trl_runs[reference]

    return policy, references, features, order, trl


def test_trl_sees_our_token_ids(setup):
    _, _, features, order, trl = setup
    assert trl("other_model")["features"] == [features[i] for i in order]


@pytest.mark.parametrize("packing", ["none", "shared_prompt"])
@pytest.mark.parametrize("reference", ["other_model", "frozen_copy"])
def test_three_dpo_steps_match_trl(setup, reference, packing):
    """``other_model``: margins far from zero from the first step. ``frozen_copy`` (the usual DPO set-up): the first
    step's margins are exactly zero on both sides (policy and reference are the same weights), so its accuracy is 0
    on both; the later steps are not."""
    policy, references, features, _, trl = setup
    theirs = trl(reference)
    ours = rlmf_dpo_steps(policy, features, reference_checkpoint=references[reference], packing=packing,
                          **HYPERPARAMETERS)
    assert same_batches(ours["input_ids"], theirs["input_ids"]), "the two trainers collated different batches"
    assert len(ours["metrics"]) == len(theirs["metrics"]) == STEPS
    for step, (a, b) in enumerate(zip(ours["metrics"], theirs["metrics"]), 1):
        for name in METRICS:
            tolerance = 0.0 if name == "rewards/accuracies" else TOLERANCE
            assert a[name] == pytest.approx(b[name], abs=tolerance, rel=0), f"step {step} {name}: {a} vs TRL {b}"
    # The comparison means something: every step moved the policy, and the margins are not (all) zero.
    assert len({round(m["loss"], 4) for m in theirs["metrics"]}) == STEPS
    first = 1 if reference == "frozen_copy" else 0
    assert all(abs(m["rewards/margins"]) > 1e-2 for m in theirs["metrics"][first:])
