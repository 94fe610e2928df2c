"""The discriminator stage (the reward model, trained on the feedback or the task's pairs) and the evaluation's
independent judge (``evaluate.judge_rows``), both by :func:`fit_discriminator`."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from rlmf.data import load_feedback, load_pairs, pairs_to_feedback, read_written
from rlmf.data.loading import RowsDataModule
from rlmf.distributed import is_main_process
from rlmf.modules.build import build_discriminator
from rlmf.modules.discriminator import Discriminator, pairwise_accuracy
from rlmf.run import Run
from rlmf.trainer import stage_steps, train_stage

log = logging.getLogger(__name__)


def stage_discriminator(run: Run) -> Dict[str, Any]:
    """Train the reward model on the feedback stage's A/B pairs (or thumbs), or on the task's own pairs; report
    its held-out pairwise accuracy."""
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
        heldout = read_written(feedback / "heldout_pairs.jsonl")
    if run.round > 1 and run.cfg.loop.discriminator == "warm":  # continue from the previous round's
        module = Discriminator.load(run.for_round(run.round - 1).require("discriminator") / "model").train()
    else:
        module = build_discriminator(run.cfg)
    return fit_discriminator(run, "discriminator", module, train_rows, heldout, run.cfg.seed)


def stage_judge(run: Run) -> Dict[str, Any]:
    """The evaluation's independent judge (``evaluate.judge_rows``): a discriminator trained on those rows of
    ``task.train``, which neither the policy nor its reward model trains on, for ``evaluate.judge_max_epochs``
    passes. Held out: all of the task's own pairs (its train and eval pairs), none of which the judge sees: many
    more than the eval pairs alone (ten times as many when the eval pairs are the last tenth of ``task.rows``), so
    its accuracy is measured to a few points rather than a dozen."""
    e = run.cfg.evaluate
    rows = run.task.rows(e.judge_rows)
    train_rows = pairs_to_feedback(rows) if run.cfg.discriminator.objective == "thumbs" else rows
    heldout = run.task.preference_pairs("train") + run.task.preference_pairs("eval")
    return fit_discriminator(run, "judge", build_discriminator(run.cfg), train_rows, heldout, e.judge_seed,
                             epochs=e.judge_max_epochs, validate=False)


def fit_discriminator(run: Run, stage: str, module: Discriminator, train_rows: List[Any], heldout: List[Any],
                      seed: int, epochs: Optional[int] = None, validate: bool = True) -> Dict[str, Any]:
    """Train ``module`` on ``train_rows`` (batches drawn with ``seed``) for ``epochs`` passes (None:
    ``discriminator.max_epochs``), save it in ``<stage dir>/model`` and report its pairwise accuracy on ``heldout``
    before and after, as ``<stage>/accuracy`` (and ``<stage>/heldout_pairs``, how many). ``validate``: also run
    Lightning's validation loop (loss and accuracy logged) on ``heldout`` after every epoch."""
    d = run.cfg.discriminator
    data = RowsDataModule(train_rows, heldout, module.training_collator(), d.batch_size, seed=seed,
                          num_workers=run.cfg.trainer.num_workers, val_collate=module.validation_collator())
    steps = stage_steps(run, (epochs or d.max_epochs) * data.batches_per_epoch())

    def accuracy() -> float:
        if not heldout or not is_main_process():
            return float("nan")
        run.placement.put(module)  # Lightning hands the module back on the CPU after fit
        with run.placement.inference():
            return pairwise_accuracy(module, heldout)

    return train_stage(
        run, stage, module, data, steps, validate=validate and bool(heldout),
        measure_before=lambda trainer: {f"{stage}/accuracy_before_training": accuracy()},
        measure=lambda trainer: {f"{stage}/accuracy": accuracy(), f"{stage}/train_rows": len(train_rows),
                                 f"{stage}/heldout_pairs": len(heldout),
                                 f"{stage}/steps": steps},
        save=lambda out: module.save(out / "model"))
