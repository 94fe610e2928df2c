"""An ablation sweep as a table with confidence intervals, a CSV and a plot, written next to the sweep.

    rlmf-train -m experiment=dpo_beta hydra.sweep.dir=SWEEP
    python experiments/report.py SWEEP        # -> SWEEP/report.md, report.csv, report_jobs.csv, report.png
    python experiments/report.py SWEEP --docs docs/results.md     # and fill the ablation's block of the page

Jobs (``SWEEP/<n>/`` with ``.hydra/overrides.yaml`` and ``summary.json``) are grouped into cells by their overrides
other than ``seed``; overrides every job shares are left out of the cell's name. Each cell's value of a metric is the
mean over its seeds with a 95% confidence interval from Student's t over the seeds:
``mean ± t(0.975, n-1) · sd / sqrt(n)`` (``sd`` the sample standard deviation of the n per-seed values). The
interval is over seeds only: each seed's value already carries the evaluation's own noise, whose standard error per
job (``gold/reply_rate_se``, over the held-out prompts) is printed in the per-job table. The gain over SFT is the
mean of the per-seed differences from the same seed's SFT generator (a paired interval).

The plot is the one the ablation needs (``PLOTS``, by the sweep's ``experiment=``; ``--plot`` overrides): a
``frontier`` of gold reply rate (and, second panel, the discriminator's proxy reward) against KL to the SFT model,
or ``bars`` with error bars. With ``--wandb`` (default: when the jobs logged to W&B) the table and plot are logged
to a W&B run in the sweep's group (offline unless ``WANDB_MODE`` says otherwise).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

# (column title, summary key) of the aligned generator; "gain over SFT" is computed per seed
METRICS = (("gold reply rate", "gold/reply_rate/aligned"), ("gain over SFT", None),
           ("greedy", "gold/reply_rate_greedy/aligned"), ("discriminator reward", "discriminator/reward/aligned"),
           ("KL vs SFT", "kl/aligned"))
# Further columns an ablation reads (summary keys of the align stage's round of feedback)
EXTRA_METRICS = {
    "apo_anchor": (("chosen gold", "align/chosen_gold_reply_rate"), ("samples' gold", "align/sample_gold_reply_rate")),
    "kto_imbalance": (("pairs kept", "align/kept_pairs"), ("thumbs kept", "align/kept_thumbs")),
}
SFT_METRICS = {"gold reply rate": "gold/reply_rate/sft", "greedy": "gold/reply_rate_greedy/sft",
               "discriminator reward": "discriminator/reward/sft"}
# A real model on real pairs (experiment=smollm2_hh) has no gold metric: an independent judge, held-out pairs, KL and
# length instead, beside the starting generator's values ("initial": alignment starts from the checkpoint itself).
REAL_MODEL_METRICS = (
    ("win rate vs start", "winrate/aligned"), ("judge reward", "discriminator/reward/aligned"),
    ("start's judge reward", "discriminator/reward/initial"),
    ("preference accuracy", "heldout/preference_accuracy/aligned"),
    ("start's preference accuracy", "heldout/preference_accuracy/initial"),
    ("rewards/accuracies", "heldout/rewards/accuracies/aligned"), ("rewards/margins", "heldout/rewards/margins/aligned"),
    ("KL vs start", "kl/aligned"), ("length", "length/aligned"), ("start's length", "length/initial"),
    ("proxy RM accuracy", "discriminator/accuracy"), ("judge accuracy", "judge/accuracy"))
COLUMNS = {"smollm2_hh": REAL_MODEL_METRICS}
CAPTIONS = {"smollm2_hh": "Held-out HH pairs and their prompts; the judge is a reward model trained on pairs neither "
                          "the policy nor its proxy saw. Win rate: the aligned model's sample against the starting "
                          "model's, a tie 1/2. Proxy RM accuracy: on the held-out pairs (the last tenth of task.rows); "
                          "judge accuracy: on every pair of task.rows, none of which it saw."}
# The per-job table: (title, summary key) columns
JOB_COLUMNS = (("gold reply rate", "gold/reply_rate/aligned"), ("SE", "gold/reply_rate_se/aligned"),
               ("KL vs SFT", "kl/aligned"))
REAL_MODEL_JOB_COLUMNS = (("win rate", "winrate/aligned"), ("95% ±", "winrate_ci95/aligned"),
                          ("preference accuracy", "heldout/preference_accuracy/aligned"), ("KL vs start", "kl/aligned"),
                          ("length", "length/aligned"), ("proxy RM accuracy", "discriminator/accuracy"),
                          ("judge accuracy", "judge/accuracy"))
# The panels of a "panels" plot: (title, summary key of the arms, what to draw the line at: a number or a key)
PANELS = {"smollm2_hh": (("win rate vs start (judge)", "winrate/aligned", 0.5),
                         ("held-out rewards/accuracies", "heldout/rewards/accuracies/aligned", 0.5),
                         ("mean sample length (tokens)", "length/aligned", "length/initial"))}
PLOTS = {"dpo_beta": "frontier", "hypo_vs_dpo": "frontier", "overoptimization": "frontier", "smollm2_hh": "panels"}
# Two-sided 95% quantiles of Student's t, t(0.975, df), df = 1..30 (to 6 decimals; above 30 see t_quantile)
T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
        2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
        2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)


def t_quantile(df: int) -> float:
    """t(0.975, df): the table for df <= 30, else the Cornish-Fisher expansion of t around the normal quantile
    z = 1.959964 to the df^-3 term (error below 1e-5 from df 31 on)."""
    if df < 1:
        return float("nan")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_ci(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval over ``values`` (NaN half-width with one value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], float("nan")
    return statistics.fmean(values), t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


@dataclass
class Job:
    number: int
    overrides: List[str]
    seed: int
    summary: Dict[str, float]
    config: Dict


@dataclass
class Cell:
    name: str
    jobs: List[Job] = field(default_factory=list)

    def values(self, key: Optional[str]) -> List[float]:
        """Per-seed values of a summary key; ``None`` means the gain over the same seed's SFT generator."""
        if key is None:
            return [j.summary["gold/reply_rate/aligned"] - j.summary["gold/reply_rate/sft"] for j in self.jobs
                    if "gold/reply_rate/aligned" in j.summary and "gold/reply_rate/sft" in j.summary]
        return [j.summary[key] for j in self.jobs if key in j.summary]


