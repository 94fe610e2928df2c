"""Turn a multirun sweep directory into a table (printed as Markdown, written as CSV) and a bar chart.

    rlmf-train -m algo=dpo,ipo,... stage.stages=[align,evaluate] stage.from_run=runs/base hydra.sweep.dir=SWEEP
    python experiments/summarize_sweep.py SWEEP            # -> SWEEP/summary.csv, SWEEP/gold_reply_rate.png

One row per job, named by the overrides that differ between jobs (e.g. the algorithm), with the SFT generator the
jobs started from as the first row.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Dict, List

import yaml

COLUMNS = (("gold reply rate", "gold/reply_rate"), ("greedy", "gold/reply_rate_greedy"),
           ("discriminator reward", "discriminator/reward"), ("KL vs SFT", "kl"))


def load_jobs(sweep: Path) -> List[Dict]:
    jobs = []
    for summary in sorted(sweep.glob("*/summary.json"), key=lambda p: int(p.parent.name)):
        overrides = yaml.safe_load((summary.parent / ".hydra" / "overrides.yaml").read_text())
        jobs.append({"overrides": overrides, "summary": json.loads(summary.read_text())})
    if not jobs:
        raise SystemExit(f"no */summary.json under {sweep}: is it a finished multirun sweep directory?")
    return jobs


def job_names(jobs: List[Dict]) -> List[str]:
    varying = [i for i in range(len(jobs[0]["overrides"])) if len({tuple(j["overrides"])[i] for j in jobs}) > 1]
    return [" ".join(j["overrides"][i] for i in varying) or "job" for j in jobs]


def rows(jobs: List[Dict]) -> List[List]:
    first = jobs[0]["summary"]
    table = [["sft (start)"] + [first.get(f"{key}/sft") for _, key in COLUMNS]]
    for name, job in zip(job_names(jobs), jobs):
        table.append([name] + [job["summary"].get(f"{key}/aligned") for _, key in COLUMNS])
    return table


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="the multirun sweep directory (hydra.sweep.dir)")
    args = parser.parse_args()
    table = rows(load_jobs(args.sweep))
    header = ["job"] + [title for title, _ in COLUMNS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join([row[0]] + [fmt(v) for v in row[1:]]) + " |")
    with open(args.sweep / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(table)), 3.4))
    values = [row[1] or 0.0 for row in table]
    ax.bar(range(len(table)), values, color=["grey"] + ["tab:blue"] * (len(table) - 1))
    ax.axhline(values[0], color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(table)), [row[0].replace("algo=", "") for row in table], rotation=45, ha="right")
    ax.set_ylabel("gold reply rate (held-out personas)")
    fig.tight_layout()
    fig.savefig(args.sweep / "gold_reply_rate.png", dpi=120)
    print(f"wrote {args.sweep / 'summary.csv'} and {args.sweep / 'gold_reply_rate.png'}")


if __name__ == "__main__":
    main()
