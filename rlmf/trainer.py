"""Lightning for the stages: the Trainer a stage gets, its length, and the one sequence every training stage runs.

:func:`train_stage` is that sequence: build the trainer, fit (resuming from the stage's own ``last.ckpt`` when a run
was interrupted mid-stage), measure, then on rank 0 save the result and write ``done.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import lightning as L
from omegaconf import DictConfig

from rlmf.distributed import main_process_first
from rlmf.modules.guard import NonFiniteGuard
from rlmf.placement import resolve_precision
from rlmf.resume import AtomicCheckpointIO, RandomState, SaveOnInterrupt, fit
from rlmf.run import Run
from rlmf.stage_cache import mark_done

Metrics = Dict[str, Any]


def stage_steps(run: Run, steps: int) -> int:
    """``steps`` capped by ``trainer.max_steps`` (when positive)."""
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


def train_stage(run: Run, stage: str, module: L.LightningModule, data: L.LightningDataModule, steps: int, *,
                save: Callable[[Path], None], measure: Callable[[L.Trainer], Metrics] = lambda trainer: {},
                measure_before: Callable[[L.Trainer], Metrics] = lambda trainer: {}, validate: bool = True,
                manual_optimisation: bool = False) -> Metrics:
    """Fit ``module`` on ``data`` for ``steps`` optimiser steps as ``stage``, and finish the stage.

    ``measure_before(trainer)`` runs before the fit and ``measure(trainer)`` after it (both on every rank); their
    metrics are the stage's. Then rank 0 calls ``save(<stage dir>)`` and writes ``done.json`` while the other ranks
    wait (:func:`rlmf.distributed.main_process_first`). A run interrupted mid-stage resumes from the stage's own
    ``last.ckpt`` (:func:`resume_checkpoint`).
    """
    trainer = make_trainer(run, stage, steps, validate=validate, manual_optimisation=manual_optimisation)
    before = measure_before(trainer)
    fit(trainer, module, stage, datamodule=data, ckpt_path=resume_checkpoint(run, stage))
    metrics = {**before, **measure(trainer)}
    out = run.stage_dir(stage)
    with main_process_first() as main:
        if main:
            save(out)
            mark_done(out, metrics)
    return metrics
