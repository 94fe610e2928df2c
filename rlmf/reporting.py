"""Turning a run's metrics into something a person reads: the by-stage table and the reply-rate plot."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

STAGE_ORDER = ("initial", "sft", "aligned")
# (column title, summary key prefix): one column per metric that evaluate reports for each generator
STAGE_COLUMNS = (("gold reply rate", "gold/reply_rate"), ("greedy", "gold/reply_rate_greedy"),
                 ("discriminator reward", "discriminator/reward"), ("KL vs SFT", "kl"))


def stage_table(summary: Dict[str, float]) -> List[List[str]]:
    """Rows ``[generator, metric...]`` for each generator evaluated, in pipeline order, "-" where not measured."""
    rows = []
    for stage in STAGE_ORDER:
        cells = [summary.get(f"{key}/{stage}") for _, key in STAGE_COLUMNS]
        if any(c is not None for c in cells):
            rows.append([stage] + ["-" if c is None else f"{c:.3f}" for c in cells])
    return rows


def reply_rates_by_stage(summary: Dict[str, float], key: str = "gold/reply_rate") -> Dict[str, float]:
    return {s: summary[f"{key}/{s}"] for s in STAGE_ORDER if f"{key}/{s}" in summary}


def plot_reply_rates(summary: Dict[str, float], path: Path) -> Optional[Path]:
    """A bar chart of the gold reply rate (sampled and greedy) of each generator the run produced."""
    sampled = reply_rates_by_stage(summary)
    if not sampled:
        return None
    greedy = reply_rates_by_stage(summary, "gold/reply_rate_greedy")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(sampled)
    xs = range(len(stages))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([x - 0.2 for x in xs], [sampled[s] for s in stages], width=0.4, label="sampled")
    ax.bar([x + 0.2 for x in xs], [greedy.get(s, 0.0) for s in stages], width=0.4, label="greedy")
    for x, s in zip(xs, stages):
        ax.annotate(f"{sampled[s]:.2f}", (x - 0.2, sampled[s]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), stages)
    ax.set_ylabel("gold reply rate (held-out personas)")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
