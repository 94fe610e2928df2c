"""The online generator: GRPO and RLOO on completions the policy samples during training.

One :class:`OnlineGenerator` training step is one rollout and its updates (manual optimisation):

1. each prompt of the batch gets ``num_generations`` completions from the current policy
   (:func:`rlmf.feedback.rollouts.rollout`, which also keeps the sampling policy's per-token log-probs);
2. the reward (the run's ``reward=``) scores the decoded completions; a completion the reward could not score gets
   advantage 0 (it takes no part in the update) and is counted (``invalid_rewards``);
3. advantages, once per rollout: GRPO's group-relative ones (:func:`~rlmf.losses.advantages.group_advantages`,
   ``scale_rewards``); RLOO's leave-one-out ones (:func:`~rlmf.losses.advantages.rloo_advantages`) of the reward
   minus ``kl_coef`` times the completion's summed k1 KL to the reference
   (:func:`~rlmf.losses.policy_gradient.rloo_rewards`);
4. ``num_iterations`` passes over the rollout in minibatches of ``minibatch_size`` completions, one optimiser step
   each: ``loss = objective(...)`` (the registered ``grpo`` / ``rloo``), backward, gradient-norm clipping, step,
   and one step of the learning-rate schedule.

So ``trainer.global_step`` (and ``max_steps``, and the cosine schedule's length) counts optimiser steps:
``num_iterations * ceil(rows / minibatch_size)`` per training batch.

Reference log-probs (GRPO's k3 KL, RLOO's KL in the reward) come from a frozen copy of the starting policy, kept
out of the module's submodules (never trained, saved or wrapped) and placed beside the policy at fit start, like
:class:`rlmf.modules.generator.Generator`'s. Checkpoints hold the policy only.

Metrics, under ``<metric_prefix>/train/`` with TRL 1.16's names: ``reward``, ``reward_std`` (mean over prompts of
the group's std), ``frac_reward_zero_std``, ``completions/mean_length``, ``completions/clipped_ratio`` (no stop
token within ``max_new_tokens``), ``loss/policy``, ``kl``, ``clip_ratio/*``, ``invalid_rewards``, ``lr``, and the
reward's own metrics (``rewards/<name>/...``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import lightning as L
import torch
from torch import nn

from rlmf.feedback.rollouts import Rollout, rollout
from rlmf.logprobs import completion_token_logps
from rlmf.losses import get_loss, loss_inputs
from rlmf.losses.advantages import group_advantages, rloo_advantages
from rlmf.losses.policy_gradient import rloo_rewards
from rlmf.modules.generator import adamw_with_cosine_schedule
from rlmf.placement import put

# reward(prompts, completions) -> (scores [N], valid [N]) or a rlmf.rewards.RewardResult (which also has metrics)
RewardFn = Callable[[List[str], List[str]], Any]


def needs_reference(loss_name: str, kl_coef: float) -> bool:
    """Whether training ``loss_name`` needs reference log-probs: its objective takes them (GRPO's k3 KL), or the
    reward carries the KL (RLOO with ``kl_coef != 0``)."""
    return get_loss(loss_name).requires_reference or (loss_name == "rloo" and kl_coef != 0)


class OnlineGenerator(L.LightningModule):
    """Trains ``model`` with the online loss ``loss_name`` (``grpo`` or ``rloo``) on its own samples."""

    def __init__(self, model: nn.Module, tokenizer, reward: RewardFn, *, loss_name: str = "grpo",
                 loss_kwargs: Optional[Dict[str, Any]] = None, reference: Optional[nn.Module] = None,
                 num_generations: int = 4, num_iterations: int = 1, minibatch_size: Optional[int] = None,
                 temperature: float = 1.0, max_new_tokens: int = 96, scale_rewards: str = "group",
                 kl_coef: float = 0.05, lr: float = 1e-4, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                 gradient_clip_val: Optional[float] = 1.0, stop_token_ids: Optional[List[int]] = None,
                 pad_token_id: Optional[int] = None, metric_prefix: str = "align"):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "tokenizer", "reward", "reference"])
        self.automatic_optimization = False
        self.model, self.tokenizer, self.reward = model, tokenizer, reward
        self.loss_fn = get_loss(loss_name)
        if self.loss_fn.data_format != "online":
            raise ValueError(f"OnlineGenerator trains the online losses; {loss_name!r} is "
                             f"{self.loss_fn.data_format!r} (use rlmf.modules.generator.Generator)")
        if num_generations < 2:
            raise ValueError(f"num_generations={num_generations} must be at least 2 (advantages compare the "
                             "completions of a prompt)")
        if needs_reference(loss_name, kl_coef) and reference is None:
            raise ValueError(f"{loss_name} needs a reference model here (its loss, or kl_coef={kl_coef})")
        self.loss_kwargs = dict(loss_kwargs or {})
        # Not a submodule: see the module docstring.
        self._reference = [reference.requires_grad_(False).eval()] if reference is not None else []

    @property
    def reference(self) -> Optional[nn.Module]:
        return self._reference[0] if self._reference else None

    def on_fit_start(self) -> None:
        self.train()  # from_pretrained gives eval mode; Lightning keeps submodules' modes
        if self.reference is not None:
            dtype = next(p for p in self.model.parameters()).dtype
            put(self.reference, self.device, dtype if dtype.is_floating_point else None, train=False)

    # --- one rollout ----------------------------------------------------------------------------------------------
    def _rollout(self, batch: Dict[str, Any]) -> Rollout:
        h = self.hparams
        return rollout(self.model, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"],
                       num_generations=h.num_generations, temperature=h.temperature,
                       max_new_tokens=h.max_new_tokens, stop_ids=h.stop_token_ids or [], pad_token_id=h.pad_token_id)

    def _score(self, prompts: List[str], rows: Rollout):
        """``(scores [N] float32, valid [N] bool, reward metrics)`` on this device; invalid scores are 0."""
        g = self.hparams.num_generations
        result = self.reward([p for p in prompts for _ in range(g)], rows.texts)
        scores, valid = result
        metrics = dict(getattr(result, "metrics", {}) or {})
        valid = torch.as_tensor(valid, dtype=torch.bool).to(self.device)
        scores = torch.as_tensor(scores, dtype=torch.float32).to(self.device)
        valid = valid & torch.isfinite(scores)
        return torch.where(valid, scores, torch.zeros_like(scores)), valid, metrics

    def _advantages(self, scores: torch.Tensor, valid: torch.Tensor, rows: Rollout,
                    reference_logps: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per-completion advantages ``[N]`` (0 for invalid rows) and the rollout's reward statistics.

        An invalid row's score is replaced by the mean of its group's valid scores before the group statistics,
        so it moves neither the group mean nor the baselines of the others much; its own advantage is then 0.
        """
        h = self.hparams
        grouped, ok = scores.view(-1, h.num_generations), valid.view(-1, h.num_generations)
        group_mean = (grouped * ok).sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp(min=1)
        filled = torch.where(ok, grouped, group_mean).reshape(-1)
        stats = {"reward": filled[valid].mean() if valid.any() else torch.tensor(float("nan"), device=self.device),
                 "reward_std": filled.view(-1, h.num_generations).std(1).mean(),
                 "frac_reward_zero_std": (filled.view(-1, h.num_generations).std(1) < 1e-8).float().mean()}
        if h.loss_name == "rloo":
            if reference_logps is not None:
                old_sum = (rows.old_logps * rows.mask).sum(-1)
                ref_sum = (reference_logps * rows.mask).sum(-1)
                stats["kl"] = (old_sum - ref_sum).mean()
                filled = rloo_rewards(filled, old_sum, ref_sum, h.kl_coef)
            advantages = rloo_advantages(filled, h.num_generations)
        else:
            advantages = group_advantages(filled, h.num_generations, scale_rewards=h.scale_rewards)
        stats["advantages"] = torch.where(valid, advantages, torch.zeros_like(advantages)).detach()
        return stats

    # --- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        h = self.hparams
        rows = self._rollout(batch)
        scores, valid, reward_metrics = self._score(batch["prompts"], rows)
        reference_logps = None
        if self.reference is not None and needs_reference(h.loss_name, h.kl_coef):
            with torch.no_grad():
                reference_logps = completion_token_logps(self.reference, rows.input_ids, rows.attention_mask,
                                                         rows.labels, temperature=h.temperature)[0]
        stats = self._advantages(scores, valid, rows, reference_logps)
        advantages = stats.pop("advantages")

        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        wanted = loss_inputs(h.loss_name)
        n = rows.input_ids.shape[0]
        size = h.minibatch_size or n
        updates: List[Dict[str, torch.Tensor]] = []
        for _ in range(h.num_iterations):
            for start in range(0, n, size):
                part = slice(start, start + size)
                logps, _ = completion_token_logps(self.model, rows.input_ids[part], rows.attention_mask[part],
                                                  rows.labels[part], temperature=h.temperature)
                inputs = {"policy_logps": logps, "old_logps": rows.old_logps[part], "advantages": advantages[part],
                          "mask": rows.mask[part],
                          "reference_logps": reference_logps[part] if reference_logps is not None else None}
                result = self.loss_fn(**{k: inputs[k] for k in wanted}, **self.loss_kwargs)
                optimizer.zero_grad()
                self.manual_backward(result.loss)
                if h.gradient_clip_val:
                    self.clip_gradients(optimizer, gradient_clip_val=h.gradient_clip_val,
                                        gradient_clip_algorithm="norm")
                optimizer.step()
                scheduler.step()
                updates.append({"loss/policy": result.loss.detach(), **result.metrics})

        metrics: Dict[str, Any] = {name: torch.stack([u[name] for u in updates]).float().nanmean()
                                   for name in updates[0]}
        metrics.update(stats)
        metrics.update({"completions/mean_length": rows.lengths.float().mean(),
                        "completions/clipped_ratio": rows.clipped.float().mean(),
                        "invalid_rewards": (~valid).sum().float(),
                        "lr": optimizer.param_groups[0]["lr"]})
        metrics.update({k: float(v) for k, v in reward_metrics.items() if isinstance(v, (int, float))
                        and math.isfinite(float(v))})
        for name, value in metrics.items():
            self.log(f"{h.metric_prefix}/train/{name}", value, prog_bar=name == "reward", on_step=True,
                     on_epoch=False, batch_size=len(batch["prompts"]))

    def configure_optimizers(self):
        # Manual optimisation: global_step counts optimizer.step() calls, and training_step steps the schedule
        # after each of them.
        return adamw_with_cosine_schedule(self)
