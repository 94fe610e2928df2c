"""rlmf.modules.guard.NonFiniteGuard: optimiser steps with a non-finite loss or gradient are skipped (parameters and
AdamW state untouched), counted in ``<stage>/train/skipped_steps`` (checkpointed), and ``max_bad_steps`` of them in a
row stop the run with an error naming the stage, the step and the batch; with gradient clipping (norm and value),
gradient accumulation, a resume from a checkpoint, the real generator and discriminator, and 2-process DDP."""

from __future__ import annotations

import math
import random
from datetime import timedelta

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from rlmf.modules.guard import NonFiniteGuard, NonFiniteStepError, describe_batch

NAN = float("nan")
METRIC = "toy/train/skipped_steps"


# ---------------------------------------------------------------------------------------------------- a toy model

def toy_batches(n, poison=(), kind="nan_loss", seed=0):
    """``n`` regression batches; those in ``poison`` are made non-finite in the way ``kind`` says."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        x = torch.randn(3, 4, generator=g)
        batch = {"x": x, "y": x.sum(-1), "scale": torch.tensor(1.0), "detached": torch.tensor(0.0),
                 "input_ids": torch.arange(3 * 5).view(3, 5) + 100 * i}
        if i in poison:
            if kind == "nan_loss":  # the loss (and so every gradient) is NaN
                batch["scale"] = torch.tensor(NAN)
            elif kind == "inf_input":  # an input row holds inf
                batch["x"] = x.clone()
                batch["x"][1, 2] = math.inf
            elif kind == "loss_only":  # a NaN added to the loss, gradients finite: only the loss check sees it
                batch["detached"] = torch.tensor(NAN)
            else:
                raise KeyError(kind)
        batches.append(batch)
    return batches


class Toy(L.LightningModule):
    def __init__(self, lr=0.1):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self.layer(batch["x"]).squeeze(-1), batch["y"]) * batch["scale"]
        return loss + batch["detached"]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Recorder(Logger):
    """Every logged metric, by step."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def values(self, key):
        return [m[key] for _, m in self.metrics if key in m]


class Snapshots(L.Callback):
    """Parameters, AdamW state and learning rate at the start of the fit (-1) and after every batch."""

    def __init__(self):
        self.after, self.batches = {}, 0

    @staticmethod
    def _take(trainer, module):
        optimizer = trainer.optimizers[0]
        state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                 for i, p in enumerate(module.parameters())}
        return {"params": [p.detach().clone() for p in module.parameters()], "state": state,
                "lr": optimizer.param_groups[0]["lr"]}

    def on_train_start(self, trainer, module):
        self.after[-1] = self._take(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[self.batches] = self._take(trainer, module)  # counted over epochs
        self.batches += 1


def same(a, b):
    if not all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])):
        return False
    if a["state"].keys() != b["state"].keys():
        return False
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        if sa.keys() != sb.keys() or not all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa):
            return False
    return True


