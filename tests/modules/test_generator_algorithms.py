"""Every registered preference algorithm trains one step on a tiny generator with finite loss and gradients;
reference log-probs agree whichever way they are obtained (frozen copy, disk cache, LoRA with the adapter off)."""

import math
import random

import lightning as L
import pytest
import torch

from rlmf.data import FeedbackExample, PreferencePair, tokenize_feedback, tokenize_pairs
from rlmf.data.alignment import AlignmentDataModule, with_mismatched_completions
from rlmf.losses import LOSSES, bind_loss, loss_inputs
from rlmf.models import build_tiny_generator, train_tokenizer
from rlmf.logprobs import completion_logps
from rlmf.modules.generator import Generator
from rlmf.reference import attach_precomputed, compute_reference_logps, frozen_copy, prepare_reference
from rlmf.tasks.persona_email import build_world, compose_email, corpus_texts

# The offline formats only: online losses (grpo, rloo) train through rlmf.modules.online (tests/modules/test_online.py).
PREFERENCE_LOSSES = sorted(name for name, fn in LOSSES.items() if fn.data_format not in ("sft", "online"))


@pytest.fixture(scope="module")
def setup():
    world = build_world(seed=0, num_prospects=40)
    tokenizer = train_tokenizer(corpus_texts(world), vocab_size=300)
    rng = random.Random(0)
    pairs = [PreferencePair(b.prompt, compose_email(b, rng, 1.0), compose_email(b, rng, 0.0)) for b in world.train[:8]]
    thumbs = [FeedbackExample(p.prompt, c, d) for p in pairs for c, d in ((p.chosen, True), (p.rejected, False))]
    return world, tokenizer, pairs, thumbs


def tiny_model(tokenizer, seed=0):
    return build_tiny_generator(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                max_position_embeddings=320, seed=seed)


class GradientCheck(L.Callback):
    def __init__(self):
        self.checked = False

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad for p in module.model.parameters() if p.requires_grad and p.grad is not None]
        assert grads, "no parameter received a gradient"
        assert all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        self.checked = True


REFERENCE_MODES = ("frozen", "precomputed", "lora")
# A loss that needs the reference's per-token log-probs (LD-DPO) cannot use a cache of sums: the config refuses
# precomputed for it (tests/modules/test_generator_token_losses.py).
ALGORITHM_MODES = [(name, mode) for name in PREFERENCE_LOSSES
                   for mode in (REFERENCE_MODES if LOSSES[name].requires_reference else ("none",))
                   if not (mode == "precomputed" and bind_loss(name).reference_per_token)]


@pytest.mark.parametrize("name,mode", ALGORITHM_MODES)
def test_one_training_step_for_every_algorithm_and_reference_mode(setup, name, mode, tmp_path):
    """Every loss with every reference mode it allows, prepared the way the align stage prepares it."""
    _, tokenizer, pairs, thumbs = setup
    fn = LOSSES[name]
    if fn.data_format == "unpaired":
        features, _ = tokenize_feedback(thumbs, tokenizer, 192, 96)
        if "policy_kl_logps" in loss_inputs(name):
            features = with_mismatched_completions(features, 192)
    else:
        features, _ = tokenize_pairs(pairs, tokenizer, 192, 96)
    model = tiny_model(tokenizer)
    if mode == "precomputed":
        model.save_pretrained(tmp_path / "model")
        attach_precomputed(model, tmp_path / "model", {"train": features},
                           "paired" if fn.data_format == "paired_online" else fn.data_format,
                           tokenizer.pad_token_id, tmp_path / "cache")
    policy, reference = prepare_reference(mode, model, lora_rank=4, data_format=fn.data_format)
    module = Generator(policy, loss_name=name, reference=reference, reference_mode=mode, online_samples=2,
                       max_new_tokens=8, stop_token_ids=[tokenizer.eos_token_id],
                       pad_token_id=tokenizer.pad_token_id, lr=1e-3)
    data = AlignmentDataModule(features, features[:2], fn.data_format, tokenizer.pad_token_id, 192, batch_size=4)
    check = GradientCheck()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[check], default_root_dir=tmp_path,
                        limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, datamodule=data)
    assert check.checked
    loss = trainer.callback_metrics["generator/train/loss"]
    assert math.isfinite(float(loss))
    if fn.requires_reference and fn.data_format != "unpaired":  # a mixture's are under its parts' names
        assert any(k.startswith("generator/train/") and k.endswith("rewards/margins") for k in trainer.callback_metrics)


