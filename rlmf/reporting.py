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


# (column title, summary key of round 1, key of round r > 1 with {r}): the per-round table of loop.rounds
ROUND_COLUMNS = (("gold reply rate", "gold/reply_rate/aligned", "gold/reply_rate/round{r}"),
                 ("greedy", "gold/reply_rate_greedy/aligned", "gold/reply_rate_greedy/round{r}"),
                 ("discriminator accuracy", "discriminator/accuracy", "round{r}/discriminator/accuracy"),
                 ("KL vs SFT", "kl/aligned", "kl/round{r}"),
                 ("feedback reply rate", "feedback/observed_reply_rate", "round{r}/feedback/observed_reply_rate"))


def round_values(summary: Dict[str, float], rounds: int) -> Dict[str, List[Optional[float]]]:
    """Each per-round column of :data:`ROUND_COLUMNS`, a value (or None) per round 1..rounds."""
    return {title: [summary.get(first if r == 1 else later.format(r=r)) for r in range(1, rounds + 1)]
            for title, first, later in ROUND_COLUMNS}


def round_table(summary: Dict[str, float], rounds: int) -> str:
    """The per-round Markdown table: the held-out gold reply rate of each round's generator (sampled, greedy), its
    KL to SFT, the round's discriminator's held-out accuracy and the reply rate its feedback saw; SFT as round 0."""
    values = round_values(summary, rounds)
    titles = list(values)
    lines = ["| round | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    sft = {"gold reply rate": summary.get("gold/reply_rate/sft"), "greedy": summary.get("gold/reply_rate_greedy/sft")}
    lines.append("| 0 (sft) | " + " | ".join("-" if sft.get(t) is None else f"{sft[t]:.3f}" for t in titles) + " |")
    for i in range(rounds):
        cells = ["-" if values[t][i] is None else f"{values[t][i]:.3f}" for t in titles]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_rounds(summary: Dict[str, float], rounds: int, path: Path) -> Optional[Path]:
    """Per-round curves: gold reply rate (sampled, greedy; round 0 is SFT), discriminator accuracy, feedback reply
    rate (left), and KL to SFT (right)."""
    values = round_values(summary, rounds)
    if all(v is None for v in values["gold reply rate"]):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    xs = list(range(1, rounds + 1))
    for title in ("gold reply rate", "greedy", "discriminator accuracy", "feedback reply rate"):
        start = {"gold reply rate": summary.get("gold/reply_rate/sft"),
                 "greedy": summary.get("gold/reply_rate_greedy/sft")}.get(title)
        points = [(x, v) for x, v in zip(xs, values[title]) if v is not None]
        if start is not None:
            points = [(0, start)] + points
        if points:
            left.plot(*zip(*points), marker="o", label=title)
    left.set_xlabel("round (0: SFT)")
    left.set_ylim(0, 1)
    left.legend(fontsize=7, frameon=False)
    kl = [(x, v) for x, v in zip(xs, values["KL vs SFT"]) if v is not None]
    if kl:
        right.plot(*zip(*kl), marker="o", color="grey")
    right.set_xlabel("round")
    right.set_ylabel("KL to SFT (nats per sample)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
