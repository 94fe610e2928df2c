"""The generator: a causal-LM policy as a thin LightningModule.

One module serves SFT and every preference algorithm: a batch becomes completion log-probs (through
``rlmf.kernels.logprobs_from_hidden``, so the [tokens, vocab] logits are never materialised), the log-probs go to
the loss named by ``algo.name``, and the loss's metrics are logged. What a loss needs (reference log-probs, the
KTO mismatched completions, HyPO's online samples) is declared by the loss itself (``rlmf.losses``).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Optional, Tuple

import lightning as L
import torch
from torch import nn

from rlmf.kernels import logprobs_from_hidden
from rlmf.losses import get_loss, loss_inputs

IGNORE_INDEX = -100


def decoder_of(model: nn.Module) -> nn.Module:
    """The causal LM without its head (``model.model`` for Llama), whatever wraps it (PEFT included)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


def completion_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled (completion) tokens and their counts, each [B].

    ``labels`` are aligned with ``input_ids`` (-100 where no loss is taken); the shift happens here: the hidden
    state at position t predicts the label at t+1.
    """
    hidden = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    head = model.get_output_embeddings()
    shifted = labels[:, 1:]
    token_logps = logprobs_from_hidden(
        hidden[:, :-1].reshape(-1, hidden.shape[-1]), head.weight, shifted.reshape(-1), bias=head.bias,
        temperature=temperature,
    ).view(shifted.shape)
    mask = shifted != IGNORE_INDEX
    return token_logps.sum(-1), mask.sum(-1)


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Generator(L.LightningModule):
    """Trains ``model`` with the loss ``loss_name`` (``sft`` or any preference loss in ``rlmf.losses.LOSSES``)."""

    def __init__(self, model: nn.Module, *, loss_name: str = "sft", loss_kwargs: Optional[Dict[str, Any]] = None,
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                 reference: Optional[nn.Module] = None, metric_prefix: str = "generator"):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "reference"])
        self.model = model
        self.reference = reference
        if self.reference is not None:
            self.reference.requires_grad_(False).eval()
        self.loss_fn = get_loss(loss_name)
        self.loss_kwargs = dict(loss_kwargs or {})
        self._step_started = None

    # --- log-probs ----------------------------------------------------------------------------------------------
    def policy_logps(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return completion_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])

    # --- training -----------------------------------------------------------------------------------------------
    def _loss_inputs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.loss_fn.data_format == "sft":
            logps, lengths = self.policy_logps(batch)
            return {"policy_logps": logps, "lengths": lengths}
        raise NotImplementedError(f"data format {self.loss_fn.data_format!r} is added with the alignment stage")

    def _shared_step(self, batch: Dict[str, torch.Tensor], split: str) -> torch.Tensor:
        inputs = self._loss_inputs(batch)
        wanted = loss_inputs(self.hparams.loss_name)
        result = self.loss_fn(**{k: v for k, v in inputs.items() if k in wanted}, **self.loss_kwargs)
        batch_size = batch["input_ids"].shape[0]
        on_step = split == "train"
        prefix = f"{self.hparams.metric_prefix}/{split}"
        self.log(f"{prefix}/loss", result.loss.detach(), prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size)
        for name, value in result.metrics.items():
            self.log(f"{prefix}/{name}", value, on_step=on_step, on_epoch=not on_step, batch_size=batch_size)
        return result.loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        self.log(f"{self.hparams.metric_prefix}/train/lr", self.trainer.optimizers[0].param_groups[0]["lr"],
                 on_step=True, batch_size=1)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._step_started
        tokens = int(batch["attention_mask"].sum())
        self.log(f"{self.hparams.metric_prefix}/train/tokens_per_second", tokens / max(elapsed, 1e-9), on_step=True,
                 batch_size=1)

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, self.trainer.max_steps)
        schedule = cosine_with_warmup(int(self.hparams.warmup_ratio * total), total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