def fit(tmp_path, batches, guard=True, max_bad_steps=3, callbacks=(), ckpt_path=None, module=None, **trainer_kwargs):
    module = module or Toy()
    guard = NonFiniteGuard("toy", max_bad_steps=max_bad_steps) if guard is True else guard
    snapshots, logger = Snapshots(), Recorder()
    trainer_kwargs.setdefault("max_epochs", 1)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[c for c in (guard, snapshots, *callbacks) if c], **trainer_kwargs)
    trainer.fit(module, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer, module, guard, snapshots, logger


CLIPPING = {"no_clipping": {}, "clip_norm": {"gradient_clip_val": 1.0},
            "clip_value": {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}}


# ---------------------------------------------------------------------------------------------------- the skip

@pytest.mark.parametrize("kind", ["nan_loss", "inf_input", "loss_only"])
@pytest.mark.parametrize("clipping", list(CLIPPING))
def test_a_bad_step_changes_neither_parameters_nor_optimiser_state(tmp_path, kind, clipping):
    trainer, module, guard, snap, logger = fit(tmp_path, toy_batches(6, poison={2}, kind=kind), **CLIPPING[clipping])
    assert same(snap.after[2], snap.after[1]), "the bad step moved the parameters or the AdamW state"
    for i in (1, 3, 4):  # good steps before and after it do train
        assert not same(snap.after[i], snap.after[i - 1]), i
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert guard.skipped_steps == 1 and guard.bad_streak == 0
    # Lightning still counts the step, and the scheduler still steps: the lr moves on through the bad step.
    assert trainer.global_step == 6
    assert snap.after[2]["lr"] < snap.after[1]["lr"]
    assert logger.values(METRIC) == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert trainer.gradient_clip_val == CLIPPING[clipping].get("gradient_clip_val"), "clipping restored"


@pytest.mark.parametrize("kind", ["nan_loss", "loss_only"])
@pytest.mark.parametrize("poisoned", [2, 3], ids=["first_micro_batch", "second_micro_batch"])
def test_accumulation_skips_the_whole_window(tmp_path, kind, poisoned):
    """Micro-batches 2 and 3 make one optimiser step: a NaN in either skips it; the steps around it train."""
    trainer, module, guard, snap, logger = fit(tmp_path, toy_batches(8, poison={poisoned}, kind=kind),
                                               accumulate_grad_batches=2, gradient_clip_val=1.0)
    assert trainer.global_step == 4
    assert same(snap.after[3], snap.after[1]), "the window with the bad micro-batch moved the parameters"
    assert not same(snap.after[1], snap.after[-1]) and not same(snap.after[5], snap.after[3])
    assert guard.skipped_steps == 1
    assert logger.values(METRIC) == [0.0, 1.0, 1.0, 1.0]


def test_without_the_guard_the_same_batch_poisons_the_model(tmp_path):
    """The control: what the guard prevents (NaN parameters from one bad batch, even with clipping)."""
    _, module, *_ = fit(tmp_path, toy_batches(4, poison={1}), guard=None, gradient_clip_val=1.0)
    assert not all(torch.isfinite(p).all() for p in module.parameters())


def test_isolated_bad_steps_are_skipped_and_training_goes_on(tmp_path):
    batches = toy_batches(12, poison={1, 3, 4, 7, 9, 10})  # never 3 in a row
    trainer, module, guard, snap, logger = fit(tmp_path, batches, max_bad_steps=3)
    assert trainer.global_step == 12 and guard.skipped_steps == 6
    assert logger.values(METRIC)[-1] == 6.0 and trainer.callback_metrics[METRIC] == 6.0
    for i in range(12):
        assert same(snap.after[i], snap.after[i - 1]) == (i in {1, 3, 4, 7, 9, 10}), i


# ---------------------------------------------------------------------------------------------------- the stop

@pytest.mark.parametrize("accumulate", [1, 2])
def test_consecutive_bad_steps_stop_the_run_naming_stage_step_and_batch(tmp_path, accumulate):
    poison = {2, 3, 4} if accumulate == 1 else {4, 6, 9}  # bad steps 2, 3, 4 either way
    batches = toy_batches(12, poison=poison)
    snap = Snapshots()
    with pytest.raises(NonFiniteStepError) as info:
        fit(tmp_path, batches, max_bad_steps=3, callbacks=[snap], accumulate_grad_batches=accumulate,
            gradient_clip_val=1.0)
    assert isinstance(info.value, FloatingPointError)
    message = str(info.value)
    last = 4 if accumulate == 1 else 9
    assert "stage 'toy'" in message and "3 consecutive" in message and "max_bad_steps=3" in message
    assert "stopped at global step 4" in message
    assert f"batch_idx={last} (non-finite loss)" in message
    assert f"input_ids=[3, 5] int64 row0[:8]={list(range(100 * last, 100 * last + 5))}" in message
    assert "global step 2" in message and "global step 3" in message  # the earlier bad steps of the streak
    assert "x=[3, 4] float32" in message
    # Nothing after the last good step was applied, the raising step included.
    good = 1 if accumulate == 1 else 3
    assert same(snap.after[last - 1], snap.after[good])


def test_a_good_step_resets_the_streak(tmp_path):
    trainer, _, guard, _, _ = fit(tmp_path, toy_batches(8, poison={1, 2, 4, 5}), max_bad_steps=3)
    assert trainer.global_step == 8 and guard.skipped_steps == 4


@pytest.mark.parametrize("max_bad_steps", [0, 1])
def test_zero_or_one_bad_steps_fail_at_the_first(tmp_path, max_bad_steps):
    with pytest.raises(NonFiniteStepError, match=r"stage 'toy': 1 consecutive .*global step 3"):
        fit(tmp_path, toy_batches(6, poison={3}, kind="inf_input"), max_bad_steps=max_bad_steps)


def test_inf_in_the_inputs_is_named(tmp_path):
    with pytest.raises(NonFiniteStepError, match=r"x=\[3, 4\] float32 \(holds NaN/inf\)"):
        fit(tmp_path, toy_batches(4, poison={0}, kind="inf_input"), max_bad_steps=1)


def test_max_bad_steps_must_be_a_non_negative_integer():
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_bad_steps"):
            NonFiniteGuard("toy", max_bad_steps=bad)


def test_describe_batch_walks_nested_batches():
    batch = {"chosen": {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)},
             "desirable": torch.tensor([1.0, NAN]), "prompt": ["hello there", "b"]}
    text = describe_batch(batch)
    assert "chosen.input_ids=[1, 3] int64 row0[:8]=[5, 6, 7] crc32=" in text
    assert "chosen.attention_mask=[1, 3] int64" in text and "desirable=[2] float32 (holds NaN/inf)" in text
    assert "prompt=[2 str] first 'hello there'" in text


