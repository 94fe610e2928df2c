"""Finished stages and their content keys: ``done.json``, and sharing a stage between the jobs of a sweep.

A stage is finished when its directory holds ``done.json`` (written last, atomically: :func:`mark_done`). With
``stage.cache_dir`` the jobs of a sweep share their sft, feedback and discriminator stages, the evaluation's judge
and the align stage's round of machine feedback by content: a stage's directory is named by :func:`stage_key`, a
hash of the config it reads (:data:`STAGE_INPUTS`) and of the keys of the steps before it, so two jobs meet in one
directory exactly when they would compute the same thing. One job computes it under :func:`stage_lock`; the others
wait, then read it. The evaluation caches each generator's result under the same kind of key (:func:`content_key`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterable

from omegaconf import DictConfig, OmegaConf

from rlmf.files import exclusive_lock, write_atomic

SHARED_STAGES = ("sft", "feedback", "discriminator", "judge")
# ... and the align stage's round of machine feedback (rlmf.stages.align.round_feedback): the SFT model's samples
# ranked by the reward, the same for every algorithm and loss setting of a seed.
SHARED_STEPS = ("sft", "feedback", "discriminator", "align_feedback")
# The config each shared step reads, besides the steps before it (their keys are chained into its own). A task key
# a stage never reads is left out, so that e.g. an ablation over task.align_prompts still shares the SFT model.
STAGE_INPUTS = {
    "sft": ("seed", "task", "generator", "trainer"),
    "feedback": ("task", "loop.allocation", "loop.sends_per_prompt", "loop.weighting"),
    "discriminator": ("discriminator",),
    # The evaluation's judge (evaluate.judge_rows) reads no earlier stage and not the job's seed: one per sweep.
    "judge": ("discriminator", "task", "evaluate.judge_rows", "evaluate.judge_seed", "evaluate.judge_max_epochs",
              "trainer"),
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


def content_key(what: str, inputs: Any) -> str:
    """The content address of a result: sha256 of ``what`` it is and everything it is computed from (``inputs``,
    plain data; JSON with sorted keys, anything else by ``str``). The one key scheme of the project: shared stages
    (:func:`stage_key`) and the evaluation's per-generator results use it."""
    blob = json.dumps({"stage": what, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def source_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 of the given source files: a key of a result cached across runs that should change when the code that
    computes it changes (the evaluation's metrics), without a hand-kept version string."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


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
    """A content address for a shared stage: :func:`content_key` of its inputs and of the keys of the stages before
    it, so two jobs get the same key exactly when the stage would compute the same thing (the code is not part of
    the key: share a cache directory between sweeps only with unchanged code)."""
    previous = SHARED_STEPS[:SHARED_STEPS.index(stage)] if stage in SHARED_STEPS else ()
    return content_key(stage, {"inputs": stage_inputs(cfg, stage), "after": [stage_key(cfg, s) for s in previous]})


def stage_lock(directory: Path):
    """An exclusive lock on ``<directory>.lock`` (:func:`rlmf.files.exclusive_lock`): one job computes a shared stage
    while the others wait, then find its ``done.json``. A killed job never blocks the sweep."""
    return exclusive_lock(directory.with_name(directory.name + ".lock"))


def link_shared_stage(run_dir: Path, stage: str, shared: Path) -> None:
    """``<run_dir>/<stage>`` -> the shared directory, so the job directory reads like an unshared one (and works as
    a ``stage.from_run``)."""
    link = run_dir / stage
    if (shared / "done.json").exists() and not link.exists() and not link.is_symlink():
        try:
            link.symlink_to(shared.resolve(), target_is_directory=True)
        except FileExistsError:  # pragma: no cover - a resumed job that linked it already
            pass


def mark_done(directory: Path, metrics: Dict[str, Any]) -> None:
    """Write the stage's ``done.json`` (its metrics), last and atomically: its presence means the stage is whole."""
    write_atomic(directory / "done.json", json.dumps(metrics, indent=2, sort_keys=True))


def read_done(directory: Path) -> Dict[str, Any]:
    return json.loads((directory / "done.json").read_text())
