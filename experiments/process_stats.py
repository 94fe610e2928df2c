"""What the benchmark scripts measure of their own process on Linux: CPU time and the peak resident set (and, on a
GPU, the peak of the memory torch allocated there).

Peak memory is ``VmHWM`` from ``/proc/self/status``, reset to the current resident set by writing ``5`` to
``/proc/self/clear_refs``, so a measurement covers only what runs after the reset. Imported by the scripts in this
folder (they run as ``python experiments/<script>.py``, which puts this folder on the import path), which also write
their result rows through :func:`write_csv`.
"""

from __future__ import annotations

import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): less sensitive than wall time to a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status("VmRSS")


def peak_rss() -> int:
    """The peak resident set since the last :func:`reset_peak_rss` (or the process start), in bytes."""
    return proc_status("VmHWM")


def _kilobyte_field(path: str, key: str) -> Optional[int]:
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def proc_status(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...), in bytes."""
    value = _kilobyte_field("/proc/self/status", key)
    if value is None:
        raise RuntimeError(f"{key} not in /proc/self/status")
    return value


def meminfo(key: str) -> int:
    """A ``kB`` field of ``/proc/meminfo`` (``MemAvailable``, ...), in bytes; unbounded where there is none."""
    value = _kilobyte_field("/proc/meminfo", key)
    return value if value is not None else 1 << 62


class StepTimer:
    """Wall and CPU time of each training step, and the peak RSS over training, whichever loop drives it: call
    :meth:`train_start`, then :meth:`step_start` / :meth:`step_end` around each step, then :meth:`train_end`.

    With ``device="cuda"`` each mark first waits for the GPU (``torch.cuda.synchronize``), so a step's time covers its
    kernels, and the peak of ``torch.cuda.max_memory_allocated`` over training is kept too (``peak_gpu``, bytes, and
    ``base_gpu``, what was allocated when training started)."""

    def __init__(self, device: str = "cpu"):
        self.cuda = None
        if device == "cuda":
            import torch

            self.cuda = torch.cuda
        self.begin = self.cpu_begin = 0.0
        self.times, self.cpu_times = [], []
        self.base_rss = self.peak_rss = 0
        self.base_gpu = self.peak_gpu = None

    def _wait_for_gpu(self):
        if self.cuda:
            self.cuda.synchronize()

    def train_start(self):
        self._wait_for_gpu()
        if self.cuda:
            self.cuda.reset_peak_memory_stats()
            self.base_gpu = self.cuda.memory_allocated()
        self.base_rss = reset_peak_rss()

    def step_start(self):
        self._wait_for_gpu()
        self.begin, self.cpu_begin = time.perf_counter(), cpu_seconds()

    def step_end(self):
        self._wait_for_gpu()
        self.times.append(time.perf_counter() - self.begin)
        self.cpu_times.append(cpu_seconds() - self.cpu_begin)

    def train_end(self):
        self._wait_for_gpu()
        self.peak_rss = peak_rss()
        if self.cuda:
            self.peak_gpu = self.cuda.max_memory_allocated()


def lightning_step_timer(timer: StepTimer, before_step: Optional[Callable[[Any, Any], None]] = None,
                         after_step: Optional[Callable[[Any, Any], None]] = None):
    """A Lightning callback timing each training batch with ``timer``; ``before_step(trainer, batch)`` runs just
    before the clock starts, ``after_step(trainer, batch)`` just after it stops (e.g. to count tokens)."""
    import lightning as L

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            timer.train_start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if before_step is not None:
                before_step(trainer, batch)
            timer.step_start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.step_end()
            if after_step is not None:
                after_step(trainer, batch)

        def on_train_end(self, trainer, pl_module):
            timer.train_end()

    return Timer()


def transformers_step_timer(timer: StepTimer, on_log: Callable[[Dict[str, float]], None]):
    """A ``transformers`` trainer callback timing each optimiser step with ``timer``; ``on_log(logs)`` gets every
    non-empty log the trainer writes (e.g. to count tokens from TRL's ``num_tokens``)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timer.train_start()

        def on_step_begin(self, args, state, control, **kwargs):
            timer.step_start()

        def on_step_end(self, args, state, control, **kwargs):
            timer.step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                on_log(logs)

        def on_train_end(self, args, state, control, **kwargs):
            timer.train_end()

    return Timer()


def run_worker(script: str, spec: Dict[str, Any], result_mark: str, timeout: float) -> Dict[str, Any]:
    """Run ``python <script> --worker <spec as JSON>`` in a fresh process and return the JSON it printed after
    ``result_mark`` on its last such line, plus ``process_wall_s``; on a failure or timeout ``{"error": ...}`` (and
    ``stderr_tail``). Each benchmarked implementation runs this way, so none inherits another's memory or threads."""
    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    wall = time.perf_counter() - start
    results = [line for line in proc.stdout.splitlines() if line.startswith(result_mark)]
    if proc.returncode != 0 or not results:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"error": tail[0][:300], "stderr_tail": (proc.stderr or "")[-3000:]}
    return {**json.loads(results[-1][len(result_mark):]), "process_wall_s": wall}


def write_csv(path: Path, rows: Sequence[Dict[str, Any]], fields: List[str]) -> Path:
    """``rows`` as a CSV at ``path`` (its folder created), the columns ``fields`` in that order; keys of a row that
    are not among them are left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
