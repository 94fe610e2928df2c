"""Per-persona A/B reports of runs whose feedback stage ran bandit A/B tests (``loop.allocation``,
``loop.sends_per_prompt``): the best email per persona, the cumulative regret of each allocation, and the gold reply
rate by persona of every generator.

Each argument is a finished run directory (``config_resolved.yaml``, ``feedback/ab_tests.jsonl``,
``evaluate/samples.json``). Written next to the first run's parent (or ``--out``):

- ``ab_best_emails.md``: per persona (of the first run), the email with the highest posterior mean reply rate over
  its A/B tests, that posterior mean with a 95% equal-tailed credible interval (Beta posterior, uniform prior), its
  sends and replies, and its gold reply probability;
- ``ab_regret.png`` and a table: cumulative regret against the number of sends per test (expected replies lost
  against always sending each test's best email, summed over the tests, gold probabilities), per allocation, mean
  over the runs of that allocation;
- ``ab_persona_gold.md`` and ``ab_persona_heatmap.png``: the gold reply rate of each generator's held-out samples
  by persona (the evaluate stage's one sample per prompt, scored by the task's gold), mean over the runs given.

    python experiments/ab_report.py runs/thompson_s0 runs/uniform_s0 --out runs/ab_report
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from omegaconf import OmegaConf

from rlmf.feedback.bandit import ABTest
from rlmf.tasks.base import build_task


def load_tests(run: Path) -> List[dict]:
    path = run / "feedback" / "ab_tests.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} not found: run the feedback stage with loop.allocation / loop.sends_per_prompt")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_emails(run: Path) -> str:
    tests = load_tests(run)
    by_group: Dict[str, tuple] = {}
    for t in tests:
        test = ABTest(t["sends"], t["replies"])
        for i in range(len(t["sends"])):
            mean = test.posterior_mean(i)
            if t["group"] not in by_group or mean > by_group[t["group"]][0]:
                by_group[t["group"]] = (mean, test, i, t)
    lines = ["| persona | posterior reply rate [95% interval] | sends | replies | gold |", "|---|---|---|---|---|"]
    for group in sorted(by_group):
        mean, test, i, t = by_group[group]
        low, high = test.interval(i)
        gold = f"{t['gold'][i]:.3f}" if t.get("gold") else "-"
        lines.append(f"| {group} | {mean:.3f} [{low:.3f}, {high:.3f}] | {t['sends'][i]} | {t['replies'][i]} | {gold} |")
    return "\n".join(lines)


def regret_curves(runs: List[Path]) -> Dict[str, List[float]]:
    """Per allocation: the regret summed over a run's tests after each send, averaged over the runs."""
    curves: Dict[str, List[List[float]]] = defaultdict(list)
    for run in runs:
        cfg = OmegaConf.load(run / "config_resolved.yaml")
        tests = [t for t in load_tests(run) if t["regret"]]
        if not tests:
            continue
        n = min(len(t["regret"]) for t in tests)
        curves[cfg.loop.allocation].append([sum(t["regret"][s] for t in tests) for s in range(n)])
    return {k: [statistics.fmean(c[s] for c in v) for s in range(min(len(c) for c in v))] for k, v in curves.items()}


def persona_gold(runs: List[Path]) -> Dict[str, Dict[str, float]]:
    """``{generator: {persona: mean gold reply rate of its held-out samples}}``, pooled over the runs."""
    pooled: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cfg = OmegaConf.load(run / "config_resolved.yaml")
        task = build_task(cfg.task, cfg.seed)
        samples = json.loads((run / "evaluate" / "samples.json").read_text())
        for name, completions in samples["samples"].items():
            gold = task.gold(samples["prompts"], completions)
            for prompt, g in zip(samples["prompts"], gold):
                pooled[name][task.group(prompt)].append(g)
    return {name: {group: statistics.fmean(v) for group, v in groups.items()} for name, groups in pooled.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="where to write the reports (default: beside the first run)")
    args = parser.parse_args()
    out = args.out or args.runs[0].parent
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_emails(args.runs[0])
    (out / "ab_best_emails.md").write_text(best + "\n")
    print(f"best email per persona ({args.runs[0]}):\n{best}\n")

    curves = regret_curves(args.runs)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for allocation, curve in sorted(curves.items()):
        ax.plot(range(1, len(curve) + 1), curve, label=allocation)
        print(f"cumulative regret, {allocation}: {curve[-1]:.1f} expected replies lost after {len(curve)} sends "
              "per test (summed over tests, mean over runs)")
    ax.set_xlabel("sends per A/B test")
    ax.set_ylabel("cumulative regret (replies lost)")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(out / "ab_regret.png", dpi=120)
    plt.close(fig)

    gold = persona_gold(args.runs)
    names = [n for n in ("initial", "sft", "aligned") if n in gold] + sorted(n for n in gold
                                                                           if n not in ("initial", "sft", "aligned"))
    groups = sorted({g for by_group in gold.values() for g in by_group})
    lines = ["| persona | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {g} | " + " | ".join(f"{gold[n].get(g, float('nan')):.3f}" for n in names) + " |" for g in groups]
    (out / "ab_persona_gold.md").write_text("\n".join(lines) + "\n")
    print("gold reply rate by held-out persona:\n" + "\n".join(lines))
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 0.32 * len(groups) + 1.2))
    image = ax.imshow([[gold[n].get(g, float("nan")) for n in names] for g in groups], cmap="viridis", vmin=0,
                      vmax=max(0.01, max(v for by_group in gold.values() for v in by_group.values())), aspect="auto")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    fig.colorbar(image, ax=ax, label="gold reply rate")
    fig.tight_layout()
    fig.savefig(out / "ab_persona_heatmap.png", dpi=120)
    plt.close(fig)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