def load_jobs(sweep: Path) -> Tuple[List[Job], List[Path]]:
    """The sweep's finished jobs, and the job directories without a ``summary.json`` (unfinished or failed)."""
    jobs, missing = [], []
    for directory in sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        if not (directory / "summary.json").exists():
            missing.append(directory)
            continue
        overrides = yaml.safe_load((directory / ".hydra" / "overrides.yaml").read_text()) or []
        config = yaml.safe_load((directory / "config_resolved.yaml").read_text())
        jobs.append(Job(int(directory.name), overrides, int(config["seed"]),
                        json.loads((directory / "summary.json").read_text()), config))
    return jobs, missing


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def short_label(override: str) -> str:
    """``+arm/hypo_vs_dpo=hypo_kl0.1`` -> ``hypo_kl0.1``; ``algo=ipo`` -> ``ipo`` (a group's option: its name);
    ``algo.loss.beta=0.1`` -> ``beta=0.1``."""
    key, _, value = override.partition("=")
    key = key.lstrip("+~")
    if key.startswith("arm/") or "." not in key:
        return value
    return f"{key.rsplit('.', 1)[-1]}={value}"


def group_cells(jobs: List[Job]) -> List[Cell]:
    """Cells by the overrides other than ``seed``, named by those that differ between jobs, in sweep order."""
    values: Dict[str, set] = defaultdict(set)
    for job in jobs:
        own = {override_key(o): o for o in job.overrides}
        for key in {override_key(o) for j in jobs for o in j.overrides}:
            values[key].add(own.get(key))
    varying = {key for key, seen in values.items() if len(seen) > 1 and key != "seed"}
    cells: Dict[str, Cell] = {}
    for job in jobs:
        name = ", ".join(short_label(o) for o in job.overrides if override_key(o) in varying) or "all jobs"
        cells.setdefault(name, Cell(name)).jobs.append(job)
    return list(cells.values())


