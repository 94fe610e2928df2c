"""A numerical guard for every Lightning fit: optimiser steps with a non-finite loss or gradient are skipped.

:class:`NonFiniteGuard` is one ``Callback`` for any LightningModule trained with automatic optimisation (the
generator and the discriminator alike). Per optimiser step it checks

- the loss of every micro-batch that went into the step (``on_before_backward``, so with ``accumulate_grad_batches``
  a NaN in any micro-batch of the window counts), and
- every gradient the optimiser is about to read (``on_before_optimizer_step``: after the backward of the window's
  last micro-batch, after DDP's all-reduce and the AMP scaler's unscale, and before gradient clipping).

A bad step is skipped: every parameter of the optimiser gets ``.grad = None``, which ``torch.optim`` (AdamW, Adam,
SGD, ...) treats as "no gradient": neither the parameter nor its state (``exp_avg``, ``exp_avg_sq``, ``step``) moves,
and weight decay is not applied either. Gradient clipping is switched off for that one step (nothing is left to
clip, and ``clip_grad_value_`` raises on an empty gradient list). The skip is counted in
``<prefix>/train/skipped_steps`` (cumulative, logged every optimiser step; ``prefix`` is the stage unless given) and
the count is part of the callback's checkpoint state, so it survives a resume.

``max_bad_steps`` bad steps in a row stop the run with :class:`NonFiniteStepError` (a ``FloatingPointError``) naming
the stage, the global step, the epoch and the batches involved (batch index, tensor shapes, the first token ids of
the first row and a fingerprint of each ``*input_ids`` tensor, and which inputs hold non-finite values). A good step
resets the streak. ``max_bad_steps`` of 0 or 1 both mean "never skip": the first bad step raises.

What it relies on, and what it does not cover:

- The skipped step still is a step for Lightning: ``trainer.global_step`` advances and the learning-rate scheduler
  steps (its ``interval="step"`` schedule moves on by one, exactly as when the AMP scaler skips a step); only the
  parameters and the optimiser state stay put. With ``max_steps`` the run therefore does that many fewer updates.
- DDP / FSDP: the decision is all-reduced (one ``[2]`` integer all-reduce per optimiser step), so every rank skips,
  counts and raises at the same step. Gradients are all-reduced before ``on_before_optimizer_step`` anyway (a NaN
  loss on one rank makes every rank's reduced gradients NaN), but a loss that is non-finite without poisoning the
  gradients, and FSDP's sharded gradients (each rank sees its own shard), would otherwise lead to different
  decisions, diverged replicas or a rank waiting forever in a collective.
- fp16 AMP (``precision="16-mixed"``, a ``GradScaler``): gradient overflow is the scaler's normal way of calibrating
  its scale and it skips those steps itself; they are counted in ``skipped_steps`` but neither extend nor reset the
  streak. A non-finite *loss* counts as usual. With an optimizer that unscales inside its step (``fused=True``) the
  guard makes the gradients NaN instead of ``None``, so the scaler still records its inf check and skips the step
  (``GradScaler.update`` fails when no gradient is left). bf16 (``bf16-mixed``, ``bf16-true``) has no scaler and
  every non-finite step counts.
- Cost: one host sync per optimiser step (the finiteness flags; the max-norm of every gradient is computed on the
  device), and the inputs of the current accumulation window are kept referenced until its optimiser step (to
  describe them in the error). Add the guard first among the callbacks: those after it (and the module's own
  ``on_before_optimizer_step``) see ``None`` gradients on a skipped step.
- Not for DeepSpeed (its engine owns the gradients and the step; setting ``.grad`` does nothing there): a warning
  is emitted at setup. Manual optimisation works per ``optimizer.step()`` call, but a module that clips by value
  itself (``self.clip_gradients(..., gradient_clip_algorithm="value")`` in ``configure_gradient_clipping``) would hit
  ``clip_grad_value_``'s error on a skipped step.
- ``training_step`` must still return its (non-finite) loss: returning ``None`` to skip hangs DDP.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

log = logging.getLogger(__name__)

# At most this many bad steps of a streak are described in the error (the first ones and the last one).
_DESCRIBED_STEPS = 4
_MAX_DESCRIPTION = 600  # characters per batch description


class NonFiniteStepError(FloatingPointError):
    """Raised by :class:`NonFiniteGuard` after ``max_bad_steps`` consecutive non-finite optimiser steps."""


def _tensors_all_finite(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """A 0-d bool tensor (no host sync): every element of every tensor is finite. ``None`` for no tensors.

    Uses the max-norm (``inf`` if any element is ``inf``, ``nan`` if any is ``nan``, never an overflow), batched per
    device with ``torch._foreach_norm`` where available.
    """
    by_device: Dict[torch.device, List[torch.Tensor]] = {}
    for t in tensors:
        if hasattr(t, "to_local"):  # DTensor (FSDP2 / tensor parallel): check this rank's shard
            t = t.to_local()
        if t.is_sparse:
            t = t.coalesce().values()
        by_device.setdefault(t.device, []).append(t)
    flags = []
    for group in by_device.values():
        try:
            norms = torch._foreach_norm(group, float("inf"))
        except (AttributeError, RuntimeError, TypeError):
            norms = [torch.linalg.vector_norm(t, float("inf")) for t in group]
        flags.append(torch.isfinite(torch.stack([n.float() for n in norms])).all())
    if not flags:
        return None
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def describe_batch(batch: Any, max_ids: int = 8) -> str:
    """A short, human-readable description of a batch that identifies its rows.

    Tensors give their shape and dtype; integer tensors whose name ends in ``ids`` also give the first ``max_ids``
    values of their first row and a crc32 fingerprint of the whole tensor; floating tensors holding NaN/inf say so.
    Nested dicts (``BatchEncoding`` too), lists and tuples are walked; strings give their first characters.
    """
    parts: List[str] = []

    def walk(name: str, obj: Any, depth: int) -> None:
        if depth > 4 or len(parts) > 32:
            return
        if isinstance(obj, torch.Tensor):
            text = f"{name or 'tensor'}={list(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
            if obj.is_floating_point() or obj.is_complex():
                if obj.numel() and not bool(torch.isfinite(obj).all()):
                    text += " (holds NaN/inf)"
            elif name.lower().endswith("ids") and obj.dim() and obj.numel():
                row = (obj if obj.dim() <= 1 else obj.reshape(-1, obj.shape[-1])[0])[:max_ids]
                data = obj.detach().cpu().contiguous()
                text += f" row0[:{max_ids}]={row.tolist()} crc32={zlib.crc32(data.numpy().tobytes()):08x}"
            parts.append(text)
        elif isinstance(obj, Mapping):
            for key, value in obj.items():
                walk(f"{name}.{key}" if name else str(key), value, depth + 1)
        elif isinstance(obj, str):
            parts.append(f"{name or 'str'}={obj[:40]!r}")
        elif isinstance(obj, (list, tuple)):
            if obj and all(isinstance(x, str) for x in obj):
                parts.append(f"{name or 'list'}=[{len(obj)} str] first {obj[0][:40]!r}")
            else:
                for i, value in enumerate(obj[:8]):
                    walk(f"{name}[{i}]", value, depth + 1)
        elif obj is not None and not callable(obj):
            parts.append(f"{name or 'value'}={type(obj).__name__}")

    walk("", batch, 0)
    text = ", ".join(parts) or type(batch).__name__
    return text if len(text) <= _MAX_DESCRIPTION else text[:_MAX_DESCRIPTION] + " ..."


class NonFiniteGuard(L.Callback):
    """Skip optimiser steps whose loss or gradients hold NaN/inf; stop after ``max_bad_steps`` in a row.

    Args:
        stage: the stage being trained (``sft``, ``discriminator``, ``align``, ...); named in errors and, unless
            ``metric_prefix`` is given, the prefix of the logged metric.
        max_bad_steps: consecutive bad optimiser steps that stop the run (the ``max_bad_steps``-th one raises;
            ``max_bad_steps - 1`` in a row are skipped). 0 and 1 both mean: raise at the first bad step.
        metric_prefix: the metric is ``<metric_prefix>/train/skipped_steps``; default ``stage``.
    """

    def __init__(self, stage: str, max_bad_steps: int = 5, metric_prefix: Optional[str] = None):
        super().__init__()
        if isinstance(max_bad_steps, bool) or not isinstance(max_bad_steps, int) or max_bad_steps < 0:
            raise ValueError(f"NonFiniteGuard: max_bad_steps={max_bad_steps!r} must be an integer >= 0")
        self.stage = stage
        self.max_bad_steps = max_bad_steps
        self.metric_name = f"{metric_prefix or stage}/train/skipped_steps"
        # Checkpointed state.
        self.skipped_steps = 0  # every skipped optimiser step of the fit, scaler overflows included
        self.bad_streak = 0  # consecutive bad steps that count towards max_bad_steps
        self.streak_descriptions: List[str] = []  # the first (and the latest) bad steps of the current streak
        # Per accumulation window (one optimiser step): its micro-batches and their losses' finiteness.
        self._window: List[Tuple[int, Any]] = []
        self._window_losses: List[Tuple[int, torch.Tensor]] = []
        self._stashed_clip_val: Optional[Any] = None
        self._clip_stashed = False

    # ---- state -----------------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(stage=self.stage)

    def state_dict(self) -> Dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "bad_streak": self.bad_streak,
                "streak_descriptions": list(self.streak_descriptions)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.bad_streak = int(state_dict.get("bad_streak", 0))
        self.streak_descriptions = list(state_dict.get("streak_descriptions", []))

    # ---- hooks -----------------------------------------------------------------------------------------------

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if type(trainer.strategy).__name__.startswith("DeepSpeed"):
            rank_zero_warn(f"NonFiniteGuard({self.stage!r}) cannot skip steps under DeepSpeed, which owns the "
                           "gradients and the optimiser step; use DeepSpeed's own overflow handling")

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._reset_window()

    def on_train_batch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._restore_clipping(trainer)
        # Windows are closed by on_before_optimizer_step; never hold more micro-batches than one window has.
        if len(self._window) >= max(1, trainer.accumulate_grad_batches):
            self._reset_window()
        self._window.append((batch_idx, batch))

    def on_before_backward(self, trainer: "L.Trainer", pl_module: "L.LightningModule", loss: torch.Tensor) -> None:
        batch_idx = self._window[-1][0] if self._window else -1
        self._window_losses.append((batch_idx, torch.isfinite(loss.detach()).all()))

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._restore_clipping(trainer)

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._restore_clipping(trainer)
        self._reset_window()

    def on_before_optimizer_step(self, trainer: "L.Trainer", pl_module: "L.LightningModule", optimizer: Any
                                 ) -> None:
        self._restore_clipping(trainer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads_ok = _tensors_all_finite([p.grad for p in params if p.grad is not None])
        losses_ok = torch.stack([ok for _, ok in self._window_losses]).all() if self._window_losses else None
        device = pl_module.device
        flags = torch.stack([
            (~losses_ok).to(device=device, dtype=torch.int32) if losses_ok is not None
            else torch.zeros((), dtype=torch.int32, device=device),
            (~grads_ok).to(device=device, dtype=torch.int32) if grads_ok is not None
            else torch.zeros((), dtype=torch.int32, device=device),
        ])
        # Every rank takes the decision of all ranks together (a no-op without a process group).
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        loss_bad, grad_bad = (bool(x) for x in flags.tolist())

        if not (loss_bad or grad_bad):
            self.bad_streak = 0
            self.streak_descriptions = []
        else:
            has_scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
            scaler_overflow = grad_bad and not loss_bad and has_scaler
            if not scaler_overflow:
                self.bad_streak += 1
                self._remember(self._describe_step(trainer, loss_bad, grad_bad))
                if self.bad_streak >= max(1, self.max_bad_steps):
                    self._reset_window()
                    raise NonFiniteStepError(self._error_message(trainer))
            self.skipped_steps += 1
            self._skip(trainer, optimizer, params, grad_bad)
            if trainer.gradient_clip_val:
                # Nothing is left to clip, and clip_grad_value_ raises on an empty list of gradients.
                self._stashed_clip_val, self._clip_stashed = trainer.gradient_clip_val, True
                trainer.gradient_clip_val = None
            if trainer.is_global_zero:
                log.warning("%s: skipped optimiser step at global step %d (non-finite %s; %d skipped so far, %d in a "
                            "row)", self.stage, trainer.global_step, self._what(loss_bad, grad_bad),
                            self.skipped_steps, self.bad_streak)
        pl_module.log(self.metric_name, float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=1)
        self._reset_window()

    # ---- helpers ---------------------------------------------------------------------------------------------

    @staticmethod
    def _skip(trainer: "L.Trainer", optimizer: Any, params: List[torch.Tensor], grad_bad: bool) -> None:
        """Make the coming ``optimizer.step()`` leave every parameter and its state as they are."""
        if (getattr(trainer.precision_plugin, "scaler", None) is not None
                and getattr(optimizer, "_step_supports_amp_scaling", False)):
            # A GradScaler with an optimizer that unscales inside its step (fused=True): the scaler has not looked
            # at the gradients yet, and with none left it fails ("No inf checks were recorded prior to update").
            # Non-finite gradients make it skip the step (and lower its scale) instead.
            if not grad_bad:
                for p in params:
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
            return
        # Every torch.optim optimizer leaves a parameter whose .grad is None alone: no update, no weight decay, no
        # change of its state (AdamW's exp_avg, exp_avg_sq and step). Under a GradScaler the inf check is already
        # recorded (Lightning unscales before on_before_optimizer_step), and the scaler skips or steps the no-op.
        for p in params:
            p.grad = None

    def _reset_window(self) -> None:
        self._window, self._window_losses = [], []

    def _restore_clipping(self, trainer: "L.Trainer") -> None:
        if self._clip_stashed:
            trainer.gradient_clip_val = self._stashed_clip_val
            self._stashed_clip_val, self._clip_stashed = None, False

    def _remember(self, description: str) -> None:
        if len(self.streak_descriptions) < _DESCRIBED_STEPS:
            self.streak_descriptions.append(description)
        else:
            self.streak_descriptions[-1] = description

    @staticmethod
    def _what(loss_bad: bool, grad_bad: bool) -> str:
        return " and ".join(name for name, bad in (("loss", loss_bad), ("gradients", grad_bad)) if bad)

    def _describe_step(self, trainer: "L.Trainer", loss_bad: bool, grad_bad: bool) -> str:
        bad_losses = {idx for idx, ok in self._window_losses if not bool(ok)}
        rank = f" on rank {trainer.global_rank}" if trainer.world_size > 1 else ""
        if loss_bad and not bad_losses:
            where = " (the non-finite loss was on another rank)"
        else:
            where = ""
        batches = [(idx, batch) for idx, batch in self._window if not bad_losses or idx in bad_losses]
        described = "; ".join(
            f"batch_idx={idx}{' (non-finite loss)' if idx in bad_losses else ''}: {describe_batch(batch)}"
            for idx, batch in batches) or "no batch recorded"
        return (f"global step {trainer.global_step} (epoch {trainer.current_epoch}), non-finite "
                f"{self._what(loss_bad, grad_bad)}{where}; batches{rank}: {described}")

    def _error_message(self, trainer: "L.Trainer") -> str:
        steps = "\n".join(f"  - {d}" for d in self.streak_descriptions)
        return (f"stage {self.stage!r}: {self.bad_streak} consecutive optimiser step(s) with a non-finite loss or "
                f"gradient (max_bad_steps={self.max_bad_steps}); stopped at global step {trainer.global_step}, "
                f"epoch {trainer.current_epoch}, after {self.skipped_steps} skipped step(s) so far. "
                f"Bad steps of this streak (first {_DESCRIBED_STEPS - 1} and the last):\n{steps}")
