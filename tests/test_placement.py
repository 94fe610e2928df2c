"""One placement path: every model that samples, scores, precomputes or evaluates runs where and how the config says.

On this CPU-only machine the device is always the CPU, so these tests make the placement observable through what
does change here: the weights' dtype (``trainer.precision=bf16-true``, ``generator.torch_dtype``), the autocast
dtype and train/eval mode. tests/gpu/ runs the same pipeline on CUDA and checks the device.
"""

import lightning as L
import pytest
import torch

import rlmf.logprobs
import rlmf.run
import rlmf.stages.evaluate
from rlmf.models import load_generator
from rlmf.modules.discriminator import Discriminator
from rlmf.placement import Placement, resolve_device
from rlmf.train import run_job


def test_placement_follows_precision_and_dtype(compose):
    cpu = torch.device("cpu")
    assert Placement.from_config(compose("trainer.accelerator=cpu")) == Placement(cpu, torch.float32, None)
    assert Placement.from_config(compose("trainer.accelerator=cpu", "trainer.precision=bf16-mixed")) == Placement(
        cpu, torch.float32, torch.bfloat16)
    assert Placement.from_config(compose("trainer.accelerator=cpu", "trainer.precision=bf16-true")) == Placement(
        cpu, torch.bfloat16, None)
    assert Placement.from_config(compose("trainer.accelerator=cpu", "generator.torch_dtype=float16")).dtype == \
        torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_a_gpu_without_one_fails_clearly():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("gpu")


def test_every_model_outside_fit_goes_through_the_placement(compose, tmp_path, monkeypatch):
    """The quick pipeline in bf16-true: every model that samples, scores, precomputes reference log-probs or
    estimates the KL is in bfloat16 (the run's precision) on the run's device, in eval mode."""
    seen = []

    def record(what, model):
        parameter = next(model.parameters())
        seen.append((what, parameter.device, parameter.dtype, model.training))

    generate, batched, score = rlmf.run.generate, rlmf.stages.evaluate.batched_completion_logps, Discriminator.score

    def spy_generate(model, *args, **kwargs):
        record("generate", model)
        return generate(model, *args, **kwargs)

    def spy_batched(model, *args, **kwargs):
        record("logps", model)
        return batched(model, *args, **kwargs)

    def spy_score(self, *args, **kwargs):
        record("score", self)
        return score(self, *args, **kwargs)

    monkeypatch.setattr(rlmf.run, "generate", spy_generate)
    monkeypatch.setattr(rlmf.stages.evaluate, "batched_completion_logps", spy_batched)
    monkeypatch.setattr(Discriminator, "score", spy_score)
    cfg = compose("experiment=quick", "trainer.precision=bf16-true", "algo.reference=precomputed",
                  f"algo.reference_cache_dir={tmp_path / 'cache'}")
    summary = run_job(cfg, tmp_path / "run")
    placement = Placement.from_config(cfg)
    assert {what for what, *_ in seen} == {"generate", "logps", "score"}
    assert all(device == placement.device and dtype == torch.bfloat16 and not training
               for _, device, dtype, training in seen), seen
    assert all(torch.isfinite(torch.tensor(v)) for k, v in summary.items() if k.startswith(("gold/", "kl/")))


def test_a_checkpoint_loaded_in_eval_mode_trains_in_train_mode(tiny_checkpoint, tmp_path):
    from rlmf.data import PreferencePair, tokenize_pairs
    from rlmf.data.alignment import AlignmentDataModule
    from rlmf.modules.generator import Generator
    from rlmf.reference import prepare_reference

    model, tokenizer = load_generator(tiny_checkpoint("llama"))
    assert not model.training, "from_pretrained hands models back in eval mode"
    pairs = [PreferencePair(f"Brief {i}:", f" a good email {i}", f" spam spam {i}") for i in range(8)]
    features, _ = tokenize_pairs(pairs, tokenizer, 64, 32)
    policy, reference = prepare_reference("frozen", model)
    modes = []

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            modes.append((all(m.training for m in module.model.modules()), module.reference.training))

    module = Generator(policy, loss_name="dpo", reference=reference, lr=1e-3)
    data = AlignmentDataModule(features, features[:2], "paired", tokenizer.pad_token_id, 64, batch_size=4)
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Modes()], default_root_dir=tmp_path, limit_val_batches=0,
              accelerator="cpu").fit(module, datamodule=data)
    assert modes == [(True, False), (True, False)], "policy in train mode, frozen reference in eval mode"


def test_load_options_reach_the_model(tiny_checkpoint):
    model, _ = load_generator(tiny_checkpoint("llama"), torch_dtype="bfloat16", attn_implementation="eager",
                              gradient_checkpointing=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_gradient_checkpointing_gives_the_same_gradients(tiny_checkpoint):
    grads = []
    for checkpointing in (False, True):
        model, tokenizer = load_generator(tiny_checkpoint("qwen2"), gradient_checkpointing=checkpointing)
        model.train()
        ids = torch.tensor([[3, 17, 29, 41, 52, 60, 71, 88]])
        labels = ids.clone()
        labels[:, :3] = -100
        logps, _ = rlmf.logprobs.completion_logps(model, ids, torch.ones_like(ids), labels)
        logps.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