def fmt(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def experiment_name(sweep: Path, jobs: List[Job]) -> Optional[str]:
    """The sweep's ``experiment=`` choice, from the first job's Hydra record."""
    for job in jobs:
        hydra_file = sweep / str(job.number) / ".hydra" / "hydra.yaml"
        if hydra_file.exists():
            choices = yaml.safe_load(hydra_file.read_text())["hydra"]["runtime"]["choices"]
            return choices.get("experiment")
    return None


def sft_rows(jobs: List[Job]) -> Dict[str, List[float]]:
    """Each seed's SFT generator once (every job of a seed evaluated the same SFT model)."""
    by_seed = {j.seed: j.summary for j in jobs}
    return {title: [s[key] for s in by_seed.values() if key in s] for title, key in SFT_METRICS.items()}


def columns(experiment: Optional[str]) -> Tuple[Tuple[str, Optional[str]], ...]:
    return COLUMNS.get(experiment or "", METRICS) + EXTRA_METRICS.get(experiment or "", ())


def table_rows(cells: List[Cell], jobs: List[Job], experiment: Optional[str]) -> List[Dict]:
    """One row per cell (SFT first): per column ``(mean, half-width)``, and the seeds."""
    rows = []
    sft = sft_rows(jobs)
    if sft["gold reply rate"]:
        rows.append({"cell": "sft (start)", "kind": "sft", "seeds": sorted({j.seed for j in jobs}),
                     **{title: mean_ci(sft.get(title, [])) if title in sft else
                        ((0.0, 0.0) if title in ("gain over SFT", "KL vs SFT") else (float("nan"), float("nan")))
                        for title, _ in columns(experiment)}})
    for cell in cells:
        rows.append({"cell": cell.name, "kind": "arm", "seeds": sorted(j.seed for j in cell.jobs),
                     **{title: mean_ci(cell.values(key)) for title, key in columns(experiment)}})
    return rows + best_of_n_rows(jobs, experiment)


def best_of_n_rows(jobs: List[Job], experiment: Optional[str]) -> List[Dict]:
    """Best-of-n from each seed's SFT model (``evaluate.best_of_n``; the same in every job of a seed), a row per n:
    gold reply rate, its gain over the seed's SFT samples, discriminator reward (the proxy that picked) and the
    analytic KL."""
    by_seed = {j.seed: j.summary for j in jobs}
    ns = sorted({int(k.rsplit("/", 1)[1]) for s in by_seed.values() for k in s if k.startswith("bon/gold/")})
    rows = []
    for n in ns:
        seeds = [s for s in by_seed.values() if f"bon/gold/{n}" in s]
        values = {"gold reply rate": [s[f"bon/gold/{n}"] for s in seeds],
                  "gain over SFT": [s[f"bon/gold/{n}"] - s["gold/reply_rate/sft"] for s in seeds],
                  "discriminator reward": [s[f"bon/proxy/{n}"] for s in seeds],
                  "KL vs SFT": [s[f"bon/kl/{n}"] for s in seeds]}
        rows.append({"cell": f"best-of-{n} (sft)", "kind": "bon", "seeds": sorted(by_seed),
                     **{title: mean_ci(values.get(title, [])) for title, _ in columns(experiment)}})
    return rows


def summary_table(rows: List[Dict], experiment: Optional[str]) -> str:
    """The table of cells (mean ± 95% interval over seeds) and the sentence that says what the cells are."""
    titles = [t for t, _ in columns(experiment)]
    lines = ["| arm | seeds | " + " | ".join(titles) + " |", "|---" * (len(titles) + 2) + "|"]
    for row in rows:
        lines.append(f"| {row['cell']} | {len(row['seeds'])} | " + " | ".join(fmt(*row[t]) for t in titles) + " |")
    lines += ["", "Mean ± half-width of the 95% Student-t confidence interval over seeds (t(0.975, n-1) · sd / "
              "sqrt(n))" + (f". {CAPTIONS[experiment]}" if experiment in CAPTIONS
                            else "; gain over SFT: paired per seed. Held-out personas.")]
    return "\n".join(lines)


def job_columns(experiment: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    return REAL_MODEL_JOB_COLUMNS if experiment in COLUMNS else JOB_COLUMNS


def markdown(table: str, jobs: List[Job], cells: List[Cell], missing: List[Path],
             experiment: Optional[str] = None) -> str:
    """The summary ``table``, then one line per job (with its evaluation's own noise where the metric has one)."""
    lines = [table, ""]
    titles = [t for t, _ in job_columns(experiment)]
    lines += [("Per job:" if experiment in COLUMNS else "Per job (SE: standard error of the gold reply rate over the "
               "held-out prompts, the evaluation's own noise):"), "",
              "| job | arm | seed | " + " | ".join(titles) + " |", "|---" * (len(titles) + 3) + "|"]
    cell_of = {j.number: c.name for c in cells for j in c.jobs}
    for j in jobs:
        values = " | ".join(f"{j.summary.get(key, math.nan):.3f}" for _, key in job_columns(experiment))
        lines.append(f"| {j.number} | {cell_of[j.number]} | {j.seed} | {values} |")
    if missing:
        lines += ["", f"Not finished (no summary.json): {', '.join(p.name for p in missing)}"]
    return "\n".join(lines)


def write_csv(rows: List[Dict], experiment: Optional[str], path: Path) -> None:
    titles = [t for t, _ in columns(experiment)]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["arm", "n_seeds", "seeds"] + [f"{t} {part}" for t in titles for part in ("mean", "ci95_low",
                                                                                             "ci95_high")])
        for row in rows:
            cells = []
            for t in titles:
                mean, half = row[t]
                cells += [mean, mean - half, mean + half]
            out.writerow([row["cell"], len(row["seeds"]), " ".join(map(str, row["seeds"]))] + cells)


def write_jobs_csv(jobs: List[Job], cells: List[Cell], path: Path, experiment: Optional[str] = None) -> None:
    cell_of = {j.number: c.name for c in cells for j in c.jobs}
    if experiment in COLUMNS:  # every key of its tables, each once
        keys = tuple(dict.fromkeys(key for _, key in job_columns(experiment) + COLUMNS[experiment]))
    else:
        keys = ("gold/reply_rate/aligned", "gold/reply_rate_se/aligned", "gold/reply_rate_greedy/aligned",
                "discriminator/reward/aligned", "kl/aligned", "gold/reply_rate/sft", "gold/reply_rate_se/sft")
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["job", "arm", "seed", *keys])
        for j in jobs:
            out.writerow([j.number, cell_of[j.number], j.seed, *(j.summary.get(k) for k in keys)])


