"""The align stage's round of machine feedback: the generator samples, the run's reward judges, pairs and thumbs
come out.

:func:`machine_feedback` ranks each prompt's samples (best vs worst, :mod:`rlmf.feedback.ranking`) or, with
``feedback.pairs=clair``, pairs a sample with its minimal revision (:func:`clair_feedback`,
:mod:`rlmf.feedback.revise`);
:func:`round_feedback` makes the round's data once (rank 0) and writes it beside the align stage for the other ranks
and for a resumed run. Sampling goes through the run (:meth:`rlmf.run.Run.sample`), on its placement.
"""

from __future__ import annotations

import contextlib
import json
from typing import Dict, List, Tuple

from rlmf.data import FeedbackExample, PreferencePair, load_feedback, load_pairs, read_written, write_jsonl
from rlmf.distributed import main_process_first
from rlmf.feedback.ranking import best_worst_feedback
from rlmf.feedback.revise import GuidedReviser, LLMReviser, edit_distance
from rlmf.files import write_atomic
from rlmf.run import Run
from rlmf.stage_cache import stage_lock


def machine_feedback(run: Run, model, tokenizer, reward) -> Tuple[list, list, Dict[str, float]]:
    """One RLMF round's data: k samples per training prompt, ranked by ``reward`` (``reward=``: the trained
    discriminator by default, or a classifier, a judge, a function, an ensemble: :mod:`rlmf.rewards`).

    Best-vs-worst becomes a preference pair; the best is a thumbs-up and the worst a thumbs-down. Samples the reward
    could not score (a judge's unparseable answer) take no part in the ranking and are counted.
    """
    if run.cfg.feedback.pairs == "ab":
        return task_feedback(run)
    k = run.task.setting("align_samples_per_prompt", 4)
    prompt_rows = run.task.train_prompts()
    prompts = [p.prompt for p in prompt_rows]
    samples = run.sample(model, tokenizer, prompt_rows, k, seed=run.seed(4), what="RLMF round samples")
    if run.cfg.feedback.pairs == "clair":
        return clair_feedback(run, model, tokenizer, reward, prompts, samples[::k])
    scored = reward.score_with_validity([p for p in prompts for _ in range(k)], samples)
    pairs, thumbs = best_worst_feedback(prompts, samples, scored.scores, scored.valid, k,
                                        chosen_rank=run.cfg.feedback.chosen_rank)
    stats = {"align/pairs": len(pairs), "align/unscored_samples": int((~scored.valid).sum()),
             **{f"align/{name}": float(value) for name, value in scored.metrics.items()}}
    if not run.task.has_gold:
        return pairs, thumbs, stats
    gold = run.task.gold([p for p in prompts for _ in range(k)], samples)
    stats[f"align/sample_gold_{run.task.metric_name}"] = sum(gold) / len(gold)
    stats.update(chosen_rejected_gold(run, pairs))
    return pairs, thumbs, stats


def task_feedback(run: Run) -> Tuple[list, list, Dict[str, float]]:
    """``feedback.pairs=ab``: the feedback stage's own A/B pairs and thumbs (the task's feedback source's answers
    to the SFT model's completions, :func:`rlmf.feedback.ab.ab_feedback`), with no reward model in between: DPO
    directly on the feedback, the third recipe of the RLHF / RLAIF / DPO comparison."""
    feedback = run.require("feedback")
    pairs = load_pairs(feedback / "pairs.jsonl")[0]
    thumbs = load_feedback(feedback / "thumbs.jsonl")[0]
    return pairs, thumbs, {"align/pairs": len(pairs)}


