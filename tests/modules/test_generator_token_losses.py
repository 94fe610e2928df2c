"""What the generator gives the losses that need more than summed log-probs, and TR-DPO's moving reference.

- WPO's ``log sum_v p(v)^2`` equals the one of ``softmax(model(...).logits / T)``, padded and packed.
- LD-DPO's per-token inputs are those of :func:`rlmf.logprobs.completion_token_logps` for the policy and the
  reference, and the summed log-probs every other loss takes are unchanged, bit for bit.
- A loss that needs the reference's tokens refuses a cache of summed reference log-probs, in the config and in the
  module.
- TR-DPO: after every k-th optimiser step (accumulated micro-batches counting once) the reference's weights are
  ``alpha * policy + (1 - alpha) * reference``; a checkpoint carries the refreshed reference; refused where there
  is no frozen copy to refresh.
"""

from __future__ import annotations

import random

import lightning as L
import pytest
import torch

from rlmf.errors import ConfigError

from rlmf.validate import validate
from rlmf.data import PreferencePair, tokenize_pairs
from rlmf.data.alignment import AlignmentDataModule
from rlmf.logprobs import completion_logps, completion_token_logps, completion_token_logps_and_sq_probs
from rlmf.models import build_tiny_generator, train_tokenizer
from rlmf.modules.generator import Generator
from rlmf.packing import row_groups
from rlmf.reference import frozen_copy
from rlmf.tasks.persona_email import build_world, compose_email, corpus_texts


@pytest.fixture(scope="module")
def setup():
    world = build_world(seed=0, num_prospects=40)
    tokenizer = train_tokenizer(corpus_texts(world), vocab_size=300)
    rng = random.Random(0)
    pairs = [PreferencePair(b.prompt, compose_email(b, rng, 1.0), compose_email(b, rng, 0.0)) for b in world.train[:8]]
    features, _ = tokenize_pairs(pairs, tokenizer, 192, 96)
    return tokenizer, features


def tiny_model(tokenizer, seed=0):
    return build_tiny_generator(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                max_position_embeddings=320, seed=seed)


def paired_batch(tokenizer, features):
    return AlignmentDataModule(features, features, "paired", tokenizer.pad_token_id, 192, 4).collate(features[:4])


@pytest.mark.parametrize("packing", ["none", "shared_prompt"])
def test_log_sum_sq_probs_are_those_of_the_forward_distribution(setup, packing):
    tokenizer, features = setup
    model = tiny_model(tokenizer).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # distributions between flat and certain
    batch = paired_batch(tokenizer, features)
    rows = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        token_logps, mask, log_sum_sq = completion_token_logps_and_sq_probs(
            model, *rows, temperature=0.7, packing=packing, groups=row_groups(batch))
        plain, plain_mask = completion_token_logps(model, *rows, temperature=0.7)
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=rows[0], attention_mask=rows[1], position_ids=position_ids).logits[:, :-1]
    expected = torch.log((torch.softmax(logits.double() / 0.7, -1) ** 2).sum(-1))
    assert torch.equal(mask, plain_mask)
    torch.testing.assert_close(log_sum_sq[mask].double(), expected[mask], atol=1e-5, rtol=0)
    assert (log_sum_sq[~mask] == 0).all() and expected[mask].max() - expected[mask].min() > 0.5, expected[mask]
    torch.testing.assert_close(token_logps, plain, atol=2e-5 if packing != "none" else 0, rtol=0)


def test_ld_dpo_and_wpo_get_per_token_inputs_and_other_losses_the_same_sums(setup):
    tokenizer, features = setup
    model = tiny_model(tokenizer)
    reference = frozen_copy(tiny_model(tokenizer, seed=1))
    batch = paired_batch(tokenizer, features)
    rows = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    dpo = Generator(model, loss_name="dpo", reference=reference)._paired_inputs(batch)
    ld = Generator(model, loss_name="ld_dpo", reference=reference)._paired_inputs(batch)
    wpo = Generator(model, loss_name="wpo", reference=reference)._paired_inputs(batch)
    b = batch["input_ids"].shape[0] // 2
    with torch.no_grad():
        policy_tokens, mask = completion_token_logps(model, *rows)
        reference_tokens, _ = completion_token_logps(reference, *rows)
        summed, lengths = completion_logps(model, *rows)
        _, _, log_sum_sq = completion_token_logps_and_sq_probs(model, *rows)
    for side, part in (("chosen", slice(0, b)), ("rejected", slice(b, None))):
        assert torch.equal(dpo[f"policy_{side}_logps"].detach(), summed[part])  # the path every other loss takes
        assert torch.equal(dpo[f"{side}_lengths"], lengths[part])
        for inputs in (ld, wpo):  # the same sums out of the per-token path
            assert torch.equal(inputs[f"policy_{side}_logps"].detach(), summed[part])
            assert torch.equal(inputs[f"reference_{side}_logps"], dpo[f"reference_{side}_logps"])
        assert torch.equal(ld[f"policy_{side}_token_logps"].detach(), policy_tokens[part])
        assert torch.equal(ld[f"reference_{side}_token_logps"], reference_tokens[part])
        assert torch.equal(ld[f"{side}_token_mask"], mask[part])
        assert torch.equal(wpo[f"policy_{side}_log_sum_sq_probs"], log_sum_sq[part].sum(-1))
    assert ld["policy_chosen_token_logps"].requires_grad and not ld["reference_chosen_token_logps"].requires_grad