def plot(kind: str, rows: List[Dict], cells: List[Cell], path: Path, title: str,
         experiment: Optional[str] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [r for r in rows if r["kind"] == "arm"]
    bon = [r for r in rows if r["kind"] == "bon"]
    sft = next((r for r in rows if r["kind"] == "sft"), None)
    if kind == "panels":  # one panel per metric of PANELS: arms' bars with intervals, seeds as dots, a reference line
        panels = PANELS[experiment]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.2))
        for ax, (name, key, line) in zip(axes, panels):
            per_cell = [cell.values(key) for cell in cells]
            means_halves = [mean_ci(v) for v in per_cell]
            ax.bar(range(len(cells)), [m for m, _ in means_halves], capsize=4, color="tab:blue",
                   yerr=[0 if math.isnan(h) else h for _, h in means_halves])
            for i, ys in enumerate(per_cell):
                ax.scatter([i] * len(ys), ys, s=10, color="black", alpha=0.5, zorder=3)
            level = line if isinstance(line, (int, float)) else mean_ci([v for c in cells for v in c.values(line)])[0]
            ax.axhline(level, color="grey", linestyle="--", linewidth=1,
                       label="even" if isinstance(line, (int, float)) else "start (mean over jobs)")
            ax.set_xticks(range(len(cells)), [c.name for c in cells], rotation=35, ha="right")
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=8, frameon=False)
    elif kind == "frontier":
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, metric in zip(axes, ("gold reply rate", "discriminator reward")):
            for cell, row in zip(cells, arms):
                kl, kl_half = row["KL vs SFT"]
                y, y_half = row[metric]
                ax.errorbar([kl], [y], xerr=[[0 if math.isnan(kl_half) else kl_half]],
                            yerr=[[0 if math.isnan(y_half) else y_half]], fmt="o", capsize=3, label=row["cell"])
                ax.scatter(cell.values("kl/aligned"),
                           cell.values("gold/reply_rate/aligned" if metric == "gold reply rate"
                                       else "discriminator/reward/aligned"), s=8, alpha=0.35, color="grey")
            key = "gold/reply_rate/aligned" if metric == "gold reply rate" else "discriminator/reward/aligned"
            for family in dict.fromkeys(re.split(r"[_=]", c.name)[0] for c in cells):  # e.g. dpo_0.01, dpo_0.1
                members = [c for c in cells if re.split(r"[_=]", c.name)[0] == family]
                if len(members) < 2:
                    continue
                # each seed's frontier through the family's arms, in sweep order: the seeds differ more than the arms
                for seed in sorted({j.seed for c in members for j in c.jobs}):
                    points = [(j.summary["kl/aligned"], j.summary[key]) for c in members for j in c.jobs
                              if j.seed == seed and "kl/aligned" in j.summary and key in j.summary]
                    ax.plot(*zip(*points), color="grey", linewidth=0.7, alpha=0.6)
            if bon:
                ax.errorbar([r["KL vs SFT"][0] for r in bon], [r[metric][0] for r in bon],
                            yerr=[0 if math.isnan(r[metric][1]) else r[metric][1] for r in bon], fmt="s--",
                            color="black", capsize=3, markersize=4, label="best-of-n (SFT, n = " +
                            ", ".join(r["cell"].split("-")[2].split(" ")[0] for r in bon) + ")")
            if sft is not None and not math.isnan(sft[metric][0]):
                ax.axhline(sft[metric][0], color="grey", linestyle="--", linewidth=1, label="SFT")
                ax.scatter([0.0], [sft[metric][0]], marker="*", s=80, color="black", zorder=3)
            ax.set_xlabel("KL(policy || SFT), nats per sample")
            ax.set_ylabel(metric + (" (gold, held-out)" if metric == "gold reply rate" else " (proxy)"))
        axes[0].legend(fontsize=7, frameon=False)
    else:
        # First the rates, each seed a dot; then the paired gain over the same seed's SFT model, the sharper view
        # when the seeds' SFT models differ. Side by side, or one above the other when there are many arms.
        width = max(5.0, 0.6 * len(arms) + 2)
        stacked = len(arms) > 6
        fig, axes = plt.subplots(*(2, 1) if stacked else (1, 2),
                                 figsize=(width, 8.4) if stacked else (2 * width, 4.2))
        for ax, metric in zip(axes, ("gold reply rate", "gain over SFT")):
            means = [r[metric][0] for r in arms]
            halves = [0 if math.isnan(r[metric][1]) else r[metric][1] for r in arms]
            ax.bar(range(len(arms)), means, yerr=halves, capsize=4, color="tab:blue")
            ax.set_xticks(range(len(arms)), [r["cell"] for r in arms], rotation=35, ha="right")
        for i, cell in enumerate(cells):
            ys = cell.values("gold/reply_rate/aligned")
            axes[0].scatter([i] * len(ys), ys, s=10, color="black", alpha=0.5, zorder=3)
        if sft is not None:
            axes[0].axhline(sft["gold reply rate"][0], color="grey", linestyle="--", linewidth=1, label="SFT")
            axes[0].legend(fontsize=8, frameon=False)
        axes[1].axhline(0.0, color="grey", linewidth=1)
        axes[0].set_ylabel("gold reply rate (held-out personas)")
        axes[1].set_ylabel("gain over the same seed's SFT model")
    fig.suptitle(f"{title}\nmean and 95% Student-t interval over seeds (grey: each seed"
                 f"{', its arms joined in sweep order' if kind == 'frontier' else ''})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_wandb(sweep: Path, jobs: List[Job], rows: List[Dict], experiment: Optional[str], plot_path: Path) -> Dict:
    """The table (and plot) as a W&B run of the sweep's group (the group every job of the sweep logged under);
    returns the run's directory, group and summary keys."""
    import os

    import wandb

    logger = jobs[0].config.get("logger") or {}
    os.environ.setdefault("WANDB_MODE", logger.get("mode", "offline"))
    os.environ.setdefault("WANDB_SILENT", "true")
    titles = [t for t, _ in columns(experiment)]
    run = wandb.init(project=logger.get("project", "rlmf"), dir=logger.get("save_dir", "."), group=sweep.name,
                     name=f"{sweep.name}/report", job_type="report", reinit=True,
                     config={"experiment": experiment, "sweep": str(sweep)})
    table = wandb.Table(columns=["arm", "seeds"] + [f"{t} {p}" for t in titles for p in ("mean", "ci95")],
                        data=[[r["cell"], len(r["seeds"])] + [x for t in titles for x in r[t]] for r in rows])
    run.log({"report/table": table, "report/plot": wandb.Image(str(plot_path))})
    run.summary["report/table"] = table
    for r in rows:
        for t in titles:
            run.summary[f"report/{r['cell']}/{t}"] = r[t][0]
    logged = {"dir": run.dir, "group": run.group, "summary": sorted(run.summary.keys())}
    run.finish()
    return logged


def sweep_wall_time(sweep: Path, jobs: List[Job]) -> float:
    """Seconds from the first job's start (Hydra writes ``.hydra/`` then) to the last ``summary.json``."""
    starts = [(sweep / str(j.number) / ".hydra" / "overrides.yaml").stat().st_mtime for j in jobs]
    ends = [(sweep / str(j.number) / "summary.json").stat().st_mtime for j in jobs]
    return max(ends) - min(starts)


def machine() -> str:
    import os
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.node() or 'unknown host'}, {os.cpu_count()} cores, {device}, torch {torch.__version__}"


