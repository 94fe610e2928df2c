"""The main job as stages: sft -> feedback -> discriminator -> align -> evaluate.

Each stage writes its outputs under ``<run_dir>/<stage>/`` and a ``done.json`` last. A stage whose ``done.json``
exists in the run directory (a resumed run) or in ``stage.from_run`` (a hand-off from an earlier run) is not run
again: its outputs are used as they are. So ``stage=sft`` then ``stage=align stage.from_run=<that run>`` hands a
checkpoint from one job to the next, and re-running a crashed job in its own directory resumes it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from rlmf.config import STAGES
from rlmf.generation import generate
from rlmf.models import build_tiny_generator, load_generator, save_generator, train_tokenizer
from rlmf.tasks import persona_email

log = logging.getLogger(__name__)


# --- run context ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What every stage shares: the config, the run directory, the task world, the loggers, the results so far."""

    cfg: DictConfig
    run_dir: Path
    sweep_group: Optional[str] = None
    results: Dict[str, Any] = field(default_factory=dict)
    _world: Any = None
    _wandb: Any = None

    @property
    def world(self) -> persona_email.World:
        if self._world is None:
            t = self.cfg.task
            self._world = persona_email.build_world(
                seed=self.cfg.seed, num_prospects=t.num_prospects, emails_per_prospect=t.emails_per_prospect,
                heldout_persona_fraction=t.heldout_persona_fraction, validation_fraction=t.validation_fraction,
                demo_quality=t.demo_quality)
        return self._world

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def finished_dir(self, stage: str) -> Optional[Path]:
        """Where a finished ``stage`` lies: this run first, then ``stage.from_run``."""
        candidates = [self.run_dir] + ([Path(self.cfg.stage.from_run)] if self.cfg.stage.from_run else [])
        for root in candidates:
            if (root / stage / "done.json").exists():
                return root / stage
        return None

    def require(self, stage: str) -> Path:
        found = self.finished_dir(stage)
        if found is None:
            hint = f" (looked in {self.run_dir} and stage.from_run={self.cfg.stage.from_run})"
            raise FileNotFoundError(f"stage {stage!r} has not finished{hint}; run it first or point "
                                    f"stage.from_run at a run directory that has {stage}/done.json")
        return found

    # --- logging -------------------------------------------------------------------------------------------------
    def lightning_loggers(self, stage: str) -> List[Any]:
        kind = self.cfg.logger.kind
        if kind == "none":
            return []
        if kind == "csv":
            from lightning.pytorch.loggers import CSVLogger
            return [CSVLogger(save_dir=str(self.run_dir / "logs"), name=stage, version="")]
        return [self.wandb_logger()]

    def wandb_logger(self):
        if self._wandb is None:
            from lightning.pytorch.loggers import WandbLogger
            os.environ.setdefault("WANDB_MODE", self.cfg.logger.mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = WandbLogger(
                project=self.cfg.logger.project, save_dir=self.cfg.logger.save_dir, group=self.sweep_group,
                name=self.run_dir.name if not self.sweep_group else f"{self.sweep_group}/{self.run_dir.name}",
                config=OmegaConf.to_container(self.cfg, resolve=True))
        return self._wandb

    def log_table(self, key: str, columns: List[str], rows: List[List[Any]]) -> None:
        if self.cfg.logger.kind == "wandb":
            self.wandb_logger().log_table(key=key, columns=columns, data=rows)

    def log_summary(self, metrics: Dict[str, float]) -> None:
        if self.cfg.logger.kind == "wandb":
            run = self.wandb_logger().experiment
            for k, v in metrics.items():
                run.summary[k] = v

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.experiment.finish()


def mark_done(directory: Path, metrics: Dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "done.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))


def read_done(directory: Path) -> Dict[str, Any]:
    return json.loads((directory / "done.json").read_text())


# --- Lightning plumbing ----------------------------------------------------------------------------------------

def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def stage_steps(run: Run, steps: int) -> int:
    cap = run.cfg.trainer.max_steps
    return min(steps, cap) if cap > 0 else steps


def make_trainer(run: Run, stage: str, max_steps: int, validate: bool = True) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    t = run.cfg.trainer
    callbacks = [ModelCheckpoint(dirpath=str(run.stage_dir(stage) / "checkpoints"), save_last=True,
                                 save_top_k=0, every_n_train_steps=max(1, max_steps // 4))]
    if t.progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    loggers = run.lightning_loggers(stage)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, precision=resolve_precision(t.precision),
        max_steps=max_steps, max_epochs=-1, gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=min(t.log_every_n_steps, max_steps), logger=loggers or False, callbacks=callbacks,
        enable_progress_bar=t.progress_bar, enable_model_summary=False, default_root_dir=str(run.stage_dir(stage)),
        val_check_interval=t.val_check_interval or max_steps, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, limit_val_batches=None if validate else 0,
    )


def resume_checkpoint(run: Run, stage: str) -> Optional[str]:
    """The stage's own ``last.ckpt`` when a run was interrupted mid-stage (Lightning resumes from it)."""
    last = run.stage_dir(stage) / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None


# --- generator plumbing ------------------------------------------------------------------------------------------

def initial_generator(run: Run):
    """The untrained starting point: a fresh tiny Llama with a tokenizer trained on the task, or an HF model."""
    g = run.cfg.generator
    if g.kind == "hf":
        return load_generator(g.name_or_path)
    tokenizer = train_tokenizer(persona_email.corpus_texts(run.world), vocab_size=g.tiny.vocab_size)
    model = build_tiny_generator(tokenizer, hidden_size=g.tiny.hidden_size, num_layers=g.tiny.num_layers,
                                 num_heads=g.tiny.num_heads, intermediate_size=g.tiny.intermediate_size,
                                 max_position_embeddings=g.tiny.max_position_embeddings, seed=run.cfg.seed)
    return model, tokenizer


def generator_checkpoints(run: Run) -> Dict[str, Path]:
    """Every generator the run has produced so far, by the name used in tables: initial, sft, aligned."""
    found = {}
    sft = run.finished_dir("sft")
    if sft is not None:
        found["initial"] = sft / "initial"
        found["sft"] = sft / "generator"
    align = run.finished_dir("align")
    if align is not None:
        found["aligned"] = align / "generator"
    return found


# --- stages --------------------------------------------------------------------------------------------------------

def stage_sft(run: Run) -> Dict[str, Any]:
    from rlmf.data.sft import SFTDataModule
    from rlmf.modules.generator import Generator

    out = run.stage_dir("sft")
    model, tokenizer = initial_generator(run)
    save_generator(model, tokenizer, out / "initial")
    g, opt = run.cfg.generator, run.cfg.generator.sft
    data = SFTDataModule(run.world.demonstrations["train"], run.world.demonstrations["validation"], tokenizer,
                         batch_size=opt.batch_size, max_length=g.max_length, max_prompt_length=g.max_prompt_length,
                         seed=run.cfg.seed, num_workers=run.cfg.trainer.num_workers)
    module = Generator(model, loss_name="sft", lr=opt.lr, weight_decay=opt.weight_decay,
                       warmup_ratio=opt.warmup_ratio, metric_prefix="sft")
    steps = stage_steps(run, opt.max_steps)
    trainer = make_trainer(run, "sft", steps)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["sft/val/loss"]
    trainer.fit(module, datamodule=data, ckpt_path=resume_checkpoint(run, "sft"))
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["sft/val/loss"]
    save_generator(module.model, tokenizer, out / "generator")
    metrics = {"sft/val_loss_before": before, "sft/val_loss_after": after, "sft/steps": steps,
               "sft/train_examples": len(data.train_rows)}
    mark_done(out, metrics)
    return metrics


def gold_reply_rates(run: Run, prompts: List[str], completions: List[str]) -> List[float]:
    sim, world = run.world.simulator, run.world
    return [sim.reply_probability(world.brief_for(p).prospect, c) for p, c in zip(prompts, completions)]


def stage_evaluate(run: Run) -> Dict[str, Any]:
    """Gold reply rate on held-out personas for every generator the run has (sampled and greedy)."""
    t, g = run.cfg.task, run.cfg.generator
    briefs = run.world.heldout[: t.eval_prompts]
    prompts = [b.prompt for b in briefs]
    metrics: Dict[str, Any] = {}
    samples: Dict[str, List[str]] = {}
    for name, path in generator_checkpoints(run).items():
        model, tokenizer = load_generator(path)
        sampled = generate(model, tokenizer, prompts, max_new_tokens=g.max_new_tokens, do_sample=True,
                           temperature=g.temperature, seed=run.cfg.seed, max_prompt_length=g.max_prompt_length,
                           num_return_sequences=t.eval_samples_per_prompt)
        sampled_prompts = [p for p in prompts for _ in range(t.eval_samples_per_prompt)]
        greedy = generate(model, tokenizer, prompts, max_new_tokens=g.max_new_tokens, do_sample=False,
                          max_prompt_length=g.max_prompt_length)
        rates = gold_reply_rates(run, sampled_prompts, sampled)
        metrics[f"gold/reply_rate/{name}"] = sum(rates) / len(rates)
        greedy_rates = gold_reply_rates(run, prompts, greedy)
        metrics[f"gold/reply_rate_greedy/{name}"] = sum(greedy_rates) / len(greedy_rates)
        samples[name] = sampled[:: t.eval_samples_per_prompt]
    out = run.stage_dir("evaluate")
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.json").write_text(json.dumps({"prompts": prompts, "samples": samples}, indent=2))
    run.log_table("evaluate/samples", ["prompt"] + list(samples),
                  [[p] + [samples[n][i] for n in samples] for i, p in enumerate(prompts)])
    mark_done(out, metrics)
    return metrics


STAGE_FUNCTIONS: Dict[str, Callable[[Run], Dict[str, Any]]] = {
    "sft": stage_sft,
    "evaluate": stage_evaluate,
}


def run_pipeline(run: Run) -> Dict[str, Any]:
    """Run the configured stages in pipeline order, reusing finished ones; returns the merged metrics."""
    wanted = [s for s in STAGES if s in run.cfg.stage.stages]
    for stage in wanted:
        fn = STAGE_FUNCTIONS.get(stage)
        if fn is None:
            log.warning("stage %s is not available yet; skipped", stage)
            continue
        finished = run.finished_dir(stage) if stage != "evaluate" else None
        if finished is not None:
            log.info("stage %s already finished in %s; reusing it", stage, finished)
            run.results.update(read_done(finished))
            continue
        log.info("stage %s: starting", stage)
        run.results.update(fn(run))
    return run.results
