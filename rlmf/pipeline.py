"""The main job as stages: sft -> feedback -> discriminator -> align -> evaluate.

Each stage writes its outputs under ``<run_dir>/<stage>/`` and a ``done.json`` last. A stage whose ``done.json``
exists in the run directory (a resumed run) or in ``stage.from_run`` (a hand-off from an earlier run) is not run
again: its outputs are used as they are. So ``stage=sft`` then ``stage=align stage.from_run=<that run>`` hands a
checkpoint from one job to the next, and re-running a crashed job in its own directory resumes it. With
``stage.cache_dir`` the jobs of a sweep share their sft, feedback and discriminator stages (and the align stage's
round of machine feedback) by content: :func:`stage_key`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from rlmf.config import STAGES, ConfigError
from rlmf.files import write_atomic
from rlmf.generation import generate, stop_token_ids
from rlmf.logprobs import check_logprobs_match_forward
from rlmf.models import build_tiny_generator, load_generator, save_generator, train_tokenizer
from rlmf.distributed import is_main_process, main_process_first
from rlmf.placement import Placement, resolve_precision
from rlmf.resume import AtomicCheckpointIO, RandomState, SaveOnInterrupt, fit
from rlmf.tasks.base import Task, build_task

log = logging.getLogger(__name__)


# --- run context ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What every stage shares: the config, the run directory, the task, the loggers, the results so far."""

    cfg: DictConfig
    run_dir: Path
    sweep_group: Optional[str] = None
    results: Dict[str, Any] = field(default_factory=dict)
    round: int = 1  # the round of machine feedback (loop.rounds); round r > 1 lives in <run_dir>/round<r>/
    _task: Optional[Task] = None
    _wandb: Any = None

    def for_round(self, r: int) -> "Run":
        """This run seen from round ``r``: its stage directories are ``<run_dir>/round<r>/<stage>`` (round 1: the
        run directory itself); the task, loggers and config are shared."""
        return replace(self, round=r, results={})

    def seed(self, offset: int) -> int:
        """The seed of one random draw of a stage: ``seed + offset``, shifted per round so rounds differ."""
        return self.cfg.seed + offset + 1000 * (self.round - 1)

    @property
    def task(self) -> Task:
        """The task (``task.name``; :mod:`rlmf.tasks.base`): the stages ask it for data, feedback and gold."""
        if self._task is None:
            self._task = build_task(self.cfg.task, self.cfg.seed)
        return self._task

    @property
    def placement(self) -> Placement:
        """Where every model outside ``trainer.fit`` runs (device, dtype, autocast): :mod:`rlmf.placement`."""
        return Placement.from_config(self.cfg)

    def load_generator(self, path: str | Path):
        """A generator checkpoint and its tokenizer as the config says (dtype, attention, gradient checkpointing),
        checked to give the log-probs its own forward gives, placed on the run's device in eval mode."""
        g = self.cfg.generator
        model, tokenizer = load_generator(path, torch_dtype=g.torch_dtype, attn_implementation=g.attn_implementation,
                                          gradient_checkpointing=g.gradient_checkpointing)
        check_logprobs_match_forward(model)
        return self.placement.put(model), tokenizer

    def load_reward(self):
        """The reward that ranks this round's samples (``reward=``), on the run's placement."""
        from rlmf.rewards import build_reward

        if self.cfg.reward is None:
            raise ConfigError("reward is null: choose one of the conf/reward options (reward=discriminator, ...)")
        found = self.finished_dir("discriminator")
        context = {"discriminator_path": found / "model"} if found is not None else {}
        context.update(self.task.reward_context())
        return build_reward(self.cfg.reward, self.placement, **context)

    def load_discriminator(self, path: Path):
        from rlmf.modules.discriminator import Discriminator

        return self.placement.put(Discriminator.load(path))

    def _round_root(self, root: Path) -> Path:
        return root if self.round == 1 else root / f"round{self.round}"

    def stage_dir(self, stage: str) -> Path:
        """Where ``stage`` writes: its shared directory when the sweep shares it (:meth:`shared_stage_dir`), else
        ``<run_dir>/<stage>``."""
        shared = self.shared_stage_dir(stage)
        return shared if shared is not None else self._round_root(self.run_dir) / stage

    def shared_stage_dir(self, stage: str) -> Optional[Path]:
        """``<stage.cache_dir>/<stage>-<key>`` for a stage every job with the same inputs can share (sft, feedback,
        discriminator of round 1; :func:`stage_key`), or None when ``stage.cache_dir`` is null. A relative
        ``cache_dir`` is taken from the directory that holds the run directory: the sweep directory in a multirun."""
        if self.cfg.stage.get("cache_dir") is None or stage not in SHARED_STAGES or self.round != 1:
            return None
        root = Path(self.cfg.stage.cache_dir)
        root = root if root.is_absolute() else self.run_dir.parent / root
        return root / f"{stage}-{stage_key(self.cfg, stage)[:16]}"

    def shared_feedback_dir(self) -> Optional[Path]:
        """Where the align stage's round of machine feedback is shared (round 1 with ``stage.cache_dir``), else
        None: ``<stage.cache_dir>/align_feedback-<key>``."""
        sft = self.shared_stage_dir("sft")
        return None if sft is None else sft.parent / f"align_feedback-{stage_key(self.cfg, 'align_feedback')[:16]}"

    def finished_dir(self, stage: str) -> Optional[Path]:
        """Where a finished ``stage`` (of this round) lies: this run first, then the shared stages
        (``stage.cache_dir``), then ``stage.from_run``."""
        candidates = [self._round_root(self.run_dir) / stage]
        if self.shared_stage_dir(stage) is not None:
            candidates.append(self.shared_stage_dir(stage))
        if self.cfg.stage.from_run:
            candidates.append(self._round_root(Path(self.cfg.stage.from_run)) / stage)
        for directory in candidates:
            if (directory / "done.json").exists():
                return directory
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
            name = stage if self.round == 1 else f"round{self.round}_{stage}"
            return [CSVLogger(save_dir=str(self.run_dir / "logs"), name=name, version="")]
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


# --- stages shared between the jobs of a sweep (stage.cache_dir) -------------------------------------------------