# ---------------------------------------------------------------------------------------------------- checkpoints

def test_the_count_survives_a_resume(tmp_path):
    """Epoch 0 skips batch 1; the run resumes from its checkpoint and epoch 1 skips batch 1 again: 2 in all."""
    batches = toy_batches(4, poison={1})
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0,
                                                     every_n_train_steps=4)
    first, *_ = fit(tmp_path, batches, callbacks=[checkpoint], max_epochs=1)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert state[NonFiniteGuard("toy").state_key]["skipped_steps"] == 1
    assert "stage" in NonFiniteGuard("toy").state_key
    assert NonFiniteGuard("x").state_key != NonFiniteGuard("toy").state_key
    guard = NonFiniteGuard("toy", max_bad_steps=3)
    trainer, _, guard, _, logger = fit(tmp_path, batches, guard=guard, max_epochs=2,
                                       ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 8
    assert guard.skipped_steps == 2 and logger.values(METRIC) == [1.0, 2.0, 2.0, 2.0]


def test_the_streak_survives_a_resume():
    guard = NonFiniteGuard("toy", max_bad_steps=3)
    guard.skipped_steps, guard.bad_streak, guard.streak_descriptions = 7, 2, ["a", "b"]
    restored = NonFiniteGuard("toy", max_bad_steps=3)
    restored.load_state_dict(guard.state_dict())
    assert (restored.skipped_steps, restored.bad_streak, restored.streak_descriptions) == (7, 2, ["a", "b"])


# ---------------------------------------------------------------------------------------------------- real modules

class PoisonEmbeddings(L.Callback):
    """Makes the input embeddings' output NaN for the batches in ``poison``: the NaN flows through the whole model,
    the log-prob kernels and the loss."""

    def __init__(self, embeddings, poison):
        self.poison, self.active = set(poison), False
        embeddings.register_forward_hook(lambda mod, args, out: out * NAN if self.active else out)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.active = batch_idx in self.poison

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.active = False


@pytest.fixture(scope="module")
def generator_data():
    from rlmf.data import PreferencePair, tokenize_pairs
    from rlmf.models import train_tokenizer
    from rlmf.tasks.persona_email import build_world, compose_email, corpus_texts

    world = build_world(seed=0, num_prospects=40)
    tokenizer = train_tokenizer(corpus_texts(world), vocab_size=300)
    rng = random.Random(0)
    pairs = [PreferencePair(b.prompt, compose_email(b, rng, 1.0), compose_email(b, rng, 0.0)) for b in world.train[:12]]
    return tokenizer, tokenize_pairs(pairs, tokenizer, 192, 96)[0]


def _generator(tokenizer):
    from rlmf.models import build_tiny_generator
    from rlmf.modules.generator import Generator
    from rlmf.reference import prepare_reference

    model = build_tiny_generator(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=320, seed=0)
    policy, reference = prepare_reference("frozen", model)
    return Generator(policy, loss_name="dpo", reference=reference, pad_token_id=tokenizer.pad_token_id,
                     metric_prefix="align", lr=1e-2)


def _fit_generator(tmp_path, tokenizer, features, poison, max_bad_steps):
    from rlmf.data.alignment import AlignmentDataModule

    module = _generator(tokenizer)
    snapshots, logger = Snapshots(), Recorder()
    guard = NonFiniteGuard("align", max_bad_steps=max_bad_steps)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, max_steps=3, accumulate_grad_batches=2, gradient_clip_val=1.0,
                        callbacks=[guard, snapshots, PoisonEmbeddings(module.model.get_input_embeddings(), poison)])
    data = AlignmentDataModule(features, features[:2], "paired", tokenizer.pad_token_id, 192, batch_size=2)
    return trainer, module, guard, snapshots, logger, (lambda: trainer.fit(module, datamodule=data))


