"""Preemption and exact resume: a job interrupted in any stage and re-run in its directory ends with the same
summary.json as a job that was never interrupted.

In-process, an interruption is either a real SIGTERM delivered during training (Lightning stops at the batch
boundary, ``last.ckpt`` is saved, the job exits with status 143) or a crash between two periodic checkpoints (what a
SIGKILL leaves behind: the last periodic ``last.ckpt`` and nothing else); outside training a stage simply dies. One
test sends the real signals to a real ``rlmf-train`` process from outside.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import rlmf.run
import rlmf.trainer
from rlmf.resume import EXIT_PREEMPTED
from rlmf.train import run_job

# Quick sizes, with a discriminator stage long enough (>= 3 steps) to be interrupted in the middle.
QUICK = ("experiment=quick", "discriminator.max_epochs=3")


class Interrupt(L.Callback):
    """At ``step`` of ``stage``: SIGTERM to this process, or a crash (as if killed, without saving)."""

    def __init__(self, how):
        self.how, self.fired = how, False

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # >=: an online batch (a rollout) makes several optimiser steps at once
        if trainer.global_step >= self.step and not self.fired:
            self.fired = True
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise RuntimeError("injected crash between checkpoints")


class StageDies(RuntimeError):
    pass


def same_summary(got, want):
    """Equal, key by key and to the last bit, with NaN equal to NaN (a metric that is undefined in both)."""
    assert got.keys() == want.keys()
    differing = {k: (got[k], want[k]) for k in want
                 if not (got[k] == want[k] or (got[k] != got[k] and want[k] != want[k]))}
    assert not differing, differing


def _interrupt_in(monkeypatch, stage, how):
    """Make the next job stop in ``stage``: during training for sft/discriminator/align, while sampling otherwise."""
    make_trainer, generate = rlmf.trainer.make_trainer, rlmf.run.generate

    def trainer_with_interrupt(run, name, max_steps, validate=True, **kwargs):
        trainer = make_trainer(run, name, max_steps, validate, **kwargs)
        if name == stage:
            callback = Interrupt(how)
            # SIGTERM after the first periodic checkpoint; a crash strictly between two of them.
            every = max(1, max_steps // 4)
            callback.step = min(max_steps - 1, every + 1 if how == "sigterm" else every + max(1, every // 2))
            assert callback.step >= 1, f"{name} has too few steps ({max_steps}) to be interrupted mid-stage"
            trainer.callbacks.append(callback)
        return trainer

    calls = []

    def dying_generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise StageDies(f"{stage} killed while sampling")
        return generate(*args, **kwargs)

    monkeypatch.setattr(rlmf.trainer, "make_trainer", trainer_with_interrupt)
    if stage in ("feedback", "evaluate"):
        monkeypatch.setattr(rlmf.run, "generate", dying_generate)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rlmf.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rlmf.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(QUICK))
    GlobalHydra.instance().clear()
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_job(cfg, run_dir)
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("how", ["sigterm", "crash"])
def test_interrupted_in_every_stage_resumes_to_the_same_summary(uninterrupted, compose, tmp_path, how):
    run_dir = tmp_path / "run"
    for stage in ("sft", "feedback", "discriminator", "align", "evaluate"):
        with pytest.MonkeyPatch.context() as patch:
            _interrupt_in(patch, stage, how)
            with pytest.raises((SystemExit, RuntimeError)) as stopped:
                run_job(compose(*QUICK), run_dir)
        if stage in ("feedback", "evaluate"):
            assert isinstance(stopped.value, StageDies)
        elif how == "sigterm":
            assert isinstance(stopped.value, SystemExit) and stopped.value.code == EXIT_PREEMPTED
            assert (run_dir / stage / "checkpoints" / "last.ckpt").exists()
        assert not (run_dir / stage / "done.json").exists(), f"{stage} must not look finished"
        assert not list(run_dir.rglob("*.tmp")), "no half-written file left behind"
    run_job(compose(*QUICK), run_dir)
    same_summary(json.loads((run_dir / "summary.json").read_text()), uninterrupted)


def test_online_ppo_interrupted_mid_align_resumes_exactly(compose, tmp_path):
    """PPO's whole training state (policy, value head, optimiser, the adaptive KL coefficient, the sampling RNG and
    the prompt order) comes back: an align stage stopped by SIGTERM between rollouts ends as an uninterrupted one.
    (A crash between checkpoints resumes through the same checkpoint; the offline test above covers it.)"""
    ppo = (*QUICK, "algo=ppo", "algo.online.kl_target=1.0", "algo.optim.max_steps=6")
    base = tmp_path / "base"
    run_job(compose(*ppo, "stage.stages=[sft,feedback,discriminator]"), base)
    aligned = (*ppo, "stage.stages=[align,evaluate]", f"stage.from_run={base}")
    want = run_job(compose(*aligned), tmp_path / "uninterrupted")
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        _interrupt_in(patch, "align", "sigterm")
        with pytest.raises(SystemExit) as stopped:
            run_job(compose(*aligned), run_dir)
    assert stopped.value.code == EXIT_PREEMPTED
    assert (run_dir / "align" / "checkpoints" / "last.ckpt").exists() and not (run_dir / "align" / "done.json").exists()
    got = run_job(compose(*aligned), run_dir)
    assert "align/train/objective/kl" in got and "gold/reply_rate/aligned" in got
    same_summary(got, want)


REAL_SIGNALS = (*QUICK, "algo.optim.max_steps=40", "trainer.log_every_n_steps=1")


def _rlmf_train(run_dir, *overrides):
    return [str(Path(sys.executable).with_name("rlmf-train")), *REAL_SIGNALS, f"hydra.run.dir={run_dir}", *overrides]


def _kill_when(proc, path, sig, timeout=300):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, f"finished before {path} appeared"
        assert time.time() - start < timeout
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def test_real_signals_from_outside(compose, tmp_path):
    """A real ``rlmf-train`` process killed from outside (SIGTERM, then SIGKILL) and re-run in its directory ends
    with the summary of a job never interrupted. The uninterrupted job and the re-runs run in this process (the same
    ``run_job`` the command calls, without paying a second interpreter's imports); only the killed job must be a
    process of its own."""
    expected = run_job(compose(*REAL_SIGNALS), tmp_path / "base")
    # The killed process computes on as many threads as this one, so that its sums round as the others' do.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for sig, status in ((signal.SIGTERM, EXIT_PREEMPTED), (signal.SIGKILL, -signal.SIGKILL)):
        run_dir = tmp_path / sig.name
        proc = subprocess.Popen(_rlmf_train(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=env)
        # Once the align stage has written its first periodic checkpoint, it is training.
        assert _kill_when(proc, run_dir / "align" / "checkpoints" / "last.ckpt", sig) == status
        assert not (run_dir / "align" / "done.json").exists()
        same_summary(run_job(compose(*REAL_SIGNALS), run_dir), expected)