SHARED_STAGES = ("sft", "feedback", "discriminator", "judge")
# ... and the align stage's round of machine feedback (rlmf.feedback.machine.round_feedback): the SFT model's samples
# ranked by the reward, the same for every algorithm and loss setting of a seed.
SHARED_STEPS = ("sft", "feedback", "discriminator", "align_feedback")
# The config each shared step reads, besides the steps before it (their keys are chained into its own). A task key
# a stage never reads is left out, so that e.g. an ablation over task.align_prompts still shares the SFT model.
STAGE_INPUTS = {
    "sft": ("seed", "task", "generator", "trainer"),
    "feedback": ("task", "loop.allocation", "loop.sends_per_prompt", "loop.weighting"),
    "discriminator": ("discriminator",),
    # The evaluation's judge (evaluate.judge_rows) reads no earlier stage and not the job's seed: one per sweep.
    "judge": ("discriminator", "task", "evaluate.judge_rows", "evaluate.judge_seed", "trainer"),
    "align_feedback": ("task", "reward", "feedback.pairs", "feedback.reviser", "feedback.reviser_path",
                       "feedback.chosen_rank"),
}
UNREAD_TASK_KEYS = {
    "sft": ("eval_prompts", "eval_samples_per_prompt", "feedback_prompts", "feedback_samples_per_prompt",
            "align_prompts", "align_samples_per_prompt"),
    "feedback": ("eval_samples_per_prompt", "align_prompts", "align_samples_per_prompt"),
    "align_feedback": ("eval_samples_per_prompt",),
    "judge": ("eval_prompts", "eval_samples_per_prompt"),
}
# Trainer settings that change no result (display, logging cadence, data-loading processes).
UNREAD_TRAINER_KEYS = ("progress_bar", "log_every_n_steps", "num_workers")


def stage_inputs(cfg: DictConfig, stage: str) -> Dict[str, Any]:
    """The resolved config a shared stage depends on (:data:`STAGE_INPUTS`), as plain data."""
    inputs = {}
    for key in STAGE_INPUTS[stage]:
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
        if key == "task":
            value = {k: v for k, v in value.items() if k not in UNREAD_TASK_KEYS.get(stage, ())}
        if key == "trainer":
            value = {k: v for k, v in value.items() if k not in UNREAD_TRAINER_KEYS}
        inputs[key] = value
    return inputs


