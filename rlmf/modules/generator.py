"""The generator: a causal-LM policy as a thin LightningModule.

One module serves SFT and every preference algorithm: a batch becomes completion log-probs (through
``rlmf.kernels.logprobs_from_hidden``, so the [tokens, vocab] logits are never materialised), the log-probs go to
the loss named by ``algo.name``, and the loss's metrics are logged. What a loss needs (reference log-probs, the
KTO mismatched completions, HyPO's online samples) is declared by the loss itself (``rlmf.losses``): its
``data_format`` says which batch it reads, ``requires_reference`` whether reference log-probs are computed, and
its argument names which tensors it is given.

Reference log-probs come from, in order: the batch (``reference_logps``, precomputed and cached on disk), the
policy with its LoRA adapter disabled (``reference_mode="lora"``), or a frozen copy of the starting policy, which
TR-DPO refreshes from the policy every ``reference_sync_steps`` optimiser steps
(:func:`rlmf.reference.mix_into_reference`).

A paired loss that names per-token inputs (``*_token_logps``, ``*_token_mask``: LD-DPO) is given the per-token
log-probs of the same forward, and one that names ``*_log_sum_sq_probs`` (WPO) the policy's ``log sum_v p(v)^2``
summed over each completion (:func:`rlmf.logprobs.completion_token_logps_and_sq_probs`); other losses take the
summed log-probs as before.

The decoder runs on the layout ``packing`` names (:mod:`rlmf.packing`; ``generator.packing``): with
``shared_prompt`` a pair's chosen and rejected rows, HyPO's samples of a prompt and a KTO row with its mismatched row
encode their prompt once, and no padding is computed. The numbers are those of the padded rows.

Batches (from ``rlmf.data``): ``paired`` and ``paired_online`` read ``[2B, T]`` chosen-then-rejected rows;
``paired_online`` also reads left-padded ``online_prompt_ids``/``online_prompt_mask`` and samples ``online_samples``
completions per prompt from the current policy; ``unpaired`` reads ``[B, T]`` rows with ``desirable`` and, for KTO,
``kl_*`` rows that pair each prompt with another row's completion.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import lightning as L
import torch
from torch import nn

from rlmf.generation import completion_rows, sample_tokens
from rlmf.logprobs import completion_logps, completion_token_logps, completion_token_logps_and_sq_probs
from rlmf.losses import bind_loss
from rlmf.packing import row_groups, stack_rows
from rlmf.placement import put
from rlmf.reference import check_reference_sync, mix_into_reference


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def adamw_with_cosine_schedule(module: L.LightningModule) -> Dict[str, Any]:
    """AdamW over the module's trainable parameters (``module.model``'s, and a value head's where there is one;
    ``hparams.lr``, ``hparams.weight_decay``) and a cosine schedule with ``hparams.warmup_ratio`` warm-up, stepped
    per optimiser step over the whole fit (``trainer.estimated_stepping_batches``: bounded by max_steps or
    max_epochs, accumulation included)."""
    h = module.hparams
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(int(h.warmup_ratio * total), total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Generator(L.LightningModule):
    """Trains ``model`` with the loss ``loss_name`` (``sft`` or any preference loss in ``rlmf.losses.LOSSES``)."""

    def __init__(self, model: nn.Module, *, loss_name: str = "sft", loss_kwargs: Optional[Dict[str, Any]] = None,
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                 reference: Optional[nn.Module] = None, reference_mode: str = "frozen", online_samples: int = 4,
                 max_new_tokens: int = 96, temperature: float = 1.0, stop_token_ids: Optional[List[int]] = None,
                 pad_token_id: Optional[int] = None, metric_prefix: str = "generator", packing: str = "none",
                 reference_sync_steps: Optional[int] = None, reference_mixup_alpha: float = 0.6,
                 sampler: str = "hf"):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "reference"])
        self.model = model
        # The frozen reference is deliberately not a submodule: it is never trained, saved in checkpoints (it is
        # rebuilt from the starting model), wrapped by DDP/FSDP, or switched to train mode by a parent's .train().
        # on_fit_start places it beside the policy, through the same placement path as every other model.
        self._reference = [reference.requires_grad_(False).eval()] if reference is not None else []
        self.loss_fn = bind_loss(loss_name, loss_kwargs)  # raises for hyperparameters the loss refuses
        check_reference_sync(reference_sync_steps, reference_mixup_alpha,
                             reference_mode if reference is not None else "none", self.loss_fn.data_format)
        self._step_started = None
        self._reference_synced_at = 0  # the optimiser step of the last TR-DPO refresh

    @property
    def reference(self) -> Optional[nn.Module]:
        return self._reference[0] if self._reference else None

    def on_fit_start(self) -> None:
        # from_pretrained returns models in eval mode and Lightning keeps submodules' modes: without this the
        # policy would train with dropout off and gradient checkpointing (train mode only) silently off.
        self.train()
        if self.reference is not None:
            dtype = next(p for p in self.model.parameters()).dtype
            put(self.reference, self.device, dtype if dtype.is_floating_point else None, train=False)

    # --- log-probs ----------------------------------------------------------------------------------------------
    # Rows that share a prompt (a pair's chosen and rejected rows, HyPO's k samples of a prompt, a KTO row and its
    # mismatched row) are given one group id: with packing=shared_prompt the decoder encodes their prompt once.
    def _logps(self, model: nn.Module, rows: Tuple[torch.Tensor, ...], groups: Optional[torch.Tensor],
               temperature: float, score: Callable = completion_logps) -> Tuple[torch.Tensor, ...]:
        """``score`` (:func:`rlmf.logprobs.completion_logps` or one of its per-token siblings) of ``rows``."""
        return score(model, *rows, temperature=temperature, packing=self.hparams.packing, groups=groups)

    @staticmethod
    def _rows(batch: Dict[str, torch.Tensor], prefix: str) -> Tuple[torch.Tensor, ...]:
        return batch[prefix + "input_ids"], batch[prefix + "attention_mask"], batch[prefix + "labels"]

    def policy_logps(self, batch: Dict[str, torch.Tensor], prefix: str = "", temperature: float = 1.0,
                     groups: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs and token counts ``[B]`` of the rows ``prefix*`` under the policy."""
        return self._logps(self.model, self._rows(batch, prefix), groups, temperature)

    @torch.no_grad()
    def reference_logps(self, batch: Dict[str, torch.Tensor], prefix: str = "", temperature: float = 1.0,
                        groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Reference log-probs of the rows ``prefix*``: precomputed in the batch (``reference_logps`` for the rows,
        ``reference_kl_logps`` for KTO's ``kl_`` rows), the policy with its LoRA adapter off, or the frozen copy."""
        cached = {"": "reference_logps", "kl_": "reference_kl_logps"}.get(prefix)
        if cached in batch:
            return batch[cached]
        return self._reference_logps(self._rows(batch, prefix), groups, temperature, prefix)

    def _reference_logps(self, rows: Tuple[torch.Tensor, ...], groups: Optional[torch.Tensor], temperature: float,
                         what: str = "", score: Callable = completion_logps) -> torch.Tensor:
        """The reference forward, under ``inference_mode`` (no autograd bookkeeping at all); the result (``[B]``, or
        ``[B, T]`` for a per-token ``score``) is cloned out of it so that the loss may use it like any tensor."""
        if self.hparams.reference_mode != "lora" and self.reference is None:
            raise RuntimeError(f"loss {self.hparams.loss_name!r} needs reference log-probs for the {what or 'main'}"
                               " rows, but the batch has none and no reference model was given (algo.reference)")
        with torch.inference_mode():
            if self.hparams.reference_mode == "lora":
                with self.model.disable_adapter():
                    logps = self._logps(self.model, rows, groups, temperature, score)[0]
            else:
                logps = self._logps(self.reference, rows, groups, temperature, score)[0]
        return logps.clone()

    def _reference_with_mismatched(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """KTO's reference log-probs of its rows and of their mismatched ``kl_`` rows: one forward in which row ``i``
        and its mismatched row share prompt ``i`` (unless both are cached in the batch)."""
        if "reference_logps" in batch or "reference_kl_logps" in batch:
            return self.reference_logps(batch), self.reference_logps(batch, "kl_")
        n = batch["input_ids"].shape[0]
        rows = stack_rows(self._rows(batch, ""), self._rows(batch, "kl_"))
        both = self._reference_logps(rows, torch.arange(n).repeat(2), 1.0, "main and kl_")
        return both[:n], both[n:]

    @torch.no_grad()
    def sample_online(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``online_samples`` completions per left-padded prompt from the current policy at ``temperature``
        (nothing else applied, every stop token honoured), as labelled rows ``online_*`` ``[B * k, P + L]``."""
        k = self.hparams.online_samples
        tokens, keep = sample_tokens(
            self.model, prompt_ids, prompt_mask, max_new_tokens=self.hparams.max_new_tokens, do_sample=True,
            temperature=self.hparams.temperature, stop_ids=self.hparams.stop_token_ids or [],
            pad_token_id=self.hparams.pad_token_id, num_return_sequences=k, sampler=self.hparams.sampler)
        rows = completion_rows(prompt_ids, prompt_mask, tokens, keep, self.hparams.pad_token_id)
        return dict(zip(("online_input_ids", "online_attention_mask", "online_labels"), rows))

    # --- training -----------------------------------------------------------------------------------------------
    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _from_all_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """``[B]`` -> ``[world_size * B]``: a batch statistic (KTO's reference point z) over the global batch, as
        one process would compute it. Gathered values carry no gradient (z is detached by definition)."""
        if self._world_size() == 1:
            return values
        return self.all_gather(values.detach()).reshape(-1)

    def _per_rank_token_share(self, lengths: torch.Tensor) -> torch.Tensor:
        """Token counts rescaled so that the SFT token mean on each rank, averaged by DDP, equals the token mean of
        the global batch: each rank divides its summed NLL by ``global_tokens / world_size`` instead of its own
        token count (which differs between ranks)."""
        world = self._world_size()
        if world == 1:
            return lengths
        global_tokens = self.all_gather(lengths.sum()).sum()
        return lengths.double() * (global_tokens.double() / world) / lengths.sum().clamp(min=1)

    def _loss_inputs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        fmt, needs_reference = self.loss_fn.data_format, self.loss_fn.requires_reference
        if fmt == "sft":
            logps, lengths = self.policy_logps(batch)
            return {"policy_logps": logps, "lengths": self._per_rank_token_share(lengths)}
        if fmt == "unpaired":
            logps, lengths = self.policy_logps(batch)
            inputs = {"policy_logps": logps, "lengths": lengths, "desirable": batch["desirable"]}
            if "policy_kl_logps" in self.loss_fn.inputs:
                with torch.no_grad():  # the KL reference point z is detached by definition
                    inputs["policy_kl_logps"] = self._from_all_ranks(self.policy_logps(batch, "kl_")[0])
                reference, reference_kl = self._reference_with_mismatched(batch)
                inputs["reference_kl_logps"] = self._from_all_ranks(reference_kl)
            else:
                reference = self.reference_logps(batch) if needs_reference else None
            inputs["reference_logps"] = reference
            return inputs
        inputs = self._paired_inputs(batch)
        b = inputs["policy_chosen_logps"].shape[0]
        if fmt == "paired_online":
            # Scored at the temperature they were sampled at, so the KL estimate is of the distribution sampled.
            online = self.sample_online(batch["online_prompt_ids"], batch["online_prompt_mask"])
            k, t = self.hparams.online_samples, self.hparams.temperature
            prompts = torch.arange(b, device=batch["input_ids"].device).repeat_interleave(k)  # k per prompt, adjacent
            inputs["policy_online_logps"] = self.policy_logps(online, "online_", t, prompts)[0].view(b, k)
            inputs["reference_online_logps"] = self.reference_logps(online, "online_", t, prompts).view(b, k)
        return inputs

    def _paired_inputs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A paired loss's inputs from ``[2B]`` chosen-then-rejected rows: the ``[B]`` summed log-probs and lengths,
        and the per-token ``[B, T]`` tensors or WPO's ``log sum_v p(v)^2`` sums where the loss names them."""
        wanted, pairs = self.loss_fn.inputs, row_groups(batch)  # chosen row i and rejected row B + i share prompt i
        sq_probs = any(i.endswith("_log_sum_sq_probs") for i in wanted)
        per_row: Dict[str, torch.Tensor] = {}  # "{}" is chosen or rejected
        if sq_probs or any(i.endswith(("_token_logps", "_token_mask")) for i in wanted):
            score = completion_token_logps_and_sq_probs if sq_probs else completion_token_logps
            token_logps, mask, *log_sum_sq = self._logps(self.model, self._rows(batch, ""), pairs, 1.0, score)
            logps, lengths = token_logps.sum(-1), mask.sum(-1)  # what completion_logps returns
            per_row.update({"policy_{}_token_logps": token_logps, "{}_token_mask": mask})
            if sq_probs:
                per_row["policy_{}_log_sum_sq_probs"] = log_sum_sq[0].sum(-1)
        else:
            logps, lengths = self.policy_logps(batch, groups=pairs)
        per_row.update({"policy_{}_logps": logps, "{}_lengths": lengths})
        if self.loss_fn.requires_reference and self.loss_fn.reference_per_token:
            if "reference_logps" in batch:
                raise RuntimeError(f"loss {self.hparams.loss_name!r} needs the reference's per-token log-probs, but "
                                   "the batch holds precomputed sums (algo.reference=precomputed): use frozen or lora")
            reference = self._reference_logps(self._rows(batch, ""), pairs, 1.0, score=completion_token_logps)
            per_row.update({"reference_{}_token_logps": reference, "reference_{}_logps": reference.sum(-1)})
        elif self.loss_fn.requires_reference:
            per_row["reference_{}_logps"] = self.reference_logps(batch, groups=pairs)
        b = logps.shape[0] // 2
        inputs = {}
        for pattern, value in per_row.items():
            inputs[pattern.format("chosen")], inputs[pattern.format("rejected")] = value[:b], value[b:]
        return inputs

    def _shared_step(self, batch: Dict[str, torch.Tensor], split: str) -> torch.Tensor:
        inputs = self._loss_inputs(batch)
        wanted = self.loss_fn.inputs
        if "weights" in batch and self.loss_fn.takes_weights:  # per-example evidence (issue #12)
            wanted = (*wanted, "weights")
            inputs["weights"] = batch["weights"]
        result = self.loss_fn(**{k: v for k, v in inputs.items() if k in wanted and v is not None})
        batch_size = batch["input_ids"].shape[0]
        metrics = {"loss": result.loss.detach(), **result.metrics}
        # Per-token means beside the losses' own (TRL-named) sums: logps_per_token/chosen, .../rejected, ...
        for name, value in inputs.items():
            if name.startswith("policy_") and name.endswith("_logps") and value.dim() == 1:
                part = name[len("policy_"):-len("_logps")]
                lengths = inputs.get(f"{part}_lengths") if part else inputs.get("lengths")
                if lengths is not None:
                    metrics[f"logps_per_token/{part or 'all'}"] = value.detach().sum() / lengths.sum().clamp(min=1)
        self.log_metrics(metrics, split, batch_size)
        return result.loss

    def log_metrics(self, metrics: Dict[str, torch.Tensor], split: str, batch_size: int) -> None:
        """``<metric_prefix>/<split>/<name>`` for each metric, once: per step in training, per epoch otherwise."""
        on_step = split == "train"
        for name, value in metrics.items():
            self.log(f"{self.hparams.metric_prefix}/{split}/{name}", value, prog_bar=name == "loss",
                     on_step=on_step, on_epoch=not on_step, batch_size=batch_size, sync_dist=not on_step)

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
        self._sync_reference()

    # --- TR-DPO: the frozen reference refreshed from the policy ----------------------------------------------------
    def _sync_reference(self) -> None:
        """After every ``reference_sync_steps``-th optimiser step (not every micro-batch of an accumulated one):
        ``reference <- alpha * policy + (1 - alpha) * reference`` (Gorbatovski et al. 2024; TRL's
        ``sync_ref_model``)."""
        every, step = self.hparams.reference_sync_steps, self.trainer.global_step
        if every is None or step == 0 or step % every or step == self._reference_synced_at:
            return
        mix_into_reference(self.reference, self.model, self.hparams.reference_mixup_alpha)
        self._reference_synced_at = step

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # A refreshed reference is no longer the starting policy it is rebuilt from: resuming needs its weights.
        if self.hparams.reference_sync_steps is not None:
            checkpoint["reference_state_dict"] = self.reference.state_dict()
            checkpoint["reference_synced_at"] = self._reference_synced_at

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if self.hparams.reference_sync_steps is not None and "reference_state_dict" in checkpoint:
            self.reference.load_state_dict(checkpoint["reference_state_dict"])
            self._reference_synced_at = checkpoint["reference_synced_at"]

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def configure_optimizers(self):
        return adamw_with_cosine_schedule(self)