def test_generator_skips_a_nan_window_and_stops_on_a_nan_streak(generator_data, tmp_path):
    tokenizer, features = generator_data
    # 5 micro-batches of 2 pairs: optimiser steps (0, 1), (2, 3), (4). Micro-batch 3 (second of step 1) is NaN:
    # that step is skipped, steps 0 and 2 train.
    trainer, module, guard, snap, logger, run = _fit_generator(tmp_path, tokenizer, features, {3}, max_bad_steps=2)
    run()
    assert trainer.global_step == 3 and guard.skipped_steps == 1 and len(snap.after) == 6
    assert same(snap.after[3], snap.after[1])
    assert not same(snap.after[1], snap.after[-1]) and not same(snap.after[4], snap.after[3])
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert logger.values("align/train/skipped_steps") == [0.0, 1.0, 1.0]
    # Steps 1 and 2 both NaN: the second raises, naming the stage, the step and the batch's rows.
    trainer, module, guard, snap, logger, run = _fit_generator(tmp_path, tokenizer, features, {2, 4},
                                                                max_bad_steps=2)
    with pytest.raises(NonFiniteStepError) as info:
        run()
    message = str(info.value)
    assert "stage 'align': 2 consecutive" in message and "stopped at global step 2" in message
    assert "batch_idx=4 (non-finite loss): input_ids=[4, " in message and "row0[:8]=[" in message
    assert "batch_idx=2 (non-finite loss)" in message
    assert same(snap.after[3], snap.after[1])


