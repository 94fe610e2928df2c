"""The align stage: the generator learns with ``algo``, offline from a round of pairs or thumbs, or online from its
own samples scored by the run's reward."""

from __future__ import annotations

import math
import random
from typing import Any, Dict, List, Tuple

from rlmf.data import log_data_report, pairs_to_feedback, tokenize_feedback, tokenize_pairs
from rlmf.data.alignment import AlignmentDataModule, with_mismatched_completions
from rlmf.data.collate import OnlinePromptCollator
from rlmf.data.loading import RowsDataModule
from rlmf.data.tokenization import tokenize_prompts
from rlmf.distributed import main_process_first
from rlmf.feedback.ranking import drop_desirable
from rlmf.losses import get_loss, loss_inputs
from rlmf.models import save_generator
from rlmf.modules.build import build_aligned_generator, build_online_generator
from rlmf.modules.online import needs_reference
from rlmf.reference import attach_precomputed, frozen_copy, prepare_reference
from rlmf.run import Run
from rlmf.stages.align_feedback import round_feedback
from rlmf.trainer import optimiser_steps, train_stage

# Online metrics the stage reports (from the last rollout), under ``align/train/``.
ONLINE_REPORTED = ("reward", "kl", "objective/kl", "objective/entropy", "invalid_rewards")


def stage_align(run: Run) -> Dict[str, Any]:
    """One RLMF round: the starting generator samples, the discriminator ranks, the generator learns with ``algo``.

    A task that brings its own pairs (``task=preference_files``) gives the feedback as they are. The starting
    generator is the SFT model, or a ``generator=hf`` checkpoint as it is when the job has no ``sft`` stage
    (:meth:`rlmf.run.Run.starting_generator`). Online objectives go to :func:`align_online`.
    """
    a, g = run.cfg.algo, run.cfg.generator
    start = run.starting_generator()
    model, tokenizer = run.load_generator(start)
    loss = get_loss(a.name)
    data_format = loss.data_format
    if data_format == "online":
        return align_online(run, model, tokenizer)
    splits, drops, stats = alignment_data(run, model, tokenizer, data_format)
    reference_mode = a.reference if loss.requires_reference else "none"
    if reference_mode == "precomputed":
        with main_process_first(), run.placement.inference():  # rank 0 fills the cache, the others read it
            cache, hit = attach_precomputed(
                model, start, splits, "paired" if data_format == "paired_online" else data_format,
                tokenizer.pad_token_id, a.reference_cache_dir, placement=run.placement, packing=g.packing)
        stats["align/reference_cache_hit"] = float(hit)
    policy, reference = prepare_reference(reference_mode, model, a.lora_rank, data_format)
    module = build_aligned_generator(run.cfg, policy, tokenizer, reference, reference_mode)
    opt = a.optim
    data = AlignmentDataModule(splits["train"], splits["validation"], data_format, tokenizer.pad_token_id,
                               g.max_length, opt.batch_size, seed=run.cfg.seed,
                               num_workers=run.cfg.trainer.num_workers, max_tokens=opt.max_tokens)
    steps = optimiser_steps(run, opt, data.batches_per_epoch(opt.max_epochs or 1))

    def save(out) -> None:
        trained = module.model.merge_and_unload() if reference_mode == "lora" else module.model
        save_generator(trained, tokenizer, out / "generator")

    return train_stage(
        run, "align", module, data, steps, save=save,
        measure=lambda trainer: {
            **stats, **drops.as_dict("align/data/"), "align/steps": steps,
            "align/val_loss": float(trainer.callback_metrics.get("align/val/loss", float("nan")))})


