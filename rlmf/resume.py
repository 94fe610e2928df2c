"""Preemption and exact resume of a training stage.

* **Atomic checkpoints.** Every Lightning checkpoint is written through :func:`rlmf.files.write_atomic` (a
  per-process temporary file and a rename), so a job killed while saving leaves the previous ``last.ckpt`` whole.
* **SIGTERM / SIGINT.** What SLURM sends before preemption (and Ctrl-C): Lightning stops at the next batch boundary;
  :class:`SaveOnInterrupt` then saves ``last.ckpt`` and the job exits with a non-zero status
  (:data:`EXIT_PREEMPTED`), so a scheduler (and a person) can tell it did not finish.
* **SLURM through submitit.** submitit requeues a job on its time-limit/preemption signal (SIGUSR2) and exits at
  once, mid-step. During ``fit`` that signal is turned into a SIGTERM instead (:func:`requeue_signal_as_sigterm`):
  the stage stops at the batch boundary and saves ``last.ckpt`` first, then submitit requeues, and the requeued job
  resumes from that very step.
* **Exact resume.** Re-running the job in its directory resumes the interrupted stage from ``last.ckpt``:
  Lightning restores the model, optimiser, schedule and loop counters; :class:`RandomState` restores the Python,
  NumPy and torch generators (dropout, online sampling); the training batches continue from the next one
  (:mod:`rlmf.data.loading`). A job killed outright (SIGKILL) between checkpoints replays the steps after the last
  one identically.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rlmf.files import write_atomic

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a job ended by SIGTERM


class Preempted(SystemExit):
    """A stage stopped by SIGTERM/SIGINT after saving ``last.ckpt``; exits with :data:`EXIT_PREEMPTED`."""

    def __init__(self, stage: str, checkpoint: Optional[Path]):
        super().__init__(EXIT_PREEMPTED)
        self.stage, self.checkpoint = stage, checkpoint

    def __str__(self) -> str:
        return (f"stage {self.stage!r} interrupted; saved {self.checkpoint}. Re-run the same command in the same "
                "run directory (hydra.run.dir=...) to resume it")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through a per-process temporary file and an atomic rename."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(path, buffer.getvalue())


class RandomState(L.Callback):
    """Saves the Python, NumPy and torch (CPU and CUDA) random states in each checkpoint and restores them on
    resume, so dropout and online sampling continue as if the run had never stopped."""

    def state_dict(self) -> Dict[str, Any]:
        # Plain values only: Lightning loads checkpoints with torch.load(weights_only=True), which refuses arrays.
        name, keys, position, has_gauss, cached = np.random.get_state()
        numpy_state = (name, keys.tolist(), int(position), int(has_gauss), float(cached))
        state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        random.setstate(state["python"])
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class SaveOnInterrupt(L.Callback):
    """On SIGTERM (Lightning's ``SIGTERMException``) or SIGINT (``KeyboardInterrupt``) during ``fit``, save
    ``last.ckpt`` at the batch boundary where Lightning stopped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.saved: Optional[Path] = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.state.fn == TrainerFn.FITTING:
            trainer.save_checkpoint(self.path)
            self.saved = self.path


@contextlib.contextmanager
def requeue_signal_as_sigterm() -> Iterator[Callable[[], None]]:
    """Inside a submitit job (``SUBMITIT_EXECUTOR`` set), defer submitit's requeue signal: it raises a SIGTERM (which
    Lightning turns into a clean stop and :class:`SaveOnInterrupt` into a checkpoint) and is remembered; the yielded
    function then hands it to submitit's own handler, which requeues the job and exits. Elsewhere, or off the main
    thread (where signal handlers cannot be set), it changes nothing."""
    pending: List[Tuple[int, Any]] = []
    if not os.environ.get("SUBMITIT_EXECUTOR") or threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    from submitit import JobEnvironment

    signum = JobEnvironment._usr_sig()
    submitit_handler = signal.getsignal(signum)

    def defer(received: int, frame: Any) -> None:
        pending.append((received, frame))
        signal.raise_signal(signal.SIGTERM)

    def requeue() -> None:
        if pending and callable(submitit_handler):
            submitit_handler(*pending[0])

    signal.signal(signum, defer)
    try:
        yield requeue
    finally:
        signal.signal(signum, submitit_handler)


def fit(trainer: L.Trainer, module: L.LightningModule, stage: str, **kwargs: Any) -> None:
    """``trainer.fit``, turning a SIGTERM/SIGINT that :class:`SaveOnInterrupt` checkpointed into :class:`Preempted`
    (exit status :data:`EXIT_PREEMPTED`) instead of Lightning's silent exit status 0; under submitit, its requeue
    signal is honoured after that checkpoint (:func:`requeue_signal_as_sigterm`)."""
    saver = next((c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt)), None)
    with requeue_signal_as_sigterm() as requeue:
        try:
            trainer.fit(module, **kwargs)
        except SystemExit as exit_:  # SIGTERMException, and Lightning's sys.exit(1) after a KeyboardInterrupt
            if saver is not None and saver.saved is not None:
                preempted = Preempted(stage, saver.saved)
                log.warning("%s", preempted)
                requeue()  # submitit requeues and exits here when its signal caused the stop
                raise preempted from exit_
            raise
        requeue()  # a signal that came after the last step: the stage is done, the requeued job reuses it
