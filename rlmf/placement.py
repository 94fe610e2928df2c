"""One placement path for every model: device, dtype and train/eval mode, in every stage.

Inside ``trainer.fit`` Lightning places the module it trains. Everything else (sampling feedback, scoring with the
discriminator, precomputing reference log-probs, evaluating, the frozen reference beside the policy) goes through
:func:`put`, so a model never stays wherever ``from_pretrained`` left it: on the CPU, in eval mode, in float32.

The run's placement follows the config:

* device: ``trainer.accelerator`` (``auto`` takes CUDA when there is one, else the CPU; under DDP each process
  uses its ``LOCAL_RANK``'s GPU);
* weights' dtype: ``generator.torch_dtype`` when set, else what ``trainer.precision`` implies (``bf16-true`` ->
  bfloat16, ``16-true`` -> float16, ``64-true`` -> float64, otherwise float32: mixed precision keeps float32
  weights and computes under autocast);
* autocast: ``bf16-mixed`` / ``16-mixed`` run inference under ``torch.autocast`` in that dtype, as training does.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "64",
              "transformer-engine")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
_TRUE_PRECISION_DTYPE = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64,
                         "64": torch.float64}
_MIXED_PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto`` -> ``bf16-mixed`` on a GPU that supports it, ``32-true`` otherwise; other values unchanged."""
    if precision != "auto":
        return precision
    if resolve_device(accelerator).type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def resolve_device(accelerator: str) -> torch.device:
    """The device this process computes on outside ``trainer.fit`` for ``trainer.accelerator``."""
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.accelerator={accelerator} but torch sees no CUDA device "
                           f"(torch {torch.__version__}); use trainer.accelerator=cpu or auto")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def put(model: nn.Module, device: torch.device, dtype: Optional[torch.dtype] = None, train: bool = False
        ) -> nn.Module:
    """Move ``model`` to ``device`` (and floating-point ``dtype``), in train or eval mode; returns it.

    The frozen parts of a model (no gradient) stay frozen; mode is set on every submodule, so a checkpoint that
    ``from_pretrained`` returned in eval mode trains with its dropout on.
    """
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    model.train(train)
    return model


@dataclass(frozen=True)
class Placement:
    """Where and how models run outside ``trainer.fit``: ``device``, weights' ``dtype``, ``autocast_dtype``."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    autocast_dtype: Optional[torch.dtype] = None

    @classmethod
    def from_config(cls, cfg) -> "Placement":
        """The placement of a composed job config (``trainer`` and ``generator`` groups)."""
        device = resolve_device(cfg.trainer.accelerator)
        precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
        named = cfg.generator.get("torch_dtype")
        dtype = DTYPES[named] if named else _TRUE_PRECISION_DTYPE.get(precision, torch.float32)
        autocast = _MIXED_PRECISION_DTYPE.get(precision) if device.type in ("cuda", "cpu") else None
        return cls(device=device, dtype=dtype, autocast_dtype=autocast)

    def put(self, model: nn.Module, train: bool = False, cast: bool = True) -> nn.Module:
        """:func:`put` with this placement; ``cast=False`` keeps the model's own dtype (a loaded discriminator)."""
        return put(model, self.device, self.dtype if cast else None, train)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """No gradients, and the run's autocast (mixed precision) around sampling, scoring and evaluation."""
        with torch.no_grad():
            if self.autocast_dtype is None:
                yield
            else:
                with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                    yield