def alignment_data(run: Run, model, tokenizer, data_format: str) -> Tuple[Dict[str, List[Any]], Any, Dict[str, Any]]:
    """The offline objective's training and validation rows (``{"train": ..., "validation": ...}``, tokenised for
    ``data_format``), what tokenising dropped, and the round's feedback statistics.

    The task's own pairs when it has them (its eval pairs validate); else this round's machine feedback
    (:func:`rlmf.stages.align_feedback.round_feedback`), a tenth of it held out for validation.
    """
    a, g = run.cfg.algo, run.cfg.generator

    def tokenize(pairs, thumbs):
        if data_format == "unpaired":
            features, drops = tokenize_feedback(thumbs, tokenizer, g.max_length, g.max_prompt_length)
            if "policy_kl_logps" in loss_inputs(a.name):  # KTO's reference point: fixed mismatched rows
                features = with_mismatched_completions(features, g.max_length)
            return features, drops
        return tokenize_pairs(pairs, tokenizer, g.max_length, g.max_prompt_length)

    if run.task.preference_pairs("train") is not None:  # the task's own pairs are the feedback
        stats: Dict[str, Any] = {}
        pairs = run.task.preference_pairs("train")
        thumbs = pairs_to_feedback(pairs)
        train, drops = tokenize(pairs, thumbs)
        eval_pairs = run.task.preference_pairs("eval")
        validation, _ = tokenize(eval_pairs, pairs_to_feedback(eval_pairs))
    else:
        pairs, thumbs, stats = round_feedback(run, model, tokenizer)
        if run.cfg.feedback.drop_desirable > 0:
            pairs, thumbs, dropped = drop_desirable(pairs, thumbs, run.cfg.feedback.drop_desirable,
                                                    random.Random(run.seed(8)))
            stats = {**stats, "align/dropped_desirable": dropped}
        stats = {**stats, "align/kept_pairs": len(pairs), "align/kept_thumbs": len(thumbs)}
        features, drops = tokenize(pairs, thumbs)
        n_val = max(1, len(features) // 10)
        train, validation = features[n_val:], features[:n_val]
    log_data_report("alignment data", thumbs if data_format == "unpaired" else pairs, tokenizer, drops)
    return {"train": train, "validation": validation}, drops, stats


def align_online(run: Run, model, tokenizer) -> Dict[str, Any]:
    """The align stage for the online algorithms (``algo=ppo|grpo|rloo|online_dpo|...``): no round of offline
    pairs; the policy samples ``algo.online.num_generations`` completions for each training prompt during training,
    and the run's ``reward=`` scores them (:class:`rlmf.modules.online.OnlineGenerator`).

    Training prompts: the task's (:meth:`rlmf.tasks.base.Task.train_prompts`).
    ``algo.optim.max_steps`` (or ``max_epochs``) counts rollouts (training batches of ``algo.optim.batch_size``
    prompts); each rollout makes ``num_iterations * ceil(rows / minibatch_size)`` optimiser steps, and
    ``align/steps`` reports optimiser steps. With a gold metric (never shown to the policy) every rollout's is
    logged as ``align/train/gold/<metric>``, for curves against steps.
    """
    a, g, o, opt = run.cfg.algo, run.cfg.generator, run.cfg.algo.online, run.cfg.algo.optim
    prompts = run.task.train_prompts()
    features = tokenize_prompts(prompts, tokenizer, g.max_prompt_length)
    rows = [{**f, "prompt": p.prompt} for f, p in zip(features, prompts)]
    reward = run.load_reward()
    gold = f"gold/{run.task.metric_name}"

    def gold_monitor(prompts: List[str], completions: List[str]) -> Dict[str, float]:
        values = run.task.gold(prompts, completions)
        return {gold: sum(values) / len(values)}

    module = build_online_generator(
        run.cfg, model, tokenizer, reward.score_with_validity,
        reference=frozen_copy(model) if needs_reference(a.name, o.kl_coef) else None,
        monitor=gold_monitor if run.task.has_gold else None)
    completions = min(opt.batch_size, len(rows)) * o.num_generations  # every batch is whole (drop_last)
    updates = o.num_iterations * math.ceil(completions / (o.minibatch_size or completions))  # per rollout
    data = RowsDataModule(rows, [], OnlinePromptCollator(tokenizer.pad_token_id), opt.batch_size, seed=run.cfg.seed,
                          num_workers=run.cfg.trainer.num_workers, steps_per_batch=updates)
    rollouts = optimiser_steps(run, opt, data.batches_per_epoch())
    steps = rollouts * updates
    reported = {f"align/train/{name}" for name in (*ONLINE_REPORTED, gold)}
    return train_stage(
        run, "align", module, data, steps, validate=False, manual_optimisation=True,
        measure=lambda trainer: {"align/steps": steps, "align/rollouts": rollouts, "align/prompts": len(rows),
                                 **{k: float(v) for k, v in trainer.callback_metrics.items() if k in reported}},
        save=lambda out: save_generator(module.model, tokenizer, out / "generator"))  # the policy: no value head
