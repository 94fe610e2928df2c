"""The quick pipeline (``experiment=quick``: sft -> feedback -> discriminator -> align -> evaluate) on the GPU.

Every model used outside ``trainer.fit`` goes through :mod:`rlmf.placement`; spies on the three places models are
used for inference (``rlmf.run.generate`` for sampling and greedy decoding,
``rlmf.stages.evaluate.batched_completion_logps`` for the evaluation KL, ``Discriminator.score`` for ranking, accuracy and
rewards) record where each model's parameters are, in which dtype, and the autocast state around the call; the
trainers the stages build are kept to check where Lightning trained. Default precision ``auto`` is ``bf16-mixed``
on a GPU with bf16 (float32 weights, bf16 autocast around inference); ``bf16-true`` puts bfloat16 weights
everywhere, without autocast.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

from rlmf.placement import Placement, resolve_precision
from rlmf.train import run_job


# The GPU samples other emails than the CPU (its own RNG streams), so the feedback stage sees other replies. At
# quick's sizes (16 briefs x 2 emails, ~10% reply rate) a run that draws no replied-vs-ignored pair at all, which
# stops the pipeline by design, has a few percent chance; 32 briefs x 4 emails make it ~1e-4, for a second of
# sampling.
FEEDBACK = ("task.feedback_prompts=32", "task.feedback_samples_per_prompt=4")


def _state(model, device_type: str) -> Dict[str, Any]:
    params = list(model.parameters())
    enabled = torch.is_autocast_enabled(device_type)
    return {"devices": {p.device.type for p in params},
            "dtypes": {p.dtype for p in params if p.is_floating_point()},
            "autocast": torch.get_autocast_dtype(device_type) if enabled else None,
            "grad": torch.is_grad_enabled()}


def run_spied(compose, run_dir, monkeypatch, device_type: str, *overrides: str):
    """``run_job`` of ``experiment=quick`` (+ :data:`FEEDBACK`) + ``overrides`` with the spies on.

    Returns ``(summary, records, trainers, cfg)``: the job's summary, each spy's calls, the stages' trainers.
    """
    import rlmf.reference
    import rlmf.run
    import rlmf.stages.evaluate
    import rlmf.trainer
    from rlmf.modules.discriminator import Discriminator

    records: Dict[str, List[Dict[str, Any]]] = {"generate": [], "logps": [], "score": []}
    trainers = []

    real_generate = rlmf.run.generate

    def generate(model, *args, **kwargs):
        records["generate"].append(_state(model, device_type))
        return real_generate(model, *args, **kwargs)

    real_logps = rlmf.stages.evaluate.batched_completion_logps

    def batched_completion_logps(model, *args, **kwargs):
        records["logps"].append(_state(model, device_type))
        return real_logps(model, *args, **kwargs)

    real_score = Discriminator.score

    def score(self, *args, **kwargs):
        records["score"].append(_state(self, device_type))
        return real_score(self, *args, **kwargs)

    real_make_trainer = rlmf.trainer.make_trainer

    def make_trainer(*args, **kwargs):
        trainers.append(real_make_trainer(*args, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(rlmf.run, "generate", generate)
    monkeypatch.setattr(rlmf.stages.evaluate, "batched_completion_logps", batched_completion_logps)
    monkeypatch.setattr(rlmf.reference, "batched_completion_logps", batched_completion_logps)
    monkeypatch.setattr(Discriminator, "score", score)
    monkeypatch.setattr(rlmf.trainer, "make_trainer", make_trainer)

    cfg = compose("experiment=quick", *FEEDBACK, *overrides)
    summary = run_job(cfg, run_dir)
    return summary, records, trainers, cfg


def check_run(summary, records, trainers, cfg, device_type: str, weights_dtype, autocast_dtype, precision: str):
    """What every GPU pipeline run must show, whatever its precision."""
    placement = Placement.from_config(cfg)
    assert placement.device.type == device_type
    assert (placement.dtype, placement.autocast_dtype) == (weights_dtype, autocast_dtype)

    # Sampling (feedback, RLMF round, evaluation), KL scoring and discriminator scoring all happened...
    assert len(records["generate"]) >= 6, records["generate"]
    assert len(records["logps"]) >= 4, records["logps"]  # policy and reference, for sft and aligned
    assert len(records["score"]) >= 2, records["score"]  # RLMF round ranking and evaluation rewards at least
    # ...on the GPU, in the run's dtype and autocast, without gradients.
    for what, calls in records.items():
        for i, call in enumerate(calls):
            assert call["devices"] == {device_type}, f"{what} call {i}: model parameters on {call['devices']}"
            assert call["dtypes"] == {weights_dtype}, f"{what} call {i}: parameters in {call['dtypes']}"
            assert call["autocast"] == autocast_dtype, f"{what} call {i}: autocast {call['autocast']}"
            assert not call["grad"], f"{what} call {i}: gradients enabled during inference"

    # Lightning trained every stage on the same device, at the same precision.
    assert len(trainers) >= 3, trainers  # sft, discriminator, align
    for trainer in trainers:
        assert trainer.strategy.root_device.type == device_type, trainer.strategy.root_device
        assert trainer.precision == precision, trainer.precision

    for key in ("feedback/pairs", "discriminator/accuracy", "align/pairs", "gold/reply_rate/initial",
                "gold/reply_rate/sft", "gold/reply_rate/aligned", "discriminator/reward/aligned", "kl/sft",
                "kl/aligned"):
        assert key in summary, key
    gold = {k: v for k, v in summary.items() if k.startswith("gold/reply_rate")}
    rates = {k: v for k, v in gold.items() if "_se/" not in k}  # sampled and greedy, for initial, sft and aligned
    errors = {k: v for k, v in gold.items() if "_se/" in k}  # the standard error beside each
    assert len(rates) == 6 and all(0.0 <= v <= 1.0 for v in rates.values()), rates
    assert len(errors) == 6 and all(0.0 <= v < 0.5 for v in errors.values()), errors
    kl = {k: v for k, v in summary.items() if k.startswith("kl/")}
    assert all(math.isfinite(v) for v in kl.values()), kl
    assert abs(summary["kl/sft"]) < 1e-4, "the SFT model is its own reference: its KL must be 0"
    rewards = {k: v for k, v in summary.items() if k.startswith("discriminator/reward/")}
    assert len(rewards) == 3 and all(math.isfinite(v) for v in rewards.values()), rewards
    assert math.isfinite(summary["sft/val_loss_after"])
    assert summary["sft/val_loss_after"] < summary["sft/val_loss_before"], "SFT did not learn on the GPU"
    assert math.isfinite(summary["align/val_loss"]), summary["align/val_loss"]


def test_quick_pipeline_default_precision_runs_on_cuda(compose, tmp_path, monkeypatch, device, accelerator):
    precision = resolve_precision("auto", accelerator)
    assert precision == "bf16-mixed", f"precision auto resolved to {precision} on {torch.cuda.get_device_name()}"
    summary, records, trainers, cfg = run_spied(compose, tmp_path / "run", monkeypatch, device.type,
                                                f"trainer.accelerator={accelerator}")
    assert cfg.logger.kind == "none" and cfg.trainer.precision == "auto"
    check_run(summary, records, trainers, cfg, device.type, torch.float32, torch.bfloat16, "bf16-mixed")
    assert (tmp_path / "run" / "align" / "generator" / "model.safetensors").exists()


def test_quick_pipeline_bf16_true_keeps_bfloat16_weights(compose, tmp_path, monkeypatch, device, accelerator):
    summary, records, trainers, cfg = run_spied(compose, tmp_path / "run", monkeypatch, device.type,
                                                f"trainer.accelerator={accelerator}", "trainer.precision=bf16-true")
    check_run(summary, records, trainers, cfg, device.type, torch.bfloat16, None, "bf16-true")
