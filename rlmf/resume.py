"""Preemption and exact resume of a training stage.

* **Atomic checkpoints.** Every Lightning checkpoint is written through :func:`rlmf.files.write_atomic` (a
  per-process temporary file and a rename), so a job killed while saving leaves the previous ``last.ckpt`` whole.
* **SIGTERM / SIGINT.** What SLURM sends before preemption (and Ctrl-C): Lightning stops at the next batch boundary;
  :class:`SaveOnInterrupt` then saves ``last.ckpt`` and the job exits with a non-zero status
  (:data:`EXIT_PREEMPTED`), so a scheduler (and a person) can tell it did not finish.
* **Exact resume.** Re-running the job in its directory resumes the interrupted stage from ``last.ckpt``:
  Lightning restores the model, optimiser, schedule and loop counters; :class:`RandomState` restores the Python,
  NumPy and torch generators (dropout, online sampling); the training batches continue from the next one
  (:mod:`rlmf.data.loading`). A job killed outright (SIGKILL) between checkpoints replays the steps after the last
  one identically.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rlmf.files import write_atomic

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


def fit(trainer: L.Trainer, module: L.LightningModule, stage: str, **kwargs: Any) -> None:
    """``trainer.fit``, turning a SIGTERM/SIGINT that :class:`SaveOnInterrupt` checkpointed into :class:`Preempted`
    (exit status :data:`EXIT_PREEMPTED`) instead of Lightning's silent exit status 0."""
    saver = next((c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt)), None)
    try:
        trainer.fit(module, **kwargs)
    except SystemExit as exit_:  # SIGTERMException, and Lightning's sys.exit(1) after a KeyboardInterrupt
        if saver is not None and saver.saved is not None:
            raise Preempted(stage, saver.saved) from exit_
        raise