def stage_key(cfg: DictConfig, stage: str) -> str:
    """A content address for a shared stage: sha256 of its inputs and of the keys of the stages before it, so two
    jobs get the same key exactly when the stage would compute the same thing (the code is not part of the key:
    share a cache directory between sweeps only with unchanged code)."""
    previous = SHARED_STEPS[:SHARED_STEPS.index(stage)] if stage in SHARED_STEPS else ()
    blob = json.dumps({"stage": stage, "inputs": stage_inputs(cfg, stage),
                       "after": [stage_key(cfg, s) for s in previous]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@contextlib.contextmanager
def stage_lock(directory: Path):
    """An exclusive lock on ``<directory>.lock`` (``fcntl.flock``): one job computes a shared stage while the others
    wait, then find its ``done.json``. The lock dies with its process, so a killed job never blocks the sweep."""
    import fcntl

    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def link_shared_stage(run: Run, stage: str, shared: Path) -> None:
    """``<run_dir>/<stage>`` -> the shared directory, so the job directory reads like an unshared one (and works as
    a ``stage.from_run``)."""
    link = run.run_dir / stage
    if (shared / "done.json").exists() and not link.exists() and not link.is_symlink():
        try:
            link.symlink_to(shared.resolve(), target_is_directory=True)
        except FileExistsError:  # pragma: no cover - a resumed job that linked it already
            pass


def mark_done(directory: Path, metrics: Dict[str, Any]) -> None:
    write_atomic(directory / "done.json", json.dumps(metrics, indent=2, sort_keys=True))


def read_done(directory: Path) -> Dict[str, Any]:
    return json.loads((directory / "done.json").read_text())


# --- Lightning plumbing ----------------------------------------------------------------------------------------

def stage_steps(run: Run, steps: int) -> int:
    cap = run.cfg.trainer.max_steps
    return min(steps, cap) if cap > 0 else steps


def optimiser_steps(run: Run, opt: DictConfig, batches_per_epoch: int) -> int:
    """A generator stage's length in optimiser steps: ``opt.max_epochs`` passes over the data when set (each epoch
    ``ceil(batches / trainer.accumulate_grad_batches)`` steps; with ``opt.max_tokens`` the batches per epoch vary
    and ``batches_per_epoch`` is their mean), else ``opt.max_steps``; capped by ``trainer.max_steps``."""
    if opt.get("max_epochs"):
        steps = opt.max_epochs * math.ceil(batches_per_epoch / run.cfg.trainer.accumulate_grad_batches)
    else:
        steps = opt.max_steps
    return stage_steps(run, steps)


def slurm_environment() -> List[Any]:
    """Under SLURM: Lightning's SLURM settings without its own auto-requeue (SIGUSR1 -> hpc_ckpt + scontrol),
    because submitit (hydra/launcher=slurm) requeues the job and the re-run resumes from last.ckpt."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def make_trainer(run: Run, stage: str, max_steps: int, validate: bool = True, manual_optimisation: bool = False
                 ) -> L.Trainer:
    """The stage's Trainer. ``manual_optimisation``: for a module that steps its optimiser itself (the online
    generator), which clips its own gradients and does not accumulate (Lightning refuses both settings for it)."""
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    from rlmf.modules.guard import NonFiniteGuard

    t = run.cfg.trainer
    checkpoints = run.stage_dir(stage) / "checkpoints"
    # The guard first, so the callbacks after it see a skipped step as skipped.
    callbacks = [NonFiniteGuard(stage, max_bad_steps=t.max_bad_steps),
                 ModelCheckpoint(dirpath=str(checkpoints), save_last=True, save_top_k=0,
                                 every_n_train_steps=max(1, max_steps // 4)),
                 RandomState(), SaveOnInterrupt(checkpoints / "last.ckpt")]
    if t.progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    loggers = run.lightning_loggers(stage)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
        precision=resolve_precision(t.precision, t.accelerator), max_steps=max_steps, max_epochs=-1,
        accumulate_grad_batches=1 if manual_optimisation else t.accumulate_grad_batches,
        gradient_clip_val=None if manual_optimisation else t.gradient_clip_val,
        # A manual-optimisation step is a whole rollout: log every one.
        log_every_n_steps=1 if manual_optimisation else min(t.log_every_n_steps, max_steps),
        logger=loggers or False, callbacks=callbacks,
        enable_progress_bar=t.progress_bar, enable_model_summary=False, default_root_dir=str(run.stage_dir(stage)),
        val_check_interval=t.val_check_interval or max_steps, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, limit_val_batches=None if validate else 0,
        # Our loaders shard across processes and resume mid-epoch themselves (rlmf.data.loading).
        use_distributed_sampler=False, plugins=[AtomicCheckpointIO(), *slurm_environment()],
    )


def resume_checkpoint(run: Run, stage: str) -> Optional[str]:
    """The stage's own ``last.ckpt`` when a run was interrupted mid-stage (Lightning resumes from it)."""
    last = run.stage_dir(stage) / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None


# --- generator plumbing ------------------------------------------------------------------------------------------

def initial_generator(run: Run):
    """The untrained starting point: a fresh tiny Llama with a tokenizer trained on the task, or an HF model (loaded
    and checked like every generator, :meth:`Run.load_generator`)."""
    g = run.cfg.generator
    if g.kind == "hf":
        return run.load_generator(g.name_or_path)
    tokenizer = train_tokenizer(run.task.corpus(), vocab_size=g.tiny.vocab_size)
    model = build_tiny_generator(tokenizer, hidden_size=g.tiny.hidden_size, num_layers=g.tiny.num_layers,
                                 num_heads=g.tiny.num_heads, intermediate_size=g.tiny.intermediate_size,
                                 max_position_embeddings=g.tiny.max_position_embeddings, seed=run.cfg.seed)
    check_logprobs_match_forward(model)
    return model, tokenizer


def starting_generator(run: Run) -> str | Path:
    """What alignment (and a round's feedback) starts from: the previous round's aligned generator in round r > 1;
    else the SFT generator when the run has one, or a ``generator=hf`` checkpoint as it is when the job leaves
    ``sft`` out of ``stage.stages``."""
    if run.round > 1:
        return run.for_round(run.round - 1).require("align") / "generator"
    if run.finished_dir("sft") is None and "sft" not in run.cfg.stage.stages and run.cfg.generator.kind == "hf":
        return run.cfg.generator.name_or_path
    return run.require("sft") / "generator"


def generator_checkpoints(run: Run) -> Dict[str, str | Path]:
    """Every generator the run has produced so far, by the name used in tables: initial, sft, aligned."""
    found: Dict[str, str | Path] = {}
    sft = run.finished_dir("sft")
    if sft is not None:
        found["initial"] = sft / "initial"
        found["sft"] = sft / "generator"
    elif run.cfg.generator.kind == "hf":
        found["initial"] = run.cfg.generator.name_or_path
    align = run.finished_dir("align")
    if align is not None:
        found["aligned"] = align / "generator"
    for r in range(2, run.cfg.loop.rounds + 1):
        later = run.for_round(r).finished_dir("align")
        if later is not None:
            found[f"round{r}"] = later / "generator"
    return found


# --- stages --------------------------------------------------------------------------------------------------------

def stage_sft(run: Run) -> Dict[str, Any]:
    from rlmf.data import log_data_report
    from rlmf.data.sft import SFTDataModule, sft_rows
    from rlmf.modules.generator import Generator

    out = run.stage_dir("sft")
    model, tokenizer = initial_generator(run)
    if is_main_process():
        save_generator(model, tokenizer, out / "initial")
    g, opt = run.cfg.generator, run.cfg.generator.sft
    train, validation = run.task.demonstrations("train"), run.task.demonstrations("validation")
    data = SFTDataModule(train, validation, tokenizer,
                         batch_size=opt.batch_size, max_length=g.max_length, max_prompt_length=g.max_prompt_length,
                         seed=run.cfg.seed, num_workers=run.cfg.trainer.num_workers, max_tokens=opt.max_tokens)
    module = Generator(model, loss_name="sft", lr=opt.lr, weight_decay=opt.weight_decay,
                       warmup_ratio=opt.warmup_ratio, metric_prefix="sft", packing=g.packing)
    log_data_report("SFT data", sft_rows(train), tokenizer, data.drops)
    steps = optimiser_steps(run, opt, data.batches_per_epoch(opt.max_epochs or 1))
    trainer = make_trainer(run, "sft", steps)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["sft/val/loss"]
    fit(trainer, module, "sft", datamodule=data, ckpt_path=resume_checkpoint(run, "sft"))
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["sft/val/loss"]
    metrics = {"sft/val_loss_before": before, "sft/val_loss_after": after, "sft/steps": steps,
               "sft/train_examples": len(data.train_rows)}
    with main_process_first() as main:
        if main:
            save_generator(module.model, tokenizer, out / "generator")
            mark_done(out, metrics)
    return metrics


def gold_reply_rates(run: Run, prompts: List[str], completions: List[str]) -> List[float]:
    """The task's ground truth of each completion (the persona-email simulator's reply probability)."""
    return run.task.gold(prompts, completions)


def sample(run: Run, model, tokenizer, prompts: List[Any], k: int, seed: int, what: str = "sampling", **kwargs):
    g = run.cfg.generator
    progress = f"{what}: {len(prompts)} prompts x {k}" if run.cfg.trainer.progress_bar else None
    with run.placement.inference():
        return generate(model, tokenizer, prompts, max_new_tokens=g.max_new_tokens, do_sample=True,
                        temperature=g.temperature, seed=seed, max_prompt_length=g.max_prompt_length,
                        num_return_sequences=k, progress=progress, **kwargs)


def score(run: Run, discriminator, prompts: List[str], completions: List[str]) -> torch.Tensor:
    """Discriminator rewards ``[B]`` on the run's device and precision."""
    with run.placement.inference():
        return discriminator.score(prompts, completions)


def stage_feedback(run: Run) -> Dict[str, Any]:
    """A/B feedback from the task's feedback source (the simulated recipients) on the SFT generator's completions.

    For each feedback prompt the SFT generator writes ``feedback_samples_per_prompt`` completions and the task answers
    each (a reply or not: :meth:`rlmf.tasks.base.Task.feedback`). Each answered completion is paired with an
    unanswered one for the same prompt (``pairs.jsonl``), and every completion with its answer is a thumbs row
    (``thumbs.jsonl``): :func:`rlmf.feedback.ab.ab_feedback`. With a gold metric, ``heldout_pairs.jsonl`` holds
    completions for held-out prompts ordered by it: evaluation data for the discriminator, never trained on.
    """
    from rlmf.data import write_jsonl
    from rlmf.feedback.ab import ab_feedback, bandit_feedback, gold_ordered_pairs

    task = run.task
    model, tokenizer = run.load_generator(run.require("sft") / "generator" if run.round == 1
                                          else starting_generator(run))
    k = task.setting("feedback_samples_per_prompt", 4)
    prompt_rows = task.feedback_prompts()
    prompts = [p.prompt for p in prompt_rows]
    emails = sample(run, model, tokenizer, prompt_rows, k, seed=run.seed(1),
                    what="feedback emails")
    repeated = [p for p in prompts for _ in range(k)]
    loop = run.cfg.loop
    budget = loop.sends_per_prompt or k
    ab_metrics: Dict[str, Any] = {}
    if loop.allocation == "uniform" and budget == k and loop.weighting == "none":  # one send per candidate
        answers = task.feedback(repeated, emails, random.Random(run.seed(2)))
        pairs, thumbs = ab_feedback(repeated, emails, answers, k)
        sends, replies = len(answers), sum(answers)
    else:
        pairs, thumbs, tests = bandit_feedback(task, prompts, emails, k, budget, loop.allocation,
                                               loop.weighting == "posterior", random.Random(run.seed(2)),
                                               random.Random(run.seed(6)))
        write_jsonl(run.stage_dir("feedback") / "ab_tests.jsonl", tests)
        sends, replies = sum(sum(t["sends"]) for t in tests), sum(sum(t["replies"]) for t in tests)
        ab_metrics["feedback/mean_pair_weight"] = sum(p.weight for p in pairs) / max(1, len(pairs))
        if task.has_gold:
            ab_metrics["feedback/regret"] = sum(t["regret"][-1] for t in tests if t["regret"])
    heldout_pairs = []
    if task.has_gold:
        heldout = task.eval_prompts()
        heldout_emails = sample(run, model, tokenizer, heldout, 2, seed=run.seed(3))
        heldout_texts = [p.prompt for p in heldout for _ in range(2)]
        heldout_pairs = gold_ordered_pairs(heldout_texts, heldout_emails, task.gold(heldout_texts, heldout_emails))

    if not pairs:
        raise RuntimeError(
            "feedback gave no training pairs: the SFT generator's emails drew too few replies to compare. Train SFT "
            "longer (generator.sft.max_steps) or ask more recipients (task.feedback_prompts, "
            "task.feedback_samples_per_prompt).")
    if not heldout_pairs:
        log.warning("no held-out pair differs in gold reply probability; discriminator accuracy will be NaN")
    out = run.stage_dir("feedback")
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "thumbs.jsonl", thumbs)
    write_jsonl(out / "heldout_pairs.jsonl", heldout_pairs)
    metrics = {"feedback/pairs": len(pairs), "feedback/thumbs": len(thumbs), "feedback/sends": sends,
               "feedback/observed_reply_rate": replies / max(1, sends),
               "feedback/heldout_pairs": len(heldout_pairs), **ab_metrics}
    mark_done(out, metrics)
    return metrics


