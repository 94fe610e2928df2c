"""Compare algorithms over seeds: a Markdown table of held-out results and a plot of the online training curves.

Each argument is a finished run directory (its ``config_resolved.yaml`` and ``summary.json``; the align stage's CSV
log ``logs/align/metrics.csv`` when the run used ``logger=csv``). Runs are grouped by ``algo.name`` and the settings
that tell arms apart when they are not at their defaults (the reward kind, ``loop.rounds``, ``task.feedback_prompts``,
``loop.allocation``, ``loop.sends_per_prompt``, ``loop.weighting``, ``feedback.pairs``); within a group every run is one seed. A run of
several rounds is represented by its last round's generator.

The table gives, per group, the held-out gold reply rate of sampled emails (mean and sample standard deviation over
the seeds), its gain over the run's own SFT generator (mean, with the smallest and largest gain over the seeds, and
how many seeds gained), the greedy gold reply rate and the KL to the SFT model. With three seeds the spread is
descriptive: no interval is claimed.

The plot (``--plot``) has two panels per online algorithm, against the rollout index: the gold reply rate of each
rollout's own samples (training prompts; ``align/train/gold/reply_rate``) and the summed KL of a sample to the
reference (``align/train/objective/kl``); the line is the mean over seeds, the band their range, both smoothed with a
centred moving average of ``--smooth`` rollouts.

    python experiments/compare_seeds.py runs/dpo_s* runs/grpo_s* --plot docs/img/online_curves.png
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import yaml


def load(run: Path) -> Dict:
    """One run's group name, summary and (when logged) align curves."""
    cfg = yaml.safe_load((run / "config_resolved.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    reward = (cfg.get("reward") or {}).get("kind", "discriminator")
    loop = cfg.get("loop") or {}
    rounds = loop.get("rounds", 1)
    # Settings that tell arms apart, named when not at their defaults.
    tags = [f"reward={reward}"] if reward != "discriminator" else []
    tags += [f"{key}={value}" for key, value, default in (
        ("rounds", rounds, 1), ("feedback_prompts", cfg["task"].get("feedback_prompts"), 256),
        ("allocation", loop.get("allocation", "uniform"), "uniform"), ("sends", loop.get("sends_per_prompt"), None),
        ("weighting", loop.get("weighting", "none"), "none"),
        ("pairs", (cfg.get("feedback") or {}).get("pairs", "best_worst"), "best_worst")) if value != default]
    group = cfg["algo"]["name"] + (f" ({', '.join(tags)})" if tags else "")
    if rounds > 1:  # the run's final generator is its last round's
        for key in ("gold/reply_rate", "gold/reply_rate_greedy", "kl"):
            summary[f"{key}/aligned"] = summary[f"{key}/round{rounds}"]
    curves: Dict[str, List[float]] = defaultdict(list)
    log = run / "logs" / "align" / "metrics.csv"
    if log.exists():
        for row in csv.DictReader(log.open()):
            for key in ("align/train/gold/reply_rate", "align/train/objective/kl"):
                if row.get(key):
                    curves[key].append(float(row[key]))
    return {"group": group, "seed": cfg["seed"], "summary": summary, "curves": dict(curves), "dir": run}


def mean_sd(values: List[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def table(runs: List[Dict]) -> str:
    groups: Dict[str, List[Dict]] = defaultdict(list)
    for r in runs:
        groups[r["group"]].append(r)
    sft = {r["seed"]: r["summary"]["gold/reply_rate/sft"] for r in runs if "gold/reply_rate/sft" in r["summary"]}
    sft_greedy = {r["seed"]: r["summary"]["gold/reply_rate_greedy/sft"] for r in runs
                  if "gold/reply_rate_greedy/sft" in r["summary"]}
    lines = ["| algo | seeds | gold reply rate (sampled) | gain over SFT: mean [min, max] | seeds above SFT "
             "| greedy | KL vs SFT |", "|---|---|---|---|---|---|---|",
             f"| sft (start) | {len(sft)} | {mean_sd(list(sft.values()))} | - | - | "
             f"{mean_sd(list(sft_greedy.values()))} | 0 |"]
    for name, members in groups.items():
        members.sort(key=lambda r: r["seed"])
        gold = [r["summary"]["gold/reply_rate/aligned"] for r in members]
        gains = [g - r["summary"]["gold/reply_rate/sft"] for g, r in zip(gold, members)]
        greedy = [r["summary"]["gold/reply_rate_greedy/aligned"] for r in members]
        kl = [r["summary"]["kl/aligned"] for r in members]
        lines.append(f"| {name} | {','.join(str(r['seed']) for r in members)} | {mean_sd(gold)} | "
                     f"{statistics.fmean(gains):+.3f} [{min(gains):+.3f}, {max(gains):+.3f}] | "
                     f"{sum(g > 0 for g in gains)}/{len(gains)} | {mean_sd(greedy)} | {mean_sd(kl)} |")
    return "\n".join(lines)


def smooth(values: List[float], window: int) -> List[float]:
    half = window // 2
    return [statistics.fmean(values[max(0, i - half): i + half + 1]) for i in range(len(values))]


def plot(runs: List[Dict], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[str, List[Dict]] = defaultdict(list)
    for r in runs:
        if r["curves"].get("align/train/gold/reply_rate"):
            groups[r["group"]].append(r)
    panels = (("align/train/gold/reply_rate", "gold reply rate of the rollout's samples"),
              ("align/train/objective/kl", "KL to the reference (summed per sample, nats)"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, members in sorted(groups.items()):
        for ax, (key, label) in zip(axes, panels):
            series = [smooth(r["curves"][key], window) for r in members if r["curves"].get(key)]
            n = min(len(s) for s in series)
            xs = list(range(1, n + 1))
            mean = [statistics.fmean(s[i] for s in series) for i in range(n)]
            line, = ax.plot(xs, mean, label=f"{name} ({len(series)} seeds)")
            ax.fill_between(xs, [min(s[i] for s in series) for i in range(n)],
                            [max(s[i] for s in series) for i in range(n)], color=line.get_color(), alpha=0.15)
            ax.set_xlabel("rollout")
            ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"online algorithms: mean over seeds (band: range), moving average of {window} rollouts")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    parser.add_argument("--plot", type=Path, help="write the training-curve plot here (PNG)")
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window, in rollouts")
    args = parser.parse_args()
    runs = [load(r) for r in args.runs if (r / "summary.json").exists()]
    if not runs:
        parser.error("no finished run (with summary.json) among the arguments")
    print(table(runs))
    if args.plot:
        plot(runs, args.plot, args.smooth)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
