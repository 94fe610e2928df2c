"""experiments/report.py on a synthetic sweep directory: cells by the non-seed overrides, mean and 95% Student-t
interval over seeds (checked against scipy and by hand), the paired gain over SFT, the CSVs, the plot, the per-job
standard errors, unfinished jobs, and the W&B summary table (offline)."""

import csv
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import report  # noqa: E402

# gold reply rate of the aligned generator per (arm, seed); SFT per seed
GOLD = {("dpo_0.1", 0): 0.30, ("dpo_0.1", 1): 0.26, ("dpo_0.1", 2): 0.31,
        ("dpo_1.0", 0): 0.24, ("dpo_1.0", 1): 0.25, ("dpo_1.0", 2): 0.20}
SFT = {0: 0.22, 1: 0.21, 2: 0.25}


def make_sweep(root: Path, experiment: str = "dpo_beta", logger: str = "csv", unfinished: bool = False) -> Path:
    sweep = root / "sweep"
    for n, ((arm, seed), gold) in enumerate(GOLD.items()):
        job = sweep / str(n)
        (job / ".hydra").mkdir(parents=True)
        overrides = [f"+arm/{experiment}={arm}", f"seed={seed}", f"experiment={experiment}", "logger=" + logger]
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"runtime": {"choices": {"experiment": experiment, "algo": "dpo"}}}}))
        (job / "config_resolved.yaml").write_text(yaml.safe_dump(
            {"seed": seed, "logger": {"kind": logger, "project": "rlmf-test", "mode": "offline",
                                      "save_dir": str(root)}}))
        summary = {"gold/reply_rate/aligned": gold, "gold/reply_rate_se/aligned": 0.01 + n / 1000,
                   "gold/reply_rate/sft": SFT[seed], "gold/reply_rate_se/sft": 0.02,
                   "gold/reply_rate_greedy/aligned": gold + 0.1, "gold/reply_rate_greedy/sft": SFT[seed] + 0.1,
                   "discriminator/reward/aligned": gold / 2, "discriminator/reward/sft": SFT[seed] / 2,
                   "kl/aligned": 1.0 if arm == "dpo_0.1" else 0.2 + seed / 10, "kl/sft": 0.0,
                   # best-of-n from the seed's SFT model: the same in every job of a seed
                   **{f"bon/{m}/{n}": v for n in (1, 4)
                      for m, v in (("gold", SFT[seed] + n / 100), ("proxy", n / 10), ("kl", math.log(n) - 1 + 1 / n))}}
        (job / "summary.json").write_text(json.dumps(summary))
    if unfinished:
        (sweep / str(len(GOLD)) / ".hydra").mkdir(parents=True)
    return sweep


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 61)) + [100, 1000]:
        assert report.t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-5), df


def test_interval_by_hand():
    values = [0.30, 0.26, 0.31]
    mean, half = report.mean_ci(values)
    sd = math.sqrt(((0.30 - 0.29) ** 2 + (0.26 - 0.29) ** 2 + (0.31 - 0.29) ** 2) / 2)  # = 0.026458
    assert mean == pytest.approx(0.29)
    assert half == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-5)  # t(0.975, 2) = 4.302653
    assert math.isnan(report.mean_ci([0.4])[1]) and report.mean_ci([0.4])[0] == 0.4


def test_report_table_csv_and_plot(tmp_path, capsys):
    sweep = make_sweep(tmp_path, unfinished=True)
    out = report.report(sweep)
    rows = {r["cell"]: r for r in out["rows"]}
    # sweep order, seed and shared overrides left out; then best-of-n from each seed's SFT model
    assert list(rows) == ["sft (start)", "dpo_0.1", "dpo_1.0", "best-of-1 (sft)", "best-of-4 (sft)"]
    gold = [GOLD[("dpo_0.1", s)] for s in range(3)]
    assert rows["dpo_0.1"]["gold reply rate"] == pytest.approx(report.mean_ci(gold))
    gains = [GOLD[("dpo_1.0", s)] - SFT[s] for s in range(3)]
    assert rows["dpo_1.0"]["gain over SFT"] == pytest.approx(report.mean_ci(gains))  # paired per seed
    assert rows["sft (start)"]["gold reply rate"][0] == pytest.approx(statistics.fmean(SFT.values()))
    assert rows["dpo_0.1"]["seeds"] == [0, 1, 2]

    text = (sweep / "report.md").read_text()
    assert "95% Student-t" in text and "| dpo_0.1 | 3 | 0.290 ± 0.066 |" in text
    assert "| 4 | dpo_1.0 | 1 | 0.250 | 0.014 |" in text  # per-job standard error of the gold reply rate
    assert "Not finished (no summary.json): 6" in text
    with open(sweep / "report.csv") as f:
        table = list(csv.DictReader(f))
    dpo = next(r for r in table if r["arm"] == "dpo_0.1")
    mean, half = report.mean_ci(gold)
    assert float(dpo["gold reply rate ci95_low"]) == pytest.approx(mean - half)
    assert float(dpo["gold reply rate ci95_high"]) == pytest.approx(mean + half)
    with open(sweep / "report_jobs.csv") as f:
        assert len(list(csv.DictReader(f))) == len(GOLD)
    assert (sweep / "report.png").stat().st_size > 1000
    assert "dpo_0.1" in capsys.readouterr().out


def test_bars_for_ablations_without_a_frontier(tmp_path):
    sweep = make_sweep(tmp_path, experiment="kto_imbalance")
    out = report.report(sweep)
    assert out["experiment"] == "kto_imbalance"
    assert "pairs kept" in (sweep / "report.md").read_text()  # the ablation's own columns
    assert (sweep / "report.png").exists()