def clair_feedback(run: Run, model, tokenizer, reward, prompts: List[str], originals: List[str]
                   ) -> Tuple[list, list, Dict[str, float]]:
    """CLAIR pairs (``feedback.pairs=clair``; :mod:`rlmf.feedback.revise`): each prompt's first sample and its
    minimal revision, the revision chosen. Thumbs: the revision up, the sample down. Reports how many samples were
    revised, the mean normalised edit distance of the pairs and, with a gold metric, chosen vs rejected gold."""
    f, g = run.cfg.feedback, run.cfg.generator
    if f.reviser == "guided":
        def rewrite(prompts_: List[str], prefixes: List[str]) -> List[str]:
            return run.generate(model, tokenizer, [p + x for p, x in zip(prompts_, prefixes)], max_new_tokens=24,
                                do_sample=True, temperature=g.temperature, seed=run.seed(7),
                                max_prompt_length=g.max_prompt_length)

        reviser = GuidedReviser(reward.score_with_validity, rewrite)
    else:
        llm, llm_tokenizer = (model, tokenizer) if f.reviser_path is None else run.load_generator(f.reviser_path)

        def answer(texts: List[str]) -> List[str]:
            return run.greedy(llm, llm_tokenizer, texts)

        reviser = LLMReviser(answer)
    revisions = reviser(prompts, originals)
    pairs = [PreferencePair(p, r, o) for p, o, r in zip(prompts, originals, revisions) if r is not None]
    if not pairs:
        why = ("no one-line edit scored above its original" if f.reviser == "guided" else
               "every answer was empty or the sample unchanged")
        raise RuntimeError(f"feedback.pairs=clair: the {f.reviser} reviser revised none of the {len(prompts)} samples "
                           f"({why}); point feedback.reviser_path at a model that can revise, or use "
                           "feedback.reviser=guided or feedback.pairs=best_worst")
    thumbs = [x for pair in pairs for x in (FeedbackExample(pair.prompt, pair.chosen, True),
                                            FeedbackExample(pair.prompt, pair.rejected, False))]
    stats = {"align/pairs": len(pairs), "align/clair/revised_fraction": len(pairs) / max(1, len(prompts)),
             "align/clair/edit_distance": sum(edit_distance(p.chosen, p.rejected) for p in pairs) / max(1, len(pairs))}
    if run.task.has_gold:
        stats.update(chosen_rejected_gold(run, pairs))
    return pairs, thumbs, stats


def chosen_rejected_gold(run: Run, pairs: List[PreferencePair]) -> Dict[str, float]:
    """The task's mean gold metric of the pairs' chosen and of their rejected completions."""
    metric, prompts = run.task.metric_name, [p.prompt for p in pairs]
    chosen = run.task.gold(prompts, [p.chosen for p in pairs])
    rejected = run.task.gold(prompts, [p.rejected for p in pairs])
    return {f"align/chosen_gold_{metric}": sum(chosen) / max(1, len(chosen)),
            f"align/rejected_gold_{metric}": sum(rejected) / max(1, len(rejected))}


def round_feedback(run: Run, model, tokenizer) -> Tuple[list, list, Dict[str, float]]:
    """This round's machine feedback, made once: rank 0 samples and ranks (:func:`machine_feedback`) and writes
    ``align/pairs.jsonl``, ``thumbs.jsonl`` and ``feedback.json``; the other ranks, and a resumed run, read them.

    With ``stage.cache_dir`` the jobs of a sweep that would make the same round (same seed, SFT model, reward, task
    sizes and pair construction; :func:`rlmf.stage_cache.stage_key`) share it: one makes it under a lock, the others
    read it (``<cache_dir>/align_feedback-<key>/``)."""
    shared = run.shared_feedback_dir()
    out = shared if shared is not None else run.stage_dir("align")
    stats_file = out / "feedback.json"
    with main_process_first() as main, (stage_lock(out) if shared is not None else contextlib.nullcontext()):
        if main and not stats_file.exists():
            reward = run.load_reward()
            pairs, thumbs, stats = machine_feedback(run, model, tokenizer, reward)
            del reward
            write_jsonl(out / "pairs.jsonl", pairs)
            write_jsonl(out / "thumbs.jsonl", thumbs)
            write_atomic(stats_file, json.dumps(stats))  # last: its presence means the round's data is whole
    if not stats_file.exists():
        raise RuntimeError(f"rank has no round feedback in {out}: rank 0 should have written it before training")
    stats = json.loads(stats_file.read_text())
    return read_written(out / "pairs.jsonl"), read_written(out / "thumbs.jsonl", "thumbs"), stats
