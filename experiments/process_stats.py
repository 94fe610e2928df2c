"""What the benchmark scripts measure of their own process on Linux: CPU time and the peak resident set.

Peak memory is ``VmHWM`` from ``/proc/self/status``, reset to the current resident set by writing ``5`` to
``/proc/self/clear_refs``, so a measurement covers only what runs after the reset. Imported by the scripts in this
folder (they run as ``python experiments/<script>.py``, which puts this folder on the import path).
"""

from __future__ import annotations

import resource
import time


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


def proc_status(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class StepTimer:
    """Wall and CPU time of each training step, and the peak RSS over training, whichever loop drives it: call
    :meth:`train_start`, then :meth:`step_start` / :meth:`step_end` around each step, then :meth:`train_end`."""

    def __init__(self):
        self.begin = self.cpu_begin = 0.0
        self.times, self.cpu_times = [], []
        self.base_rss = self.peak_rss = 0

    def train_start(self):
        self.base_rss = reset_peak_rss()

    def step_start(self):
        self.begin, self.cpu_begin = time.perf_counter(), cpu_seconds()

    def step_end(self):
        self.times.append(time.perf_counter() - self.begin)
        self.cpu_times.append(cpu_seconds() - self.cpu_begin)

    def train_end(self):
        self.peak_rss = peak_rss()
