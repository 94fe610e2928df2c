"""The main job end to end at tiny sizes: run directory contents, stage hand-off and resume, multirun."""

import json
import subprocess
import sys

from rlmf.train import run_job


def test_quick_job_writes_config_checkpoints_summary_and_plot(compose, tmp_path):
    cfg = compose("experiment=quick", "stage=sft")
    summary = run_job(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "config_resolved.yaml").exists()
    assert (run / "sft" / "generator" / "config.json").exists()
    assert (run / "sft" / "checkpoints" / "last.ckpt").exists()
    saved = json.loads((run / "summary.json").read_text())
    assert saved == summary
    assert saved["sft/val_loss_after"] < saved["sft/val_loss_before"]

    # A second job hands the SFT checkpoint on: only evaluation runs, on the first job's generators.
    cfg = compose("experiment=quick", "stage=evaluate", f"stage.from_run={run}")
    evaluated = run_job(cfg, tmp_path / "eval")
    assert {"gold/reply_rate/initial", "gold/reply_rate/sft"} <= set(evaluated)
    assert all(0.0 <= evaluated[k] <= 1.0 for k in evaluated if k.startswith("gold/"))
    assert (tmp_path / "eval" / "reply_rate_by_stage.png").stat().st_size > 1000
    assert not (tmp_path / "eval" / "sft").exists(), "a finished stage must be reused, not re-run"


def test_rerun_in_the_same_directory_resumes(compose, tmp_path):
    cfg = compose("experiment=quick", "stage=sft")
    run_job(cfg, tmp_path / "run")
    weights = tmp_path / "run" / "sft" / "generator" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    run_job(cfg, tmp_path / "run")
    assert weights.stat().st_mtime_ns == stamp, "a finished stage was trained again"


def test_multirun_gives_each_job_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "rlmf.train", "-m", "experiment=quick", "stage=sft", "trainer.max_steps=2,4",
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = sorted(json.loads((sweep / str(i) / "summary.json").read_text())["sft/steps"] for i in (0, 1))
    assert steps == [2, 4]
    assert (sweep / "0" / "config_resolved.yaml").exists() and (sweep / "1" / "config_resolved.yaml").exists()
