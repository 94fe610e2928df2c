"""The launcher presets for real: ``hydra/launcher=local_parallel`` runs sweep jobs in parallel processes with capped
torch threads; ``hydra/launcher=slurm`` writes the sbatch script its settings say and requeues a preempted job into
its own output directory (through submitit's SLURM signal handler, with stand-in ``sbatch``/``scontrol``); and
submitit's local executor runs a job, is preempted (SIGUSR2), requeues it, and the re-run resumes in the same
directory. No cluster needed.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LOG_FORMAT = "[%(asctime)s][%(process)d][%(name)s][%(levelname)s] - %(message)s"
LOG_LINE = re.compile(r"^\[(?P<time>[\d\- :,]+)\]\[(?P<pid>\d+)\]")


def _train(*args):
    return [sys.executable, "-m", "rlmf.train", "-m", "logger=none", *args]


def _job_dirs(sweep: Path):
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


# --- hydra/launcher=local_parallel -----------------------------------------------------------------------------

def test_local_parallel_runs_sweep_jobs_in_parallel_processes(compose, tmp_path):
    n_jobs = compose("hydra/launcher=local_parallel", return_hydra_config=True).hydra.launcher.n_jobs
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        _train("experiment=quick", "stage=sft", "trainer.max_steps=2,3,4,5", "hydra/launcher=local_parallel",
               f"hydra.sweep.dir={sweep}",
               # Hydra's own job log (train.log), with each line's process id
               f'hydra.job_logging.formatters.simple.format="{LOG_FORMAT}"'),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    jobs = _job_dirs(sweep)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]

    pid, start, end = {}, {}, {}
    for job in jobs:
        # each job's own steps, in its own directory
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        steps = int(re.search(r"trainer\.max_steps=(\d+)", overrides).group(1))
        assert json.loads((job / "summary.json").read_text())["sft/steps"] == steps
        pids = {int(m["pid"]) for m in map(LOG_LINE.match, (job / "train.log").read_text().splitlines()) if m}
        assert len(pids) == 1, f"{job.name}: one process per job, got {pids}"
        pid[job.name] = pids.pop()
        # Hydra writes .hydra/ when the job starts in its worker; summary.json is the job's last write
        start[job.name] = (job / ".hydra" / "config.yaml").stat().st_mtime
        end[job.name] = (job / "summary.json").stat().st_mtime

    workers = set(pid.values())
    assert proc.pid not in workers, "jobs ran in the launching process"
    assert 2 <= len(workers) <= n_jobs, f"jobs ran in {len(workers)} worker processes, n_jobs={n_jobs}"
    overlapping = [(a, b) for a in pid for b in pid if a < b and pid[a] != pid[b]
                   and start[a] < end[b] and start[b] < end[a]]
    assert overlapping, f"no two jobs in different processes overlapped in time: {start=} {end=}"


def test_local_parallel_caps_torch_threads_per_worker(compose):
    """The preset's joblib settings give each worker cpu_count // n_jobs torch threads (joblib's loky backend sets
    OMP_NUM_THREADS in the workers), so n_jobs jobs do not oversubscribe the cores."""
    from joblib import Parallel, cpu_count, delayed

    launcher = compose("hydra/launcher=local_parallel", return_hydra_config=True).hydra.launcher
    assert launcher.backend == "loky"
    expected = int(os.environ.get("OMP_NUM_THREADS", max(cpu_count() // launcher.n_jobs, 1)))
    threads = Parallel(n_jobs=launcher.n_jobs, backend=launcher.backend, prefer=launcher.prefer)(
        delayed(_torch_threads)() for _ in range(launcher.n_jobs))
    assert threads == [expected] * launcher.n_jobs


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# --- hydra/launcher=slurm, without a cluster --------------------------------------------------------------------

def _stand_in(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_slurm_preset_writes_its_sbatch_script_and_requeues_a_preempted_job_into_its_directory(
        compose, tmp_path, monkeypatch):
    """The preset through hydra-submitit-launcher's own launch(): stand-in ``srun``/``sbatch`` on PATH, so the real
    sbatch script and pickled jobs are written as on a cluster. Then submitit's SLURM signal handler, on SIGUSR2,
    requeues the job (stand-in ``scontrol``) with the launcher's checkpoint: the same Hydra job again."""
    import submitit
    from hydra.utils import instantiate
    from submitit.core.utils import DelayedSubmission

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    _stand_in(bin_dir, "srun", 'exec "$@"\n')
    _stand_in(bin_dir, "sbatch", f'echo "sbatch $*" >> {calls}\necho "Submitted batch job 4242"\n')
    _stand_in(bin_dir, "scontrol", f'echo "scontrol $*" >> {calls}\n')
    _stand_in(bin_dir, "sacct", "echo 'JobID|State|NodeList'\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # launch() waits for the jobs' results; there is no cluster to produce them
    monkeypatch.setattr(submitit.slurm.slurm.SlurmJob, "results", lambda self: ["no cluster"])

    sweep = tmp_path / "sweep"
    cfg = compose("experiment=quick", "stage=sft", "hydra/launcher=slurm", "hydra.launcher.partition=gpu-preempt",
                  f"hydra.sweep.dir={sweep}", return_hydra_config=True)
    preset = cfg.hydra.launcher
    launcher = instantiate(preset)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    jobs = [["experiment=quick", "stage=sft", f"trainer.max_steps={n}"] for n in (2, 4)]
    assert launcher.launch(jobs, initial_job_idx=0) == ["no cluster"] * 2

    assert (calls.read_text().split("\n")[0]).startswith("sbatch ")
    script = (sweep / ".submitit" / "4242" / "4242_submission.sh").read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))
    assert flags["partition"] == "gpu-preempt"
    assert flags["gpus-per-node"] == str(preset.gpus_per_node)
    assert flags["ntasks-per-node"] == str(preset.tasks_per_node)
    assert flags["cpus-per-task"] == str(preset.cpus_per_task)
    assert flags["mem"] == f"{preset.mem_gb}GB"
    assert flags["time"] == str(preset.timeout_min)
    assert flags["signal"] == f"USR2@{preset.signal_delay_s}"
    assert "requeue" in flags, "requeueable whatever the cluster's JobRequeue default"
    assert flags["array"] == f"0-1%{min(2, preset.array_parallelism)}" and flags["job-name"] == cfg.hydra.job.name
    assert flags["open-mode"] == "append", "a requeued job appends to its logs"
    assert re.search(r"^srun .* -u -m submitit.core._submit .*/sweep/\.submitit/%j$", script, re.M)

    # The job array's second task, running on a node, is preempted.
    folder = sweep / ".submitit" / "4242_1"
    submitted = DelayedSubmission.load(folder / "4242_1_submitted.pkl")
    assert submitted._timeout_countdown == preset.max_num_timeout > 0
    assert submitted.args[0] == jobs[1] and submitted.args[2] == 1
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(sweep / ".submitit" / "%j"),
                       "SLURM_JOB_ID": "4244", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "1",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "1"}.items():
        monkeypatch.setenv(key, value)
    env = submitit.JobEnvironment()
    assert env.job_id == "4242_1"
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR2)}
    try:
        env._handle_signals(env.paths, submitted)  # what submitit does when the job starts on its node
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(5)  # the handler runs (and exits) at the next bytecode
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert "scontrol requeue 4242_1" in calls.read_text()
    requeued = DelayedSubmission.load(folder / "4242_1_submitted.pkl")
    assert type(requeued.function) is type(launcher)
    # the same Hydra job: same overrides, sweep dir key and job number, so the same output directory
    assert requeued.args[:4] == submitted.args[:4]
    assert requeued.function.config.hydra.sweep.dir == str(sweep)
    assert requeued._timeout_countdown == preset.max_num_timeout, "a preemption does not use up a timeout"


