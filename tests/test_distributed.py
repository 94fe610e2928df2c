"""Several processes on Lightning's own DDP (gloo on CPU): one step on 2 processes with half the batch each equals
one step on 1 process with the whole batch; the quick pipeline runs end to end with only rank 0 writing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_step.py")


FORMATS = ("paired", "unpaired", "sft")


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """``{(devices, format): saved step}`` for 1 and 2 processes, every format."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for devices in (1, 2):
        proc = subprocess.run([sys.executable, str(SCRIPT), str(devices), ",".join(FORMATS), str(out / str(devices))],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return {(d, f): torch.load(out / f"{d}-{f}.pt") for d in (1, 2) for f in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_processes_with_half_the_batch_equal_one_with_all_of_it(fmt, steps):
    one, two = steps[1, fmt], steps[2, fmt]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["grads"].keys() == two["grads"].keys() and one["grads"]
    # The sharp check: the all-reduced gradients (AdamW's first step is nearly scale-free, so a gradient off by a
    # factor would still move the parameters alike).
    for name, grad in one["grads"].items():
        assert torch.allclose(two["grads"][name], grad, rtol=1e-4, atol=1e-7), name
    # Parameters after the step: AdamW divides by |g| + 1e-8, which amplifies float noise in gradients of ~1e-8
    # into differences of up to ~1e-5 (lr 1e-2); a real difference moves them by ~lr.
    for name, param in one["params"].items():
        assert torch.allclose(two["params"][name], param, rtol=0, atol=1e-4), name


def test_quick_pipeline_on_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("rlmf-train")), "experiment=quick", "trainer=ddp",
         "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("sft/steps", "feedback/pairs", "discriminator/accuracy", "align/steps", "gold/reply_rate/aligned",
                "kl/aligned"):
        assert key in summary, key
    # Rank 0 alone sampled the feedback and evaluated; rank 1 (its own log) waited and read the results.
    rank1 = (run_dir / "train_ddp_process_1.log").read_text()
    for stage in ("feedback", "evaluate"):
        assert f"stage {stage}: this rank waits for rank 0" in rank1, stage
    assert "this rank waits" not in (run_dir / "train.log").read_text()
    assert len(list((run_dir / "align").glob("pairs*.jsonl"))) == 1
    assert (run_dir / "align" / "generator" / "model.safetensors").exists()