def _replace_block(page: str, start: str, end: str, body: str) -> str:
    return page[:page.index(start)] + f"{start}\n{body}\n{end}" + page[page.index(end) + len(end):]


def fill_docs(docs: Path, sweep: Path, experiment: str, jobs: List[Job], text: str, table: str) -> List[str]:
    """Fill the blocks of this ablation in ``docs``, from this report only (no hand-typed number); returns which:

    - ``<!-- report:<experiment> -->`` ... ``<!-- /report:<experiment> -->``: the whole report (``text``) and the plot,
      copied to ``<docs dir>/img/results/<experiment>.png`` (docs/results.md);
    - ``<!-- report:<experiment>:table -->`` ... ``<!-- /report:<experiment>:table -->``: the summary ``table`` only
      (the README's algorithm table, whose prose links to the full report).
    """
    import datetime
    import shutil

    page = docs.read_text()
    full = (f"<!-- report:{experiment} -->", f"<!-- /report:{experiment} -->")
    short = (f"<!-- report:{experiment}:table -->", f"<!-- /report:{experiment}:table -->")
    found = [block for block in (full, short) if block[0] in page and block[1] in page]
    if not found:
        raise SystemExit(f"{docs} has no {full[0]} ... {full[1]} (or {short[0]} ... {short[1]}) block to fill")
    when = datetime.datetime.fromtimestamp((sweep / str(jobs[-1].number) / "summary.json").stat().st_mtime)
    run = (f"Run {when:%Y-%m-%d} on {machine()}: {len(jobs)} jobs in {sweep_wall_time(sweep, jobs) / 60:.1f} min "
           f"(first job's start to last job's end; sweep `{sweep.name}`)")
    if full in found:
        image = docs.parent / "img" / "results" / f"{experiment}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sweep / "report.png", image)
        link = image.relative_to(docs.parent).as_posix()
        page = _replace_block(page, *full, f"{run}, table and plot by `experiments/report.py`.\n\n{text}\n\n"
                                           f"![{experiment}]({link})")
    if short in found:
        page = _replace_block(page, *short, f"{run}, table by `experiments/report.py`.\n\n{table}")
    docs.write_text(page)
    return [block[0] for block in found]