def _children(pid: int):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's process through /proc")
def test_submitit_requeues_a_preempted_job_which_resumes_in_its_own_directory(tmp_path):
    """The local executor runs the job through submitit's machinery (pickled launcher, signal handler, requeue).
    SIGUSR2 mid-stage, as SLURM sends before a time limit or preemption: the launcher's checkpoint requeues the same
    Hydra job, which resumes the stage from last.ckpt in the same directory and finishes it."""
    sweep = tmp_path / "sweep"
    steps = 16
    proc = subprocess.Popen(
        _train("experiment=quick", "stage=sft", f"trainer.max_steps={steps}", "hydra/launcher=submitit_local",
               f"hydra.sweep.dir={sweep}"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        checkpoint = sweep / "0" / "sft" / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 240
        while not checkpoint.exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the job wrote no checkpoint"
            time.sleep(0.05)
        # submitit's local job id is its controller's pid; the controller runs the job as its child
        controller = next(int(p.name) for p in (sweep / ".submitit").iterdir() if p.name.isdigit())
        (task,) = _children(controller)
        os.kill(task, signal.SIGUSR2)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]

    assert [p.name for p in _job_dirs(sweep)] == ["0"]
    log = (sweep / "0" / "train.log").read_text()
    assert log.count("stage sft: starting") == 2, "the requeued job ran again in the same directory"
    # submitit's and Lightning's lines reach train.log or, if they log to their own handlers, the task's logs
    logs = log + "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert "Caught signal SIGUSR2" in logs and "Requeued job" in logs, logs[-3000:]
    assert f"Restoring states from the checkpoint path at {checkpoint}" in logs
    # The signal was deferred to the next batch boundary: last.ckpt was saved there, not at a periodic step.
    assert "stage 'sft' interrupted; saved" in logs, "submitit's signal must checkpoint before requeueing"
    assert json.loads((sweep / "0" / "summary.json").read_text())["sft/steps"] == steps


# --- Lightning under SLURM ---------------------------------------------------------------------------------------

def test_under_slurm_submitit_alone_requeues(compose, tmp_path, monkeypatch):
    """submitit requeues (USR2, re-submitting the Hydra job); Lightning's own SLURM auto-requeue (a USR1 handler that
    writes hpc_ckpt_N.ckpt and runs scontrol requeue itself) must be off so the two never both requeue."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from rlmf.run import Run
    from rlmf.trainer import make_trainer

    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(key, value)
    assert SLURMEnvironment.detect()
    trainer = make_trainer(Run(cfg=compose("experiment=quick", "logger=none"), run_dir=tmp_path), "sft", 4)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment), "ranks and addresses still come from SLURM"
    assert environment.auto_requeue is False