def discriminator_kwargs(cfg: DictConfig) -> Dict[str, Any]:
    d = OmegaConf.to_container(cfg.discriminator, resolve=True)
    return {k: v for k, v in d.items() if k not in ("batch_size", "max_epochs")}


def stage_discriminator(run: Run) -> Dict[str, Any]:
    """Train the reward model on the recipients' A/B feedback (or thumbs); report held-out pairwise accuracy."""
    from rlmf.data import load_feedback, load_pairs, pairs_to_feedback
    from rlmf.modules.discriminator import Discriminator

    d = run.cfg.discriminator
    if run.task.preference_pairs("train") is not None:  # the task brings its pairs
        train_rows, heldout = run.task.preference_pairs("train"), run.task.preference_pairs("eval")
        if d.objective == "thumbs":
            train_rows = pairs_to_feedback(train_rows)
    else:  # every round's feedback so far; held out: this round's
        train_rows = []
        for r in range(1, run.round + 1):
            feedback = run.for_round(r).require("feedback")
            if d.objective == "pairs":
                rows, report = load_pairs(feedback / "pairs.jsonl")
            else:
                rows, report = load_feedback(feedback / "thumbs.jsonl")
            train_rows += rows
            log.info("discriminator data (round %d feedback): %s", r, report)
        heldout_file = feedback / "heldout_pairs.jsonl"
        heldout = load_pairs(heldout_file)[0] if heldout_file.stat().st_size else []
    if run.round > 1 and run.cfg.loop.discriminator == "warm":  # continue from the previous round's
        module = Discriminator.load(run.for_round(run.round - 1).require("discriminator") / "model").train()
    else:
        module = Discriminator(**discriminator_kwargs(run.cfg))
    return fit_discriminator(run, "discriminator", module, train_rows, heldout, run.cfg.seed)


def stage_judge(run: Run) -> Dict[str, Any]:
    """The evaluation's independent judge (``evaluate.judge_rows``): a discriminator trained on those rows of
    ``task.train``, which neither the policy nor its reward model trains on; held out: the task's eval pairs."""
    from rlmf.data import pairs_to_feedback
    from rlmf.modules.discriminator import Discriminator

    rows = run.task.rows(run.cfg.evaluate.judge_rows)
    train_rows = pairs_to_feedback(rows) if run.cfg.discriminator.objective == "thumbs" else rows
    module = Discriminator(**discriminator_kwargs(run.cfg))
    return fit_discriminator(run, "judge", module, train_rows, run.task.preference_pairs("eval"),
                             run.cfg.evaluate.judge_seed)


def fit_discriminator(run: Run, stage: str, module, train_rows: List[Any], heldout: List[Any], seed: int
                      ) -> Dict[str, Any]:
    """Train ``module`` on ``train_rows`` (batches drawn with ``seed``), save it in ``<stage dir>/model`` and
    report its pairwise accuracy on ``heldout`` before and after, as ``<stage>/accuracy``."""
    from rlmf.data.loading import RowsDataModule
    from rlmf.modules.discriminator import pairwise_accuracy

    d = run.cfg.discriminator
    data = RowsDataModule(train_rows, heldout, module.training_collator(), d.batch_size, seed=seed,
                          num_workers=run.cfg.trainer.num_workers, val_collate=module.validation_collator())
    steps = stage_steps(run, d.max_epochs * data.batches_per_epoch())
    trainer = make_trainer(run, stage, steps, validate=bool(heldout))

    def accuracy() -> float:
        if not heldout or not is_main_process():
            return float("nan")
        run.placement.put(module)  # Lightning hands the module back on the CPU after fit
        with run.placement.inference():
            return pairwise_accuracy(module, heldout)

    accuracy_before = accuracy()
    fit(trainer, module, stage, datamodule=data, ckpt_path=resume_checkpoint(run, stage))
    out = run.stage_dir(stage)
    metrics = {f"{stage}/accuracy": accuracy(), f"{stage}/accuracy_before_training": accuracy_before,
               f"{stage}/train_rows": len(train_rows), f"{stage}/steps": steps}
    with main_process_first() as main:
        if main:
            module.save(out / "model")
            mark_done(out, metrics)
    return metrics