def report(sweep: Path, plot_kind: Optional[str] = None, use_wandb: Optional[bool] = None,
           docs: Sequence[Path] = ()) -> Dict:
    """Write ``report.md``, ``report.csv``, ``report_jobs.csv`` and ``report.png`` into ``sweep``; returns the rows."""
    jobs, missing = load_jobs(sweep)
    if not jobs:
        raise SystemExit(f"no <job>/summary.json under {sweep}: is it a finished multirun sweep directory?")
    experiment = experiment_name(sweep, jobs)
    cells = group_cells(jobs)
    rows = table_rows(cells, jobs, experiment)
    table = summary_table(rows, experiment)
    text = markdown(table, jobs, cells, missing, experiment)
    kind = plot_kind or PLOTS.get(experiment or "", "bars")
    title = experiment or sweep.name
    (sweep / "report.md").write_text(f"## {title}\n\n{text}\n\n![{title}](report.png)\n")
    write_csv(rows, experiment, sweep / "report.csv")
    write_jobs_csv(jobs, cells, sweep / "report_jobs.csv", experiment)
    plot_path = plot(kind, rows, cells, sweep / "report.png", title, experiment)
    print(text)
    print(f"\nwrote {sweep / 'report.md'}, report.csv, report_jobs.csv, {plot_path.name}")
    print(f"sweep wall time: {sweep_wall_time(sweep, jobs) / 60:.1f} min for {len(jobs)} jobs")
    for page in docs or []:
        filled = fill_docs(page, sweep, experiment or sweep.name, jobs, text, table)
        print(f"filled {', '.join(filled)} of {page}")
    if use_wandb is None:
        use_wandb = (jobs[0].config.get("logger") or {}).get("kind") == "wandb"
    logged = log_wandb(sweep, jobs, rows, experiment, plot_path) if use_wandb else None
    if logged:
        print(f"W&B: the table logged to group {logged['group']} ({logged['dir']})")
    return {"rows": rows, "cells": cells, "jobs": jobs, "experiment": experiment, "wandb": logged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="the multirun sweep directory (hydra.sweep.dir)")
    parser.add_argument("--plot", choices=("frontier", "bars", "panels"), help="the plot (default: the ablation's own)")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="log the table to W&B (default: when the jobs used logger=wandb)")
    parser.add_argument("--docs", type=Path, action="append",
                        help="also fill this ablation's blocks of a page (docs/results.md; the README for the "
                             "algorithms table); repeat for several pages")
    args = parser.parse_args()
    report(args.sweep, args.plot, args.wandb, args.docs)


if __name__ == "__main__":
    main()