def test_discriminator_skips_a_nan_step(tmp_path):
    from rlmf.modules.discriminator import Discriminator

    module = Discriminator(backbone="tiny", max_length=32, lr=1e-3, warmup_ratio=0.0)
    pairs = [{"prompt": f"write to {n}", "chosen": f"thanks {n}, see you", "rejected": f"{n} no"}
             for n in "alice bob carol dave erin frank".split()]
    loader = DataLoader(pairs, batch_size=2, collate_fn=module.training_collator())
    poison = PoisonEmbeddings(module.model.get_input_embeddings(), {1})
    guard, snapshots, logger = NonFiniteGuard("discriminator", max_bad_steps=2), Snapshots(), Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        max_epochs=1, gradient_clip_val=1.0, callbacks=[guard, snapshots, poison])
    trainer.fit(module, loader)
    assert trainer.global_step == 3 and guard.skipped_steps == 1
    assert same(snapshots.after[1], snapshots.after[0]) and not same(snapshots.after[2], snapshots.after[1])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert logger.values("discriminator/train/skipped_steps") == [0.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------------- DDP

class RankPoisoned(Toy):
    """Batch ``i`` is poisoned on rank 1 only (``kind`` per batch index), so the ranks see different things."""

    def __init__(self, poison, out_dir):
        super().__init__()
        self.poison, self.out_dir = poison, out_dir

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        kind = self.poison.get(batch_idx) if self.global_rank == 1 else None
        if kind == "nan_loss":
            loss = loss * NAN
        elif kind == "loss_only":
            loss = loss + NAN
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        torch.save([p.detach().clone() for p in self.parameters()],
                   f"{self.out_dir}/rank{self.global_rank}_batch{batch_idx}.pt")


def test_ddp_ranks_take_the_same_decision(tmp_path):
    """On rank 1 only: a NaN loss at step 1 (gradients NaN after the all-reduce) and a NaN added to the loss at step 3
    (gradients finite: only the all-reduced decision makes rank 0 skip). Both ranks skip both steps and stay
    identical; step 4 (NaN again, 2 in a row) stops both ranks at the same step, without a hang."""
    from lightning.pytorch.strategies import DDPStrategy

    # The distributed sampler gives each rank every other batch: batch_idx 0..5 on each rank.
    module = RankPoisoned({1: "nan_loss", 3: "loss_only", 4: "nan_loss"}, str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", devices=2,
                        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, max_epochs=1,
                        gradient_clip_val=1.0, callbacks=[NonFiniteGuard("toy", max_bad_steps=2)])
    with pytest.raises(Exception, match="stage 'toy': 2 consecutive .* stopped at global step 4"):
        trainer.fit(module, DataLoader(toy_batches(12), batch_size=None))

    def params(rank, i):
        return torch.load(tmp_path / f"rank{rank}_batch{i}.pt")

    def equal(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    assert not (tmp_path / "rank0_batch4.pt").exists() and not (tmp_path / "rank1_batch4.pt").exists()
    for i in range(4):
        assert equal(params(0, i), params(1, i)), f"ranks diverged at batch {i}"
    for i in (1, 3):
        assert equal(params(0, i), params(0, i - 1)), f"step {i} was not skipped"
    assert not equal(params(0, 2), params(0, 1)) and not equal(params(0, 0), [p.detach() for p in Toy().parameters()])
    assert all(torch.isfinite(p).all() for p in params(0, 3))


# ---------------------------------------------------------------------------------------------------- precision

class GradOverflow(Toy):
    """Gradients (not the loss) overflow to inf at the batches in ``overflow``, as fp16 gradients do."""

    def __init__(self, overflow):
        super().__init__()
        self.overflow = set(overflow)

    def on_after_backward(self):
        if self.batch_idx_now in self.overflow:
            self.layer.weight.grad.fill_(math.inf)

    def on_train_batch_start(self, batch, batch_idx):
        self.batch_idx_now = batch_idx


def test_fp16_scaler_overflow_is_counted_but_not_a_streak(tmp_path):
    """With a GradScaler (16-mixed), overflowing gradients are the scaler's business: it skips those steps (the
    guard counts them) and they never stop the run; a NaN loss still counts towards max_bad_steps."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def fp16():  # Lightning turns precision="16-mixed" into bf16 on a CPU; the plugin itself runs there
        return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))]

    module = GradOverflow(overflow={1, 2, 3, 4})
    trainer, module, guard, snap, logger = fit(tmp_path, toy_batches(8), module=module, max_bad_steps=2,
                                               plugins=fp16(), gradient_clip_val=1.0)
    assert trainer.precision_plugin.scaler is not None
    assert guard.skipped_steps == 4 and guard.bad_streak == 0
    assert all(same(snap.after[i], snap.after[i - 1]) for i in (1, 2, 3, 4))
    assert not same(snap.after[5], snap.after[4])
    assert logger.values(METRIC) == [0.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0]
    with pytest.raises(NonFiniteStepError, match="2 consecutive"):
        fit(tmp_path, toy_batches(8, poison={2, 3}), max_bad_steps=2, plugins=fp16())


def test_bf16_mixed_skips_like_float32(tmp_path):
    trainer, module, guard, snap, logger = fit(tmp_path, toy_batches(6, poison={2}), precision="bf16-mixed",
                                               gradient_clip_val=1.0)
    assert same(snap.after[2], snap.after[1]) and not same(snap.after[3], snap.after[2])
    assert guard.skipped_steps == 1 and all(torch.isfinite(p).all() for p in module.parameters())


class FusedAdamW(Toy):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=True)


class FusedGradOverflow(GradOverflow):
    configure_optimizers = FusedAdamW.configure_optimizers


@pytest.mark.parametrize("module", [FusedAdamW, GradOverflow, FusedGradOverflow])
def test_fp16_scaler_with_a_fused_optimizer(tmp_path, module):
    """A fused AdamW unscales inside its step, after on_before_optimizer_step: a skipped step must still leave the
    scaler an inf check (with no gradient at all, GradScaler.update fails)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = module(overflow={4}) if issubclass(module, GradOverflow) else module()
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))]
    trainer, module, guard, snap, logger = fit(tmp_path, toy_batches(6, poison={2}, kind="loss_only"),
                                               module=module, plugins=plugins, max_bad_steps=2)
    assert guard.skipped_steps == (2 if 4 in getattr(module, "overflow", ()) else 1)
    assert [same(snap.after[i], snap.after[i - 1]) for i in range(6)] == [
        False, False, True, False, 4 in getattr(module, "overflow", ()), False]
