"""How the generator trains: each metric is logged once per step, and the learning-rate schedule spans the whole
fit whether it is bounded by steps or by epochs, with gradient accumulation."""

import random
from collections import Counter

import lightning as L
import pytest

from rlmf.data import FeedbackExample, PreferencePair, tokenize_feedback, tokenize_pairs
from rlmf.data.alignment import AlignmentDataModule, with_mismatched_completions
from rlmf.models import build_tiny_generator, train_tokenizer
from rlmf.modules.generator import Generator
from rlmf.reference import prepare_reference
from rlmf.tasks.persona_email import build_world, compose_email, corpus_texts


@pytest.fixture(scope="module")
def data():
    world = build_world(seed=0, num_prospects=40)
    tokenizer = train_tokenizer(corpus_texts(world), vocab_size=300)
    rng = random.Random(0)
    pairs = [PreferencePair(b.prompt, compose_email(b, rng, 1.0), compose_email(b, rng, 0.0)) for b in world.train[:12]]
    thumbs = [FeedbackExample(p.prompt, c, d) for p in pairs for c, d in ((p.chosen, True), (p.rejected, False))]
    return tokenizer, pairs, thumbs


def _module(tokenizer, name, **kwargs):
    model = build_tiny_generator(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=320, seed=0)
    policy, reference = prepare_reference("frozen" if name != "sft" else "none", model)
    return Generator(policy, loss_name=name, reference=reference, pad_token_id=tokenizer.pad_token_id, **kwargs)


def _trainer(tmp_path, **kwargs):
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, limit_val_batches=0, accelerator="cpu", **kwargs)


@pytest.mark.parametrize("name", ["dpo", "kto", "sft"])
def test_no_metric_is_logged_twice_in_a_step(data, name, tmp_path, monkeypatch):
    tokenizer, pairs, thumbs = data
    if name == "dpo":
        features, fmt = tokenize_pairs(pairs, tokenizer, 192, 96)[0], "paired"
    else:
        features, fmt = with_mismatched_completions(tokenize_feedback(thumbs, tokenizer, 192, 96)[0], 192), "unpaired"
    module = _module(tokenizer, name)
    logged = []
    original = module.log
    monkeypatch.setattr(module, "log", lambda key, *a, **k: (logged.append(key), original(key, *a, **k)))
    _trainer(tmp_path, max_steps=1).fit(module, datamodule=AlignmentDataModule(
        features, features[:2], fmt, tokenizer.pad_token_id, 192, batch_size=4))
    repeated = [key for key, count in Counter(logged).items() if count > 1]
    assert logged and not repeated, repeated
    if name == "dpo":  # TRL's names for the summed log-probs, ours for the per-token means
        assert {"generator/train/logps/chosen", "generator/train/logps_per_token/chosen"} <= set(logged)


def test_schedule_spans_an_epoch_bounded_fit_with_accumulation(data, tmp_path):
    """max_steps=-1 used to make the cosine schedule one step long: the lr was 0 from the second step on."""
    tokenizer, pairs, _ = data
    features = tokenize_pairs(pairs, tokenizer, 192, 96)[0]
    module = _module(tokenizer, "dpo", lr=1e-3, warmup_ratio=0.0)
    lrs = []

    class Lr(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    datamodule = AlignmentDataModule(features, features[:2], "paired", tokenizer.pad_token_id, 192, batch_size=2)
    trainer = _trainer(tmp_path, max_steps=-1, max_epochs=2, accumulate_grad_batches=2, callbacks=[Lr()])
    trainer.fit(module, datamodule=datamodule)
    batches = datamodule.batches_per_epoch()
    assert trainer.global_step == 2 * -(-batches // 2), "one optimiser step per 2 micro-batches, 2 epochs"
    assert len(lrs) == 2 * batches
    assert lrs[0] == pytest.approx(1e-3) and all(lr > 0 for lr in lrs), lrs
    assert lrs[-1] < lrs[len(lrs) // 2] < lrs[0], "cosine decay over the whole fit"