def test_precomputed_kto_reference_equals_the_frozen_one(setup, tmp_path):
    """KTO's mismatched (KL) rows are fixed per feature, so their reference log-probs can be cached too."""
    _, tokenizer, _, thumbs = setup
    features = with_mismatched_completions(tokenize_feedback(thumbs, tokenizer, 192, 96)[0], 192)
    assert all(f["kl_completion_ids"] != f["completion_ids"] for f in features)
    model = tiny_model(tokenizer)
    model.save_pretrained(tmp_path / "model")
    attach_precomputed(model, tmp_path / "model", {"train": features}, "unpaired", tokenizer.pad_token_id,
                       tmp_path / "cache")
    module = Generator(model, loss_name="kto", reference=frozen_copy(model))
    batch = AlignmentDataModule(features, features, "unpaired", tokenizer.pad_token_id, 192, 4).collate(features)
    cached = module.reference_logps(batch, "kl_")
    live = Generator(model, loss_name="kto", reference=frozen_copy(model)).reference_logps(
        {k: v for k, v in batch.items() if not k.startswith("reference_")}, "kl_")
    assert torch.allclose(cached, live, atol=1e-5)


def test_frozen_reference_matches_the_starting_policy_after_training(setup):
    _, tokenizer, pairs, _ = setup
    features, _ = tokenize_pairs(pairs, tokenizer, 192, 96)
    model = tiny_model(tokenizer)
    before = compute_reference_logps(model, features, "paired", tokenizer.pad_token_id)
    policy, reference = prepare_reference("frozen", model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    assert compute_reference_logps(reference, features, "paired", tokenizer.pad_token_id) == before
    assert compute_reference_logps(policy, features, "paired", tokenizer.pad_token_id) != before


def test_precomputed_reference_is_cached_and_identical(setup, tmp_path):
    _, tokenizer, pairs, _ = setup
    model = tiny_model(tokenizer)
    model.save_pretrained(tmp_path / "model")
    first = {"train": tokenize_pairs(pairs, tokenizer, 192, 96)[0]}
    path, hit = attach_precomputed(model, tmp_path / "model", first, "paired", tokenizer.pad_token_id,
                                   tmp_path / "cache")
    assert not hit and path.exists()
    second = {"train": tokenize_pairs(pairs, tokenizer, 192, 96)[0]}
    other_model = tiny_model(tokenizer, seed=1)  # a cache hit must not call the model at all
    path2, hit2 = attach_precomputed(other_model, tmp_path / "model", second, "paired", tokenizer.pad_token_id,
                                     tmp_path / "cache")
    assert hit2 and path2 == path
    assert [f["reference_logps"] for f in second["train"]] == [f["reference_logps"] for f in first["train"]]
    direct = compute_reference_logps(model, second["train"], "paired", tokenizer.pad_token_id)
    assert [f["reference_logps"] for f in second["train"]] == direct
    # Another dataset is another cache entry.
    third = {"train": tokenize_pairs(pairs[:3], tokenizer, 192, 96)[0]}
    _, hit3 = attach_precomputed(model, tmp_path / "model", third, "paired", tokenizer.pad_token_id,
                                 tmp_path / "cache")
    assert not hit3


def test_lora_reference_equals_the_base_model(setup, tmp_path):
    _, tokenizer, pairs, _ = setup
    features, _ = tokenize_pairs(pairs, tokenizer, 192, 96)
    base = tiny_model(tokenizer)
    expected = compute_reference_logps(base, features, "paired", tokenizer.pad_token_id)
    policy, reference = prepare_reference("lora", frozen_copy(base).requires_grad_(True), lora_rank=4)
    assert reference is None
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    module = Generator(policy, loss_name="dpo", reference_mode="lora", lr=5e-2)
    data = AlignmentDataModule(features, features[:2], "paired", tokenizer.pad_token_id, 192, batch_size=4)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    batch = data.collate(features)
    with torch.no_grad():
        trained = completion_logps(policy, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
    reference_logps = module.reference_logps(batch)
    half = len(features)
    got = torch.cat([reference_logps[:half], reference_logps[half:]])
    want = torch.tensor([c for c, _ in expected] + [r for _, r in expected])
    assert torch.allclose(got, want, atol=1e-4), "adapter disabled must give the base model"
    assert not torch.allclose(trained, reference_logps), "the adapter did not train"


def test_checkpoints_hold_the_policy_not_the_frozen_reference(setup, tmp_path):
    _, tokenizer, pairs, _ = setup
    features, _ = tokenize_pairs(pairs, tokenizer, 192, 96)
    policy, reference = prepare_reference("frozen", tiny_model(tokenizer))
    module = Generator(policy, loss_name="dpo", reference=reference, lr=1e-2)
    data = AlignmentDataModule(features, features[:2], "paired", tokenizer.pad_token_id, 192, batch_size=4)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and all(k.startswith("model.") for k in state)
    # Resuming loads that checkpoint (no reference keys in it) and continues from step 2.
    fresh_policy, fresh_reference = prepare_reference("frozen", tiny_model(tokenizer))
    resumed = Generator(fresh_policy, loss_name="dpo", reference=fresh_reference, lr=1e-2)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(resumed, datamodule=data, ckpt_path=path)
    assert trainer.global_step == 3