def stage_align(run: Run) -> Dict[str, Any]:
    """One RLMF round: the starting generator samples, the discriminator ranks, the generator learns with ``algo``.

    A task that brings its own pairs (``task=preference_files``) gives the feedback as they are. The starting generator is the SFT model, or
    a ``generator=hf`` checkpoint as it is when the job has no ``sft`` stage (:func:`starting_generator`).
    """
    from rlmf.data import log_data_report, pairs_to_feedback, tokenize_feedback, tokenize_pairs
    from rlmf.data.alignment import AlignmentDataModule, with_mismatched_completions
    from rlmf.feedback.machine import round_feedback
    from rlmf.losses import get_loss, loss_inputs
    from rlmf.modules.generator import Generator
    from rlmf.reference import attach_precomputed, prepare_reference

    a, g = run.cfg.algo, run.cfg.generator
    out = run.stage_dir("align")
    start = starting_generator(run)
    model, tokenizer = run.load_generator(start)
    loss = get_loss(a.name)
    data_format = loss.data_format
    if data_format == "online":
        return align_online(run, model, tokenizer)

    def tokenize(pairs, thumbs):
        if data_format == "unpaired":
            features, drops = tokenize_feedback(thumbs, tokenizer, g.max_length, g.max_prompt_length)
            if "policy_kl_logps" in loss_inputs(a.name):  # KTO's reference point: fixed mismatched rows
                features = with_mismatched_completions(features, g.max_length)
            return features, drops
        return tokenize_pairs(pairs, tokenizer, g.max_length, g.max_prompt_length)

    if run.task.preference_pairs("train") is not None:  # the task's own pairs are the feedback
        stats = {}
        pairs = run.task.preference_pairs("train")
        thumbs = pairs_to_feedback(pairs)
        train, drops = tokenize(pairs, thumbs)
        eval_pairs = run.task.preference_pairs("eval")
        validation, _ = tokenize(eval_pairs, pairs_to_feedback(eval_pairs))
    else:
        pairs, thumbs, stats = round_feedback(run, model, tokenizer)  # rlmf.feedback.machine
        if run.cfg.feedback.drop_desirable > 0:
            from rlmf.feedback.ranking import drop_desirable

            pairs, thumbs, dropped = drop_desirable(pairs, thumbs, run.cfg.feedback.drop_desirable,
                                                    random.Random(run.seed(8)))
            stats = {**stats, "align/dropped_desirable": dropped}
        stats = {**stats, "align/kept_pairs": len(pairs), "align/kept_thumbs": len(thumbs)}
        features, drops = tokenize(pairs, thumbs)
        n_val = max(1, len(features) // 10)
        train, validation = features[n_val:], features[:n_val]
    log_data_report("alignment data", thumbs if data_format == "unpaired" else pairs, tokenizer, drops)
    splits = {"train": train, "validation": validation}
    reference_mode = a.reference if loss.requires_reference else "none"
    if reference_mode == "precomputed":
        with main_process_first(), run.placement.inference():  # rank 0 fills the cache, the others read it
            cache, hit = attach_precomputed(
                model, start, splits, "paired" if data_format == "paired_online" else data_format,
                tokenizer.pad_token_id, a.reference_cache_dir, placement=run.placement, packing=g.packing)
        stats["align/reference_cache_hit"] = float(hit)
    policy, reference = prepare_reference(reference_mode, model, a.lora_rank, data_format)
    opt = a.optim
    module = Generator(policy, loss_name=a.name, loss_kwargs=OmegaConf.to_container(a.loss, resolve=True),
                       lr=opt.lr, weight_decay=opt.weight_decay, warmup_ratio=opt.warmup_ratio,
                       reference=reference, reference_mode=reference_mode, online_samples=a.online_samples,
                       max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                       stop_token_ids=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                       metric_prefix="align", packing=g.packing)
    data = AlignmentDataModule(splits["train"], splits["validation"], data_format, tokenizer.pad_token_id,
                               g.max_length, opt.batch_size, seed=run.cfg.seed,
                               num_workers=run.cfg.trainer.num_workers, max_tokens=opt.max_tokens)
    steps = optimiser_steps(run, opt, data.batches_per_epoch(opt.max_epochs or 1))
    trainer = make_trainer(run, "align", steps)
    fit(trainer, module, "align", datamodule=data, ckpt_path=resume_checkpoint(run, "align"))
    metrics = {**stats, **drops.as_dict("align/data/"), "align/steps": steps,
               "align/val_loss": float(trainer.callback_metrics.get("align/val/loss", float("nan")))}
    with main_process_first() as main:
        if main:
            trained = module.model.merge_and_unload() if reference_mode == "lora" else module.model
            save_generator(trained, tokenizer, out / "generator")
            mark_done(out, metrics)
    return metrics


def align_online(run: Run, model, tokenizer) -> Dict[str, Any]:
    """The align stage for the online algorithms (``algo=ppo|grpo|rloo|online_dpo``): no round of offline pairs;
    the policy samples ``algo.online.num_generations`` completions for each training prompt during training, and the
    run's ``reward=`` scores them (:class:`rlmf.modules.online.OnlineGenerator`).

    Training prompts: the task's (:meth:`rlmf.tasks.base.Task.train_prompts`).
    ``algo.optim.max_steps`` (or ``max_epochs``) counts rollouts (training batches of ``algo.optim.batch_size``
    prompts); each rollout makes ``num_iterations * ceil(rows / minibatch_size)`` optimiser steps, and
    ``align/steps`` reports optimiser steps. With a gold metric (the persona-email simulator's, never shown to the
    policy) every rollout's is logged as ``align/train/gold/reply_rate``, for curves against steps.
    """
    from rlmf.data.collate import OnlinePromptCollator, tokenize_prompts
    from rlmf.data.loading import RowsDataModule
    from rlmf.modules.online import OnlineGenerator, needs_reference
    from rlmf.reference import frozen_copy

    a, g, o = run.cfg.algo, run.cfg.generator, run.cfg.algo.online
    prompts = run.task.train_prompts()
    features = tokenize_prompts(prompts, tokenizer, g.max_prompt_length)
    rows = [{**f, "prompt": p.prompt} for f, p in zip(features, prompts)]
    reward = run.load_reward()

    def gold_monitor(prompts: List[str], completions: List[str]) -> Dict[str, float]:
        rates = gold_reply_rates(run, prompts, completions)
        return {"gold/reply_rate": sum(rates) / len(rates)}

    opt = a.optim
    module = OnlineGenerator(
        model, tokenizer, reward.score_with_validity, loss_name=a.name,
        loss_kwargs=OmegaConf.to_container(a.loss, resolve=True),
        reference=frozen_copy(model) if needs_reference(a.name, o.kl_coef) else None,
        num_generations=o.num_generations, num_iterations=o.num_iterations, minibatch_size=o.minibatch_size,
        temperature=o.temperature if o.temperature is not None else g.temperature,
        max_new_tokens=o.max_new_tokens or g.max_new_tokens, scale_rewards=o.scale_rewards, kl_coef=o.kl_coef,
        kl_target=o.kl_target, kl_horizon=o.kl_horizon, gamma=o.gamma, lam=o.lam,
        drop_uniform_groups=o.drop_uniform_groups, lr=opt.lr, weight_decay=opt.weight_decay,
        warmup_ratio=opt.warmup_ratio, gradient_clip_val=run.cfg.trainer.gradient_clip_val,
        stop_token_ids=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id, metric_prefix="align",
        monitor=gold_monitor if run.task.has_gold else None, log_completions_every=o.log_completions_every,
        packing=g.packing)
    completions = min(opt.batch_size, len(rows)) * o.num_generations  # every batch is whole (drop_last)
    updates = o.num_iterations * math.ceil(completions / (o.minibatch_size or completions))  # per rollout
    data = RowsDataModule(rows, [], OnlinePromptCollator(tokenizer.pad_token_id), opt.batch_size, seed=run.cfg.seed,
                          num_workers=run.cfg.trainer.num_workers, steps_per_batch=updates)
    rollouts = optimiser_steps(run, opt, data.batches_per_epoch())
    steps = rollouts * updates
    trainer = make_trainer(run, "align", steps, validate=False, manual_optimisation=True)
    fit(trainer, module, "align", datamodule=data, ckpt_path=resume_checkpoint(run, "align"))
    logged = ("reward", "kl", "objective/kl", "objective/entropy", "invalid_rewards", "gold/reply_rate")
    metrics = {"align/steps": steps, "align/rollouts": rollouts, "align/prompts": len(rows),
               **{k: float(v) for k, v in trainer.callback_metrics.items()
                  if k in {f"align/train/{name}" for name in logged}}}
    del reward
    out = run.stage_dir("align")
    with main_process_first() as main:
        if main:
            save_generator(module.model, tokenizer, out / "generator")  # the policy alone: no value head
            mark_done(out, metrics)
    return metrics


def standard_error(groups: List[List[float]]) -> float:
    """The standard error of the mean of a metric measured on ``groups`` (a prompt's samples each): the sample
    standard deviation of the prompts' means over sqrt(number of prompts). Samples of one prompt are not independent
    draws of the evaluation (they share the prompt), so the prompt is the unit; NaN with fewer than two prompts."""
    means = [sum(g) / len(g) for g in groups]
    if len(means) < 2:
        return float("nan")
    mean = sum(means) / len(means)
    return math.sqrt(sum((m - mean) ** 2 for m in means) / (len(means) - 1) / len(means))


def evaluate_generator(run: Run, name: str, path: str | Path, prompts: List[Any], discriminator, reference,
                       start_name: Optional[str] = None
                       ) -> Tuple[Dict[str, float], List[str], List[List[float]]]:
    """One generator's metrics on ``prompts``, one sampled completion per prompt, and the discriminator's rewards of
    every sample grouped by prompt (``[P][k]``; empty without a discriminator).

    ``length/<name>``: mean sampled completion length in tokens. With held-out pairs (``task.preference_pairs``),
    ``heldout/...`` metrics (:func:`rlmf.evaluation.pair_metrics`; the implicit-reward ones against ``reference``
    for every generator but ``start_name``, the one alignment started from).

    ``gold/reply_rate_se/<name>`` (and ``_greedy_se``) is the standard error of the gold reply rate over the held-out
    prompts (:func:`standard_error`): the evaluation's own noise, against which differences between arms are read.

    ``kl/<name>`` estimates KL(policy || reference) on the policy's own samples, both scored at the temperature
    the samples were drawn at (``generator.temperature``), i.e. the KL between the distributions sampled.
    """
    from rlmf.data.collate import FeedbackCollator
    from rlmf.logprobs import batched_completion_logps

    g = run.cfg.generator
    k = run.task.setting("eval_samples_per_prompt", 1)
    texts = [p.prompt for p in prompts]
    sampled_prompts = [p for p in texts for _ in range(k)]
    model, tokenizer = run.load_generator(path)
    sampled, ids = sample(run, model, tokenizer, prompts, k, seed=run.cfg.seed + 5, return_token_ids=True,
                          what=f"evaluating {name}")
    metrics: Dict[str, float] = {}
    if run.task.has_gold:
        with run.placement.inference():
            greedy = generate(model, tokenizer, prompts, max_new_tokens=g.max_new_tokens, do_sample=False,
                              max_prompt_length=g.max_prompt_length)
        rates = gold_reply_rates(run, sampled_prompts, sampled)
        metrics[f"gold/reply_rate/{name}"] = sum(rates) / len(rates)
        metrics[f"gold/reply_rate_se/{name}"] = standard_error([rates[i:i + k] for i in range(0, len(rates), k)])
        greedy_rates = gold_reply_rates(run, texts, greedy)
        metrics[f"gold/reply_rate_greedy/{name}"] = sum(greedy_rates) / len(greedy_rates)
        metrics[f"gold/reply_rate_greedy_se/{name}"] = standard_error([[r] for r in greedy_rates])
    metrics[f"length/{name}"] = sum(len(c) for _, c in ids) / max(len(ids), 1)
    rewards: List[List[float]] = []
    if discriminator is not None:
        flat = score(run, discriminator, sampled_prompts, sampled).float().cpu().tolist()
        metrics[f"discriminator/reward/{name}"] = sum(flat) / len(flat)
        rewards = [flat[i:i + k] for i in range(0, len(flat), k)]
    pairs = run.task.preference_pairs("eval")
    if pairs:
        scored_reference = reference if name != start_name else None
        metrics.update({f"heldout/{key}/{name}": value for key, value in
                        heldout_pair_metrics(run, model, tokenizer, pairs, scored_reference).items()})
    if reference is not None and name != "initial":
        features = [{"prompt_ids": p, "completion_ids": c, "desirable": True} for p, c in ids if c]
        collate = FeedbackCollator(tokenizer.pad_token_id)
        with run.placement.inference():
            policy_logps, reference_logps = (
                batched_completion_logps(m, features, collate, temperature=g.temperature, packing=g.packing)
                for m in (model, reference))
        metrics[f"kl/{name}"] = float((policy_logps - reference_logps).mean())
    return metrics, sampled[::k], rewards


def heldout_pair_metrics(run: Run, model, tokenizer, pairs: List[Any], reference) -> Dict[str, float]:
    """:func:`rlmf.evaluation.pair_metrics` of ``model`` on held-out ``pairs`` (tokenised as for training), with
    the implicit reward against ``reference`` (``algo.loss.beta``, else 0.1) when it is given."""
    from rlmf.data import FeedbackCollator, tokenize_pairs
    from rlmf.evaluation import pair_metrics
    from rlmf.logprobs import batched_completion_logps

    g = run.cfg.generator
    features, _ = tokenize_pairs(pairs, tokenizer, g.max_length, g.max_prompt_length)
    rows = [{"prompt_ids": f["prompt_ids"], "completion_ids": f[side], "desirable": True}
            for side in ("chosen_ids", "rejected_ids") for f in features]
    collate = FeedbackCollator(tokenizer.pad_token_id)
    with run.placement.inference():
        logps = [batched_completion_logps(m, rows, collate, packing=g.packing).view(2, -1)
                 for m in ([model] if reference is None else [model, reference])]
    chosen_lengths = torch.tensor([len(f["chosen_ids"]) for f in features], dtype=torch.float32)
    references = logps[1].unbind(0) if reference is not None else (None, None)
    return pair_metrics(*logps[0].unbind(0), chosen_lengths, *references, beta=run.cfg.algo.loss.get("beta", 0.1))


def best_of_n(run: Run, path: str | Path, prompts: List[Any], discriminator, ns: List[int]) -> Dict[str, float]:
    """Best-of-n sampling from the generator at ``path`` on held-out ``prompts`` (Gao et al. 2023, "Scaling Laws for
    Reward Model Overoptimization"): max(ns) samples per prompt, and for each n the first n of a prompt's samples
    with the highest discriminator reward is its pick. ``bon/gold/<n>``: the picks' mean gold reply rate;
    ``bon/proxy/<n>``: their mean discriminator reward; ``bon/kl/<n>``: the analytic KL of best-of-n to the
    sampling policy, log n - (n - 1) / n (Stiennon et al. 2020), in nats per sample like ``kl/<generator>``."""
    n_max = max(ns)
    model, tokenizer = run.load_generator(path)
    sampled = sample(run, model, tokenizer, prompts, n_max, seed=run.cfg.seed + 9, what="best-of-n samples")
    repeated = [p.prompt for p in prompts for _ in range(n_max)]
    proxy = score(run, discriminator, repeated, sampled).float().view(len(prompts), n_max).cpu()
    gold = torch.tensor(gold_reply_rates(run, repeated, sampled)).view(len(prompts), n_max)
    metrics = {}
    for n in ns:
        picks = proxy[:, :n].argmax(dim=1, keepdim=True)
        metrics[f"bon/gold/{n}"] = float(gold.gather(1, picks).mean())
        metrics[f"bon/proxy/{n}"] = float(proxy.gather(1, picks).mean())
        metrics[f"bon/kl/{n}"] = math.log(n) - (n - 1) / n
    return metrics


def stage_evaluate(run: Run) -> Dict[str, Any]:
    """Every generator the run has (initial, sft, aligned) on held-out prompts.

    Gold reply rate of sampled and greedy emails (the simulator's probabilities), mean discriminator reward, and
    KL(policy || reference) estimated on the policy's own samples as the mean of ``log pi(y|x) - log ref(y|x)``
    over the exact sampled tokens; the reference is the generator alignment started from (SFT, or the ``hf``
    checkpoint itself in a job without ``sft``).

    Each generator's result is cached beside its checkpoint (``eval-<key>.json``, keyed by everything it depends
    on), so the jobs of a sweep that share one ``stage.from_run`` evaluate the shared SFT model once.
    """
    from rlmf.evaluation import win_rate
    from rlmf.reference import model_fingerprint

    prompts = run.task.eval_prompts()
    discriminator_dir = run.finished_dir("discriminator")
    judge = run.cfg.evaluate.judge
    if judge is None and run.cfg.evaluate.judge_rows is not None:
        judge = run.require("judge") / "model"
    if judge:  # an independent reward model judges instead of the run's own discriminator
        discriminator_dir = Path(judge).parent
        discriminator = run.load_discriminator(Path(judge))
    else:
        discriminator = run.load_discriminator(discriminator_dir / "model") if discriminator_dir is not None else None
    checkpoints = generator_checkpoints(run)
    start_name = "sft" if "sft" in checkpoints else "initial" if "initial" in checkpoints else None
    start = checkpoints.get(start_name)
    reference = run.load_generator(start)[0] if start is not None else None
    g = run.cfg.generator
    settings = json.dumps(["metrics-v3", [p.to_row() for p in prompts],
                           run.task.setting("eval_samples_per_prompt", 1), g.max_new_tokens, g.temperature,
                           g.max_prompt_length, run.cfg.seed, run.task.name,
                           str(discriminator_dir and discriminator_dir.resolve()), run.cfg.evaluate.judge,
                           [p.to_row() for p in run.task.preference_pairs("eval") or []], run.cfg.algo.loss.get("beta"),
                           g.max_length,
                           start is not None and model_fingerprint(start), str(run.placement)])
    metrics: Dict[str, Any] = {}
    samples: Dict[str, List[str]] = {}
    rewards: Dict[str, List[List[float]]] = {}
    out = run.stage_dir("evaluate")
    for name, path in checkpoints.items():
        key = hashlib.sha256((settings + name + model_fingerprint(path)).encode()).hexdigest()[:16]
        # Beside the checkpoint when it is a directory of ours, so sweeps sharing it evaluate it once.
        cache = (Path(path).parent if Path(path).is_dir() else out) / f"eval-{name}-{key}.json"
        if cache.exists():
            result, samples[name], rewards[name] = json.loads(cache.read_text())
        else:
            result, samples[name], rewards[name] = evaluate_generator(run, name, path, prompts, discriminator,
                                                                      reference, start_name)
            write_atomic(cache, json.dumps([result, samples[name], rewards[name]]))
        metrics.update(result)
    for name in checkpoints:  # head to head against the generator alignment started from, on the same prompts
        if name != start_name and rewards.get(name) and rewards.get(start_name):
            metrics[f"winrate/{name}"], metrics[f"winrate_ci95/{name}"] = win_rate(rewards[name], rewards[start_name])
    if run.cfg.evaluate.best_of_n and "sft" in checkpoints and discriminator is not None and run.task.has_gold:
        ns = sorted(set(run.cfg.evaluate.best_of_n))
        key = hashlib.sha256((settings + json.dumps(ns) + model_fingerprint(checkpoints["sft"])).encode()).hexdigest()
        cache = Path(checkpoints["sft"]).parent / f"eval-best_of_n-{key[:16]}.json"  # shared like the SFT's own
        if not cache.exists():
            write_atomic(cache, json.dumps(best_of_n(run, checkpoints["sft"], prompts, discriminator, ns)))
        metrics.update(json.loads(cache.read_text()))
    out.mkdir(parents=True, exist_ok=True)
    texts = [p.prompt for p in prompts]
    first_rewards = {n: [r[0] for r in rewards[n]] for n in samples if rewards.get(n)}
    write_atomic(out / "samples.json", json.dumps({"prompts": texts, "samples": samples, "rewards": first_rewards},
                                                  indent=2))
    table: Dict[str, List[Any]] = {"prompt": texts}  # side by side: each generator's sample and its reward
    for n in samples:
        table[n] = samples[n]
        if n in first_rewards:
            table[f"reward/{n}"] = first_rewards[n]
    run.log_table("evaluate/samples", list(table), [list(row) for row in zip(*table.values())])
    mark_done(out, metrics)
    return metrics


STAGE_FUNCTIONS: Dict[str, Callable[[Run], Dict[str, Any]]] = {
    "sft": stage_sft,
    "feedback": stage_feedback,
    "discriminator": stage_discriminator,
    "align": stage_align,
    "evaluate": stage_evaluate,
    "judge": stage_judge,  # not a stage a job lists: evaluate's judge, run before it when evaluate.judge_rows is set
}


# Stages without a trainer.fit: rank 0 runs them, the other ranks wait and read its done.json.
MAIN_PROCESS_STAGES = ("feedback", "evaluate")


def run_pipeline(run: Run) -> Dict[str, Any]:
    """Run the configured stages in pipeline order, reusing finished ones; returns the merged metrics.

    With ``loop.rounds=N`` (N > 1) the stages ``feedback -> discriminator -> align`` run again for rounds 2..N, each
    in ``<run_dir>/round<r>/``: the previous round's aligned generator writes the completions the task's feedback
    source answers, the discriminator retrains on every round's feedback so far (``loop.discriminator``: warm from
    the previous round's, or from scratch), and the generator aligns from the previous round's. Their metrics are
    prefixed ``round<r>/``; ``evaluate`` runs once, last, over every round's generator.

    Each stage starts from its own seed (``seed + its index``, shifted per round), so its randomness does not depend
    on which earlier stages ran in this process or were reused from disk: a resumed job and a hand-off match an
    uninterrupted run.
    """
    wanted = [s for s in STAGES if s in run.cfg.stage.stages]
    for stage in wanted:
        if stage != "evaluate":
            run.results.update(_run_stage(run, stage))
    for r in range(2, run.cfg.loop.rounds + 1):
        later = run.for_round(r)
        for stage in ("feedback", "discriminator", "align"):
            if stage in wanted:
                run.results.update({f"round{r}/{k}": v for k, v in _run_stage(later, stage).items()})
    if "evaluate" in wanted:
        if run.cfg.evaluate.judge_rows is not None:
            run.results.update(_run_stage(run, "judge"))
        run.results.update(_run_stage(run, "evaluate"))
    return run.results


def _run_stage(run: Run, stage: str) -> Dict[str, Any]:
    """One stage of one round: reused when finished, else run (rank 0 alone for the stages without a fit)."""
    if stage == "feedback" and not run.task.has_feedback:
        log.info("stage feedback: skipped, task=%s brings its own preference data", run.task.name)
        return {}
    where = f"stage {stage}" + (f" (round {run.round})" if run.round > 1 else "")
    shared = run.shared_stage_dir(stage)
    if shared is None:
        return _run_stage_unshared(run, stage, where)
    # One job of the sweep computes a shared stage (config.validate keeps stage.cache_dir to one process per job);
    # a job with the same inputs waits here, then reuses it.
    with stage_lock(shared):
        if not (shared / "inputs.json").exists():
            write_atomic(shared / "inputs.json", json.dumps(stage_inputs(run.cfg, stage), indent=2, default=str))
        metrics = _run_stage_unshared(run, stage, where)
    link_shared_stage(run, stage, shared)
    return metrics


def _run_stage_unshared(run: Run, stage: str, where: str) -> Dict[str, Any]:
    finished = run.finished_dir(stage) if stage != "evaluate" else None
    if finished is not None:
        log.info("%s already finished in %s; reusing it", where, finished)
        return read_done(finished)
    log.info("%s: starting", where)
    seed = run.cfg.evaluate.judge_seed if stage == "judge" else run.seed(STAGES.index(stage))
    L.seed_everything(seed, workers=True, verbose=False)
    fn = STAGE_FUNCTIONS[stage]
    if stage in MAIN_PROCESS_STAGES:
        if not is_main_process():
            log.info("%s: this rank waits for rank 0 and reads its results", where)
        with main_process_first() as main:
            metrics = fn(run) if main else None
        return metrics if metrics is not None else read_done(run.stage_dir(stage))
    return fn(run)