def test_a_loss_that_needs_reference_tokens_refuses_precomputed_sums(setup, compose):
    tokenizer, features = setup
    batch = paired_batch(tokenizer, features)
    batch["reference_logps"] = torch.zeros(batch["input_ids"].shape[0])
    module = Generator(tiny_model(tokenizer), loss_name="ld_dpo", reference_mode="precomputed")
    with pytest.raises(RuntimeError, match="per-token log-probs.*precomputed"):
        module._paired_inputs(batch)
    with pytest.raises(ConfigError, match="ld_dpo.*per-token.*algo.reference=precomputed"):
        validate(compose("algo=ld_dpo", "algo.reference=precomputed"))
    validate(compose("algo=wpo", "algo.reference=precomputed"))  # WPO's extra inputs are the policy's


def test_the_config_check_binds_the_loss(compose):
    with pytest.raises(ConfigError, match=r"algo.loss: parts.sft reads sft batches"):
        validate(compose("algo=mixture", "+algo.loss.parts.sft={weight: 1.0}"))
    with pytest.raises(ConfigError, match=r"algo.loss: ld_dpo: ld_alpha=1.5 must lie in"):
        validate(compose("algo=ld_dpo", "algo.loss.ld_alpha=1.5"))
    with pytest.raises(ConfigError, match="needs reference log-probs"):
        validate(compose("algo=mixture", "algo.reference=none"))
    reference_free = compose("algo=mixture", "algo.reference=none", "~algo.loss.parts.dpo", "~algo.loss.parts.bco_pair")
    validate(reference_free)  # SFT on the chosen alone needs no reference


@pytest.mark.parametrize("overrides,match", [
    (["algo.reference_sync_steps=0"], r"algo.reference_sync_steps=0 must be an integer >= 1"),
    (["algo.reference_mixup_alpha=1.5"], r"algo.reference_mixup_alpha=1.5 must lie in \(0, 1\]"),
    (["algo.reference=lora"], r"refreshes the frozen copy.*algo.reference=lora"),
    (["algo.reference=precomputed"], r"algo.reference=precomputed: precomputed log-probs .* would go stale"),
    (["algo.name=simpo", "algo.loss={}", "algo.reference=none"], r"algo.reference=none"),
    (["algo.name=grpo", "algo.loss={}"], r"applies to the offline losses"),
])
def test_tr_dpo_settings_are_checked_before_any_work(compose, overrides, match):
    validate(compose("algo=tr_dpo"))
    with pytest.raises(ConfigError, match=match):
        validate(compose("algo=tr_dpo", *overrides))


class Snapshots(L.Callback):
    """The policy's parameters after each optimiser step (callbacks' batch-end hooks run before the module's, so
    before the module refreshes its reference)."""

    def __init__(self):
        self.policy = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.policy[trainer.global_step] = {n: p.detach().clone() for n, p in module.model.named_parameters()}


def test_tr_dpo_mixes_the_policy_into_the_reference_every_k_optimiser_steps(setup, tmp_path):
    tokenizer, features = setup
    model = tiny_model(tokenizer)
    reference = frozen_copy(model)
    start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    k, alpha = 2, 0.6
    module = Generator(model, loss_name="dpo", reference=reference, lr=1e-2, warmup_ratio=0.0,
                       reference_sync_steps=k, reference_mixup_alpha=alpha)
    snapshots = Snapshots()
    data = AlignmentDataModule(features, features[:2], "paired", tokenizer.pad_token_id, 192, batch_size=2)
    trainer = L.Trainer(max_steps=2 * k, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, accelerator="cpu", callbacks=[snapshots])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2 * k
    for name, value in reference.named_parameters():
        after_k = alpha * snapshots.policy[k][name] + (1 - alpha) * start[name]
        expected = alpha * snapshots.policy[2 * k][name] + (1 - alpha) * after_k
        torch.testing.assert_close(value.detach(), expected, atol=1e-6, rtol=1e-6)
    assert not torch.equal(snapshots.policy[k]["model.embed_tokens.weight"], start["model.embed_tokens.weight"])

    # The refreshed reference travels with the checkpoint, so a resumed run continues from it.
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    fresh = Generator(model, loss_name="dpo", reference=frozen_copy(tiny_model(tokenizer)),
                      reference_sync_steps=k, reference_mixup_alpha=alpha)
    fresh.on_load_checkpoint(checkpoint)
    assert fresh._reference_synced_at == 2 * k
    for (name, value), (_, restored) in zip(reference.named_parameters(), fresh.reference.named_parameters()):
        assert torch.equal(value, restored), name


@pytest.mark.parametrize("kwargs,match", [
    ({"reference_mode": "lora"}, r"algo.reference=lora"),
    ({"reference_mode": "precomputed"}, r"algo.reference=precomputed"),
    ({"reference_mixup_alpha": 0.0}, r"reference_mixup_alpha=0.0 must lie in"),
])
def test_the_generator_refuses_tr_dpo_without_a_frozen_reference(setup, kwargs, match):
    tokenizer, _ = setup
    model = tiny_model(tokenizer)
    with pytest.raises(ValueError, match=match):
        Generator(model, loss_name="dpo", reference=frozen_copy(model), reference_sync_steps=4, **kwargs)
