"""The feedback stage: the task's own feedback source (the embedded task: simulated recipients) answers the SFT
generator's completions, and the answers become preference pairs and thumbs."""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, List

from rlmf.data import write_jsonl
from rlmf.feedback.ab import ab_feedback, bandit_feedback, gold_ordered_pairs
from rlmf.run import Run
from rlmf.stage_cache import mark_done

log = logging.getLogger(__name__)


def stage_feedback(run: Run) -> Dict[str, Any]:
    """A/B feedback from the task's feedback source on the SFT generator's completions.

    For each feedback prompt the SFT generator writes ``feedback_samples_per_prompt`` completions and the task answers
    each (:meth:`rlmf.tasks.base.Task.feedback`). Each answered completion is paired with an unanswered one for the
    same prompt (``pairs.jsonl``), and every completion with its answer is a thumbs row (``thumbs.jsonl``):
    :func:`rlmf.feedback.ab.ab_feedback`; with ``loop.allocation`` other than uniform, or a budget or weighting, the
    sends follow a bandit (:func:`rlmf.feedback.ab.bandit_feedback`). With a gold metric, ``heldout_pairs.jsonl``
    holds completions for held-out prompts ordered by it: evaluation data for the discriminator, never trained on.
    """
    task, metric = run.task, run.task.metric_name
    model, tokenizer = run.load_generator(run.require("sft") / "generator" if run.round == 1
                                          else run.starting_generator())
    k = task.setting("feedback_samples_per_prompt", 4)
    prompt_rows = task.feedback_prompts()
    prompts = [p.prompt for p in prompt_rows]
    completions = run.sample(model, tokenizer, prompt_rows, k, seed=run.seed(1), what="feedback samples")
    repeated = [p for p in prompts for _ in range(k)]
    loop = run.cfg.loop
    budget = loop.sends_per_prompt or k
    ab_metrics: Dict[str, Any] = {}
    if loop.allocation == "uniform" and budget == k and loop.weighting == "none":  # one send per candidate
        answers = task.feedback(repeated, completions, random.Random(run.seed(2)))
        pairs, thumbs = ab_feedback(repeated, completions, answers, k)
        sends, answered = len(answers), sum(answers)
    else:
        pairs, thumbs, tests = bandit_feedback(task, prompts, completions, k, budget, loop.allocation,
                                               loop.weighting == "posterior", random.Random(run.seed(2)),
                                               random.Random(run.seed(6)))
        write_jsonl(run.stage_dir("feedback") / "ab_tests.jsonl", tests)
        sends, answered = sum(sum(t["sends"]) for t in tests), sum(sum(t["replies"]) for t in tests)
        ab_metrics["feedback/mean_pair_weight"] = sum(p.weight for p in pairs) / max(1, len(pairs))
        if task.has_gold:
            ab_metrics["feedback/regret"] = sum(t["regret"][-1] for t in tests if t["regret"])
    heldout_pairs = heldout_gold_pairs(run, model, tokenizer) if task.has_gold else []
    if not pairs:
        raise RuntimeError(
            "feedback gave no training pairs: the SFT generator's completions drew too few positive answers to "
            "compare. Train SFT longer (generator.sft.max_steps) or ask for more feedback (task.feedback_prompts, "
            "task.feedback_samples_per_prompt).")
    if not heldout_pairs:
        log.warning("no held-out pair differs in the gold %s; discriminator accuracy will be NaN", metric)
    out = run.stage_dir("feedback")
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "thumbs.jsonl", thumbs)
    write_jsonl(out / "heldout_pairs.jsonl", heldout_pairs)
    metrics = {"feedback/pairs": len(pairs), "feedback/thumbs": len(thumbs), "feedback/sends": sends,
               f"feedback/observed_{metric}": answered / max(1, sends),
               "feedback/heldout_pairs": len(heldout_pairs), **ab_metrics}
    mark_done(out, metrics)
    return metrics


def heldout_gold_pairs(run: Run, model, tokenizer) -> List[Any]:
    """Two completions of each held-out prompt, ordered by the task's gold metric (ties left out)."""
    heldout = run.task.eval_prompts()
    completions = run.sample(model, tokenizer, heldout, 2, seed=run.seed(3))
    texts = [p.prompt for p in heldout for _ in range(2)]
    return gold_ordered_pairs(texts, completions, run.task.gold(texts, completions))
