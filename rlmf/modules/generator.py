"""The generator: a causal-LM policy as a thin LightningModule.

One module serves SFT and every preference algorithm: a batch becomes completion log-probs (through
``rlmf.kernels.logprobs_from_hidden``, so the [tokens, vocab] logits are never materialised), the log-probs go to
the loss named by ``algo.name``, and the loss's metrics are logged. What a loss needs (reference log-probs, the
KTO mismatched completions, HyPO's online samples) is declared by the loss itself (``rlmf.losses``): its
``data_format`` says which batch it reads, ``requires_reference`` whether reference log-probs are computed, and
its argument names which tensors it is given.

Reference log-probs come from, in order: the batch (``reference_logps``, precomputed and cached on disk), the
policy with its LoRA adapter disabled (``reference_mode="lora"``), or a frozen copy of the starting policy.

Batches (from ``rlmf.data``): ``paired`` and ``paired_online`` read ``[2B, T]`` chosen-then-rejected rows;
``paired_online`` also reads left-padded ``online_prompt_ids``/``online_prompt_mask`` and samples ``online_samples``
completions per prompt from the current policy; ``unpaired`` reads ``[B, T]`` rows with ``desirable`` and, for KTO,
``kl_*`` rows that pair each prompt with another row's completion.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Optional, Tuple

import lightning as L
import torch
from torch import nn

from rlmf.data.collate import IGNORE_INDEX
from rlmf.logprobs import completion_logps
from rlmf.losses import get_loss, loss_inputs


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
                 reference: Optional[nn.Module] = None, reference_mode: str = "frozen", online_samples: int = 4,
                 max_new_tokens: int = 96, eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 metric_prefix: str = "generator"):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "reference"])
        self.model = model
        self.reference = reference
        if self.reference is not None:
            self.reference.requires_grad_(False).eval()
        self.loss_fn = get_loss(loss_name)
        self.loss_kwargs = dict(loss_kwargs or {})
        self._step_started = None
        # The frozen reference is rebuilt from the starting checkpoint, never saved: checkpoints stay policy-sized.
        self.strict_loading = self.reference is None

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]

    # --- log-probs ----------------------------------------------------------------------------------------------
    def policy_logps(self, batch: Dict[str, torch.Tensor], prefix: str = "") -> Tuple[torch.Tensor, torch.Tensor]:
        return completion_logps(self.model, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                                batch[prefix + "labels"])

    @torch.no_grad()
    def reference_logps(self, batch: Dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        if not prefix and "reference_logps" in batch:
            return batch["reference_logps"]
        args = (batch[prefix + "input_ids"], batch[prefix + "attention_mask"], batch[prefix + "labels"])
        if self.hparams.reference_mode == "lora":
            with self.model.disable_adapter():
                return completion_logps(self.model, *args)[0]
        if self.reference is None:
            raise RuntimeError(f"loss {self.hparams.loss_name!r} needs reference log-probs, but the batch has none "
                               "and no reference model was given (algo.reference)")
        return completion_logps(self.reference, *args)[0]

    @torch.no_grad()
    def sample_online(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``online_samples`` completions per left-padded prompt from the current policy, as labelled rows."""
        k = self.hparams.online_samples
        was_training = self.model.training
        self.model.eval()
        sequences = self.model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0,
            max_new_tokens=self.hparams.max_new_tokens, num_return_sequences=k,
            eos_token_id=self.hparams.eos_token_id, pad_token_id=self.hparams.pad_token_id)
        self.model.train(was_training)
        width = prompt_ids.shape[1]
        generated = sequences[:, width:]
        eos = self.hparams.eos_token_id
        is_eos = generated == eos if eos is not None else torch.zeros_like(generated, dtype=torch.bool)
        # Keep tokens up to and including the first eos.
        keep = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
        labels = torch.cat([torch.full_like(prompt_ids.repeat_interleave(k, 0), IGNORE_INDEX),
                            generated.masked_fill(~keep, IGNORE_INDEX)], dim=1)
        mask = torch.cat([prompt_mask.repeat_interleave(k, 0), keep.long()], dim=1)
        return {"online_input_ids": sequences, "online_attention_mask": mask, "online_labels": labels}

    # --- training -----------------------------------------------------------------------------------------------
    def _loss_inputs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        fmt, needs_reference = self.loss_fn.data_format, self.loss_fn.requires_reference
        if fmt == "sft":
            logps, lengths = self.policy_logps(batch)
            return {"policy_logps": logps, "lengths": lengths}
        logps, lengths = self.policy_logps(batch)
        reference = self.reference_logps(batch) if needs_reference else None
        if fmt == "unpaired":
            inputs = {"policy_logps": logps, "lengths": lengths, "desirable": batch["desirable"],
                      "reference_logps": reference}
            if "policy_kl_logps" in loss_inputs(self.hparams.loss_name):
                with torch.no_grad():  # the KL reference point z is detached by definition
                    inputs["policy_kl_logps"] = self.policy_logps(batch, "kl_")[0]
                inputs["reference_kl_logps"] = self.reference_logps(batch, "kl_")
            return inputs
        b = logps.shape[0] // 2
        inputs = {"policy_chosen_logps": logps[:b], "policy_rejected_logps": logps[b:],
                  "chosen_lengths": lengths[:b], "rejected_lengths": lengths[b:]}
        if reference is not None:
            inputs.update(reference_chosen_logps=reference[:b], reference_rejected_logps=reference[b:])
        if fmt == "paired_online":
            online = self.sample_online(batch["online_prompt_ids"], batch["online_prompt_mask"])
            k = self.hparams.online_samples
            inputs["policy_online_logps"] = self.policy_logps(online, "online_")[0].view(b, k)
            inputs["reference_online_logps"] = self.reference_logps(online, "online_").view(b, k)
        return inputs

    def _shared_step(self, batch: Dict[str, torch.Tensor], split: str) -> torch.Tensor:
        inputs = self._loss_inputs(batch)
        wanted = loss_inputs(self.hparams.loss_name)
        result = self.loss_fn(**{k: v for k, v in inputs.items() if k in wanted and v is not None},
                              **self.loss_kwargs)
        batch_size = batch["input_ids"].shape[0]
        on_step = split == "train"
        prefix = f"{self.hparams.metric_prefix}/{split}"
        self.log(f"{prefix}/loss", result.loss.detach(), prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size)
        for name, value in result.metrics.items():
            self.log(f"{prefix}/{name}", value, on_step=on_step, on_epoch=not on_step, batch_size=batch_size)
        logps = {k: v for k, v in inputs.items() if k.startswith("policy_") and k.endswith("_logps")}
        for name, value in logps.items():
            lengths = inputs.get(name.replace("policy_", "").replace("_logps", "_lengths"), inputs.get("lengths"))
            mean = value.detach().sum() / lengths.sum() if lengths is not None and value.dim() == 1 else value.mean()
            self.log(f"{prefix}/logps/{name[len('policy_'):-len('_logps')] or 'all'}", mean.detach(),
                     on_step=on_step, on_epoch=not on_step, batch_size=batch_size)
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