def test_wandb_summary_table_in_the_sweeps_group(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = make_sweep(tmp_path, logger="wandb")
    logged = report.report(sweep)["wandb"]  # the jobs logged to W&B: so does the report
    assert logged["group"] == sweep.name  # the group every job of the sweep logged under (rlmf.train.main)
    assert {"report/table", "report/dpo_0.1/gold reply rate"} <= set(logged["summary"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))  # the offline run, for `wandb sync`


def test_docs_block_is_filled_from_the_report(tmp_path):
    sweep = make_sweep(tmp_path)
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text("# Results\n\n<!-- report:dpo_beta -->\nNot run yet.\n<!-- /report:dpo_beta -->\n\n## next\n"
                    "<!-- report:apo_anchor -->\nNot run yet.\n<!-- /report:apo_anchor -->\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report:dpo_beta:table -->\nold table\n<!-- /report:dpo_beta:table -->\nrest\n")
    report.report(sweep, docs=[page, readme])
    text = page.read_text()
    dpo_block = text.split("<!-- report:dpo_beta -->")[1].split("<!-- /report:dpo_beta -->")[0]
    assert "| dpo_0.1 | 3 | 0.290 ± 0.066 |" in dpo_block and "6 jobs in" in dpo_block
    assert "![dpo_beta](img/results/dpo_beta.png)" in dpo_block
    assert (tmp_path / "docs" / "img" / "results" / "dpo_beta.png").exists()
    assert text.endswith("## next\n<!-- report:apo_anchor -->\nNot run yet.\n<!-- /report:apo_anchor -->\n")

    # The README's short block: the summary table only, no per-job lines, no plot copied beside the README.
    short = readme.read_text()
    assert short.startswith("intro\n<!-- report:dpo_beta:table -->\nRun ") and short.endswith("\nrest\n")
    assert "| dpo_0.1 | 3 | 0.290 ± 0.066 |" in short and "Per job" not in short and "old table" not in short
    assert not (tmp_path / "img").exists()

    blockless = tmp_path / "other.md"
    blockless.write_text("no blocks here\n")
    with pytest.raises(SystemExit, match="other.md has no <!-- report:dpo_beta -->"):
        report.report(sweep, docs=[blockless])


def test_best_of_n_rows_per_seed(tmp_path):
    out = report.report(make_sweep(tmp_path, experiment="overoptimization"))
    bon = {r["cell"]: r for r in out["rows"] if r["kind"] == "bon"}
    assert list(bon) == ["best-of-1 (sft)", "best-of-4 (sft)"]
    assert bon["best-of-4 (sft)"]["gold reply rate"] == pytest.approx(report.mean_ci([SFT[s] + 0.04 for s in SFT]))
    assert bon["best-of-4 (sft)"]["gain over SFT"][0] == pytest.approx(0.04)
    assert bon["best-of-4 (sft)"]["KL vs SFT"][0] == pytest.approx(math.log(4) - 0.75)
    assert "| best-of-4 (sft) | 3 |" in (tmp_path / "sweep" / "report.md").read_text()


def test_a_real_model_sweep_reports_judge_pairs_kl_and_length(tmp_path):
    """experiment=smollm2_hh has no gold metric: its table reads the judge's win rate, the held-out pairs, KL and
    length beside the starting model's, with intervals over seeds, and its plot has one panel per PANELS entry."""
    sweep = tmp_path / "sweep"
    wins = {("dpo", 0): 0.60, ("dpo", 1): 0.55, ("dpo", 2): 0.65, ("grpo", 0): 0.40, ("grpo", 1): 0.50, ("grpo", 2): 0.45}
    for n, ((arm, seed), win) in enumerate(wins.items()):
        job = sweep / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            [f"+arm/smollm2_hh={arm}", f"seed={seed}", "experiment=smollm2_hh", "logger=csv"]))
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"runtime": {"choices": {"experiment": "smollm2_hh"}}}}))
        (job / "config_resolved.yaml").write_text(yaml.safe_dump({"seed": seed, "logger": {"kind": "csv"}}))
        (job / "summary.json").write_text(json.dumps({
            "winrate/aligned": win, "winrate_ci95/aligned": 0.1, "discriminator/reward/aligned": win,
            "discriminator/reward/initial": 0.5, "heldout/preference_accuracy/aligned": win - 0.1,
            "heldout/preference_accuracy/initial": 0.45, "heldout/rewards/accuracies/aligned": win,
            "heldout/rewards/margins/aligned": 0.01, "kl/aligned": 0.1 * (seed + 1), "length/aligned": 40.0 + n,
            "length/initial": 42.0, "discriminator/accuracy": 0.55, "judge/accuracy": 0.6}))
    out = report.report(sweep, use_wandb=False)
    rows = {r["cell"]: r for r in out["rows"]}
    assert set(rows) == {"dpo", "grpo"}, "no SFT row: the start is the checkpoint itself"
    assert rows["dpo"]["win rate vs start"] == pytest.approx(report.mean_ci([0.60, 0.55, 0.65]))
    assert rows["grpo"]["KL vs start"][0] == pytest.approx(0.2)
    assert rows["dpo"]["start's length"] == (42.0, 0.0)
    text = (sweep / "report.md").read_text()
    assert "| arm | seeds | win rate vs start | judge reward |" in text
    assert "| 3 | grpo | 0 | 0.400 | 0.100 | 0.300 | 0.100 | 43.000 | 0.550 | 0.600 |" in text
    with open(sweep / "report_jobs.csv") as f:
        assert next(csv.reader(f))[3:5] == ["winrate/aligned", "winrate_ci95/aligned"]
    assert (sweep / "report.png").stat().st_size > 10_000
