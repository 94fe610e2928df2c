"""The main job: sft -> feedback -> discriminator -> align -> evaluate, in order, over rounds, reusing what is done.

Each stage (:mod:`rlmf.stages`) writes its outputs under ``<run_dir>/<stage>/`` and a ``done.json`` last. A stage
whose ``done.json`` exists in the run directory (a resumed run) or in ``stage.from_run`` (a hand-off from an earlier
run) is not run again: its outputs are used as they are. So ``stage=sft`` then ``stage=align stage.from_run=<that
run>`` hands a checkpoint from one job to the next, and re-running a crashed job in its own directory resumes it.
With ``stage.cache_dir`` the jobs of a sweep share their sft, feedback and discriminator stages (and the align
stage's round of machine feedback) by content (:mod:`rlmf.stage_cache`). Under DDP every rank runs the training
stages; rank 0 alone runs the others while the rest wait for its ``done.json``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Dict

import lightning as L

from rlmf.config import STAGES
from rlmf.distributed import is_main_process, main_process_first
from rlmf.files import write_atomic
from rlmf.run import Run
from rlmf.stage_cache import link_shared_stage, read_done, stage_inputs, stage_lock
from rlmf.stages.align import stage_align
from rlmf.stages.discriminator import stage_discriminator, stage_judge
from rlmf.stages.evaluate import stage_evaluate
from rlmf.stages.feedback import stage_feedback
from rlmf.stages.sft import stage_sft

log = logging.getLogger(__name__)

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
    link_shared_stage(run.run_dir, stage, shared)
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
