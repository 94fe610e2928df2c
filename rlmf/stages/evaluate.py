"""The evaluate stage: every generator the run has (initial, sft, aligned, later rounds) on held-out prompts and
pairs, judged by the run's discriminator or an independent judge, side by side in ``samples.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from rlmf.data import FeedbackCollator, tokenize_pairs
from rlmf.evaluation import pair_metrics, win_rate
from rlmf.files import write_atomic
from rlmf.logprobs import batched_completion_logps
from rlmf.reference import model_fingerprint
from rlmf.run import Run
from rlmf.stage_cache import content_key, mark_done, source_fingerprint

# The code an evaluation result depends on: part of its cache key, so a changed metric is never read from a cache.
EVALUATION_CODE = (Path(__file__), Path(__file__).parents[1] / "evaluation.py")


def standard_error(groups: List[List[float]]) -> float:
    """The standard error of the mean of a metric measured on ``groups`` (a prompt's samples each): the sample
    standard deviation of the prompts' means over sqrt(number of prompts). Samples of one prompt are not independent
    draws of the evaluation (they share the prompt), so the prompt is the unit; NaN with fewer than two prompts."""
    means = [sum(g) / len(g) for g in groups]
    if len(means) < 2:
        return float("nan")
    mean = sum(means) / len(means)
    return math.sqrt(sum((m - mean) ** 2 for m in means) / (len(means) - 1) / len(means))


def gold_metrics(run: Run, name: str, model, tokenizer, prompts: List[Any], sampled: List[str], k: int
                 ) -> Dict[str, float]:
    """The task's gold metric of the ``k`` sampled completions per prompt and of one greedy completion each, with
    their standard errors over prompts: ``gold/<metric>/<name>``, ``gold/<metric>_se/<name>``,
    ``gold/<metric>_greedy/<name>``, ``gold/<metric>_greedy_se/<name>``."""
    metric, texts = run.task.metric_name, [p.prompt for p in prompts]
    greedy = run.greedy(model, tokenizer, prompts)
    values = run.task.gold([p for p in texts for _ in range(k)], sampled)
    greedy_values = run.task.gold(texts, greedy)
    return {f"gold/{metric}/{name}": sum(values) / len(values),
            f"gold/{metric}_se/{name}": standard_error([values[i:i + k] for i in range(0, len(values), k)]),
            f"gold/{metric}_greedy/{name}": sum(greedy_values) / len(greedy_values),
            f"gold/{metric}_greedy_se/{name}": standard_error([[v] for v in greedy_values])}


def evaluate_generator(run: Run, name: str, path: str | Path, prompts: List[Any], discriminator, reference,
                       start_name: Optional[str] = None
                       ) -> Tuple[Dict[str, float], List[str], List[List[float]]]:
    """One generator's metrics on ``prompts``, one sampled completion per prompt, and the discriminator's rewards of
    every sample grouped by prompt (``[P][k]``; empty without a discriminator).

    ``length/<name>``: mean sampled completion length in tokens. With held-out pairs (``task.preference_pairs``),
    ``heldout/...`` metrics (:func:`rlmf.evaluation.pair_metrics`; the implicit-reward ones against ``reference``
    for every generator but ``start_name``, the one alignment started from). With a gold metric,
    :func:`gold_metrics`; their standard errors are the evaluation's own noise, against which arms are compared.

    ``kl/<name>`` estimates KL(policy || reference) on the policy's own samples, both scored at the temperature
    the samples were drawn at (``generator.temperature``), i.e. the KL between the distributions sampled.
    """
    g = run.cfg.generator
    k = run.task.setting("eval_samples_per_prompt", 1)
    sampled_prompts = [p.prompt for p in prompts for _ in range(k)]
    model, tokenizer = run.load_generator(path)
    sampled, ids = run.sample(model, tokenizer, prompts, k, seed=run.cfg.seed + 5, return_token_ids=True,
                              what=f"evaluating {name}")
    metrics: Dict[str, float] = {}
    if run.task.has_gold:
        metrics.update(gold_metrics(run, name, model, tokenizer, prompts, sampled, k))
    metrics[f"length/{name}"] = sum(len(c) for _, c in ids) / max(len(ids), 1)
    rewards: List[List[float]] = []
    if discriminator is not None:
        flat = run.score(discriminator, sampled_prompts, sampled).float().cpu().tolist()
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
    with the highest discriminator reward is its pick. ``bon/gold/<n>``: the picks' mean gold metric;
    ``bon/proxy/<n>``: their mean discriminator reward; ``bon/kl/<n>``: the analytic KL of best-of-n to the
    sampling policy, log n - (n - 1) / n (Stiennon et al. 2020), in nats per sample like ``kl/<generator>``."""
    n_max = max(ns)
    model, tokenizer = run.load_generator(path)
    sampled = run.sample(model, tokenizer, prompts, n_max, seed=run.cfg.seed + 9, what="best-of-n samples")
    repeated = [p.prompt for p in prompts for _ in range(n_max)]
    proxy = run.score(discriminator, repeated, sampled).float().view(len(prompts), n_max).cpu()
    gold = torch.tensor(run.task.gold(repeated, sampled)).view(len(prompts), n_max)
    metrics = {}
    for n in ns:
        picks = proxy[:, :n].argmax(dim=1, keepdim=True)
        metrics[f"bon/gold/{n}"] = float(gold.gather(1, picks).mean())
        metrics[f"bon/proxy/{n}"] = float(proxy.gather(1, picks).mean())
        metrics[f"bon/kl/{n}"] = math.log(n) - (n - 1) / n
    return metrics


def evaluation_judge(run: Run) -> Tuple[Any, Optional[Path]]:
    """The reward model that judges the samples and the directory of its stage: the independent judge
    (``evaluate.judge``, or the judge stage of ``evaluate.judge_rows``) when there is one, else the run's
    discriminator, else ``(None, None)``."""
    judge = run.cfg.evaluate.judge
    if judge is None and run.cfg.evaluate.judge_rows is not None:
        judge = run.require("judge") / "model"
    if judge:
        return run.load_discriminator(Path(judge)), Path(judge).parent
    found = run.finished_dir("discriminator")
    return (run.load_discriminator(found / "model") if found is not None else None), found


def evaluation_inputs(run: Run, prompts: List[Any], judge_dir: Optional[Path], start) -> Dict[str, Any]:
    """Everything a generator's evaluation result depends on besides the generator itself: its cache key's inputs
    (:func:`rlmf.stage_cache.content_key`), the code that computes it included."""
    g = run.cfg.generator
    return {"code": source_fingerprint(EVALUATION_CODE), "prompts": [p.to_row() for p in prompts],
            "samples_per_prompt": run.task.setting("eval_samples_per_prompt", 1),
            "generation": [g.max_new_tokens, g.temperature, g.max_prompt_length, g.max_length],
            "seed": run.cfg.seed, "task": run.task.name, "judge": str(judge_dir and judge_dir.resolve()),
            "judge_path": run.cfg.evaluate.judge,
            "pairs": [p.to_row() for p in run.task.preference_pairs("eval") or []],
            "beta": run.cfg.algo.loss.get("beta"), "start": start is not None and model_fingerprint(start),
            "placement": str(run.placement)}


def evaluation_cache_dir(run: Run, checkpoint: Path) -> Path:
    """Where a generator's evaluation result is kept, so the jobs sharing that generator evaluate it once: beside
    the checkpoint when it is a stage's output (an SFT model from ``stage.from_run`` or the shared stages), else
    among the sweep's shared stages (``stage.cache_dir``: a hub, local or ``.gguf`` start), else in this run's
    evaluate stage. Never beside a model the run did not write."""
    if checkpoint.is_dir() and (checkpoint.parent / "done.json").exists():
        return checkpoint.parent
    return run.shared_root() or run.stage_dir("evaluate")


def cached(path: Path, compute):
    """``compute()``'s JSON result, stored at ``path`` (atomically) the first time and read back after."""
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    write_atomic(path, json.dumps(result))
    return result


def stage_evaluate(run: Run) -> Dict[str, Any]:
    """Every generator the run has (initial, sft, aligned) on held-out prompts (:func:`evaluate_generator`), the
    aligned ones head to head against the one alignment started from (``winrate/<name>`` with its 95% interval),
    and best-of-n from the SFT generator (``evaluate.best_of_n``).

    The KL reference is the generator alignment started from (SFT, or the ``hf`` checkpoint itself in a job without
    ``sft``). Each generator's result is cached beside its checkpoint (``eval-<name>-<key>.json``, keyed by
    :func:`evaluation_inputs` and the generator's fingerprint), so the jobs of a sweep that share one SFT model
    evaluate it once.
    """
    prompts = run.task.eval_prompts()
    discriminator, judge_dir = evaluation_judge(run)
    checkpoints = run.generator_checkpoints()
    start_name = "sft" if "sft" in checkpoints else "initial" if "initial" in checkpoints else None
    start = checkpoints.get(start_name)
    reference = run.load_generator(start)[0] if start is not None else None
    inputs = evaluation_inputs(run, prompts, judge_dir, start)
    metrics: Dict[str, Any] = {}
    samples: Dict[str, List[str]] = {}
    rewards: Dict[str, List[List[float]]] = {}
    out = run.stage_dir("evaluate")
    for name, path in checkpoints.items():
        # beta only enters the implicit rewards of the generators alignment moved, not the start's own result.
        beta = inputs["beta"] if name != start_name else None
        key = content_key("evaluate", {**inputs, "beta": beta, "generator": name,
                                       "fingerprint": model_fingerprint(path)})[:16]
        cache = evaluation_cache_dir(run, Path(path)) / f"eval-{name}-{key}.json"
        result, samples[name], rewards[name] = cached(cache, lambda: evaluate_generator(
            run, name, path, prompts, discriminator, reference, start_name))
        metrics.update(result)
    for name in checkpoints:  # head to head against the generator alignment started from, on the same prompts
        if name != start_name and rewards.get(name) and rewards.get(start_name):
            metrics[f"winrate/{name}"], metrics[f"winrate_ci95/{name}"] = win_rate(rewards[name], rewards[start_name])
    if run.cfg.evaluate.best_of_n and "sft" in checkpoints and discriminator is not None and run.task.has_gold:
        ns = sorted(set(run.cfg.evaluate.best_of_n))
        key = content_key("best_of_n", {**inputs, "ns": ns, "fingerprint": model_fingerprint(checkpoints["sft"])})
        cache = Path(checkpoints["sft"]).parent / f"eval-best_of_n-{key[:16]}.json"  # shared like the SFT's own
        metrics.update(cached(cache, lambda: best_of_n(run, checkpoints["sft"], prompts, discriminator, ns)))
    write_samples(run, out, [p.prompt for p in prompts], samples, rewards)
    mark_done(out, metrics)
    return metrics


def write_samples(run: Run, out: Path, prompts: List[str], samples: Dict[str, List[str]],
                  rewards: Dict[str, List[List[float]]]) -> None:
    """Each generator's first sample of every prompt and its reward, side by side: ``samples.json`` and the
    ``evaluate/samples`` table of the logger."""
    out.mkdir(parents=True, exist_ok=True)
    first_rewards = {n: [r[0] for r in rewards[n]] for n in samples if rewards.get(n)}
    write_atomic(out / "samples.json", json.dumps({"prompts": prompts, "samples": samples, "rewards": first_rewards},
                                                  indent=2))
    table: Dict[str, List[Any]] = {"prompt": prompts}
    for n in samples:
        table[n] = samples[n]
        if n in first_rewards:
            table[f"reward/{n}"] = first_rewards[n]
    run.log_table("evaluate/samples", list(table), [list(row) for row in zip(*table.values())])
