"""The online generator: the online objectives (PPO, GRPO, GSPO, CISPO, RLOO, REINFORCE++, ReMax, online DPO) on
completions the policy samples during training.

One :class:`OnlineGenerator` training step is one rollout and its updates (manual optimisation):

1. each prompt of the batch gets ``num_generations`` completions from the current policy
   (:func:`rlmf.modules.rollouts.rollout`, which also keeps the sampling policy's per-token log-probs, for PPO the
   value head's predictions, for ReMax each prompt's greedy completion);
2. the reward (the run's ``reward=``) scores the decoded completions; a completion the reward could not score takes
   no part in the update and is counted (``invalid_rewards``);
3. the objective's targets, once per rollout, by the advantage estimator its loss registered
   (:mod:`rlmf.modules.targets`: group-relative, leave-one-out, GAE, REINFORCE++'s, ReMax's greedy baseline, online
   DPO's best-and-worst pairs); with ``mask_truncated_completions`` a completion with no stop token within
   ``max_new_tokens`` keeps its place in the advantages but its tokens leave the loss (DAPO's overlong filtering);
4. ``num_iterations`` passes over the rollout in minibatches of ``minibatch_size`` completions, one optimiser step
   each: ``loss = objective(...)`` (the registered loss of that name; with the policy's per-token entropies when its
   entropy options are on, :mod:`rlmf.entropies`), backward, gradient-norm clipping, step, and one step of the
   learning-rate schedule.

So ``trainer.global_step`` (and ``max_steps``, and the cosine schedule's length) counts optimiser steps:
``num_iterations * ceil(rows / minibatch_size)`` per training batch, always (a minibatch left empty by DAPO's
``drop_uniform_groups`` makes a step with no gradient: torch's optimisers leave parameters without one untouched).

The KL coefficient of the objectives whose reward carries the KL (PPO, RLOO, REINFORCE++, ReMax) is a buffer
(``kl_coef``), saved in checkpoints: with ``kl_target`` set it follows Ziegler et al.'s adaptive controller
(:func:`~rlmf.losses.ppo.adaptive_kl_coef`) after every rollout. PPO's value head (:class:`ValueHead`, a scalar head
on the policy's last hidden state) is a submodule, so it is trained, checkpointed and resumed with the policy; the
exported generator is ``module.model`` alone, without it.

Reference log-probs come from a frozen copy of the starting policy, kept out of the module's submodules (never
trained, saved or wrapped) and placed beside the policy at fit start, like :class:`rlmf.modules.generator.Generator`'s.

Metrics, under ``<metric_prefix>/train/`` with TRL's names: ``reward``, ``reward_std`` (mean over prompts of the
group's std), ``frac_reward_zero_std``, ``completions/mean_length``, ``completions/clipped_ratio`` (no stop token
within ``max_new_tokens``), ``objective/kl`` (mean summed k1 KL of a completion to the reference),
``objective/entropy`` (mean of ``-sum_t old_t``), ``objective/non_score_reward`` and ``objective/rlhf_reward`` (the
KL penalty and score plus penalty, where the reward carries the KL), ``objective/kl_coef``, ``greedy_reward``
(ReMax), the objective's own (``loss/policy``, ``loss/value``, ``policy/clipfrac``, ``val/explained_variance``,
``kl``, ``entropy``, ``clip_ratio/*``, ``cispo_clip_ratio``, ``rewards/chosen``...), ``invalid_rewards``, ``lr``,
``perf/generation_tokens_per_s`` and ``perf/training_tokens_per_s`` (completion tokens sampled per second of
rollout; tokens forwarded per second of updates), the reward's own metrics (``rewards/<name>/...``) and whatever
``monitor`` returns (the pipeline's gold reply rate of the rollout). Every ``log_completions_every`` rollouts a table
of prompts, completions and rewards goes to the logger when it takes tables (W&B).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import lightning as L
import torch
from torch import nn

from rlmf.entropies import completion_token_logps_and_entropies
from rlmf.logprobs import completion_token_logps, completion_token_logps_and_values
from rlmf.losses import get_loss, loss_hyperparameters, loss_inputs, takes_entropies
from rlmf.losses.advantages import AGGREGATIONS
from rlmf.losses.policy_gradient import drop_uniform_groups
from rlmf.losses.ppo import adaptive_kl_coef
from rlmf.modules.generator import adamw_with_cosine_schedule
from rlmf.modules.rollouts import Rollout, rollout
from rlmf.modules.targets import GROUP_NORMALISED, ONLINE, Scored, estimator_of, needs_reference
from rlmf.placement import put

# reward(prompts, completions) -> (scores [N], valid [N]) or a rlmf.rewards.RewardResult (which also has metrics; an
# ensemble's also has member_scores [N, K] and member_weights [K])
RewardFn = Callable[[List[str], List[str]], Any]
# monitor(prompts, completions) -> {metric name: float}, logged every rollout (e.g. a gold metric of the task)
MonitorFn = Callable[[List[str], List[str]], Dict[str, float]]

class ValueHead(nn.Module):
    """PPO's critic on the policy's trunk: ``V(s_t) = w . h_t + b`` from the last hidden state ``h_t`` that predicts
    token ``t``. Zero-initialised (``V = 0`` at the start, so the first advantages are the discounted rewards),
    kept in float32. ``[N, H] -> [N]``."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


class OnlineGenerator(L.LightningModule):
    """Trains ``model`` with the online loss ``loss_name`` (a loss of data format ``online``: ``grpo``, ``ppo``, ...)
    on its own samples."""

    def __init__(self, model: nn.Module, tokenizer, reward: RewardFn, *, loss_name: str = "grpo",
                 loss_kwargs: Optional[Dict[str, Any]] = None, reference: Optional[nn.Module] = None,
                 num_generations: int = 4, num_iterations: int = 1, minibatch_size: Optional[int] = None,
                 temperature: float = 1.0, max_new_tokens: int = 96, scale_rewards: str = "group",
                 kl_coef: float = 0.05, kl_target: Optional[float] = None, kl_horizon: float = 10000.0,
                 gamma: float = 1.0, lam: float = 0.95, drop_uniform_groups: bool = False,
                 mask_truncated_completions: bool = False, multi_objective_aggregation: str = "sum_then_normalize",
                 lr: float = 1e-4, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                 gradient_clip_val: Optional[float] = 1.0, stop_token_ids: Optional[List[int]] = None,
                 pad_token_id: Optional[int] = None, metric_prefix: str = "align",
                 monitor: Optional[MonitorFn] = None, log_completions_every: int = 0, packing: str = "none",
                 sampler: str = "hf"):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "tokenizer", "reward", "reference", "monitor"])
        self.automatic_optimization = False
        self.model, self.tokenizer, self.reward, self.monitor = model, tokenizer, reward, monitor
        self.loss_fn = get_loss(loss_name)
        if self.loss_fn.data_format != "online":
            raise ValueError(f"OnlineGenerator trains the online losses ({', '.join(ONLINE)}); {loss_name!r} is "
                             f"{self.loss_fn.data_format!r} (use rlmf.modules.generator.Generator)")
        self.estimator = estimator_of(loss_name)
        if self.estimator.group and num_generations < 2:
            raise ValueError(f"num_generations={num_generations} must be at least 2 for {loss_name} (it compares the "
                             "completions of a prompt)")
        if num_generations < 1:
            raise ValueError(f"num_generations={num_generations} must be at least 1")
        if multi_objective_aggregation not in AGGREGATIONS or (
                multi_objective_aggregation != "sum_then_normalize" and loss_name not in GROUP_NORMALISED):
            raise ValueError(f"multi_objective_aggregation={multi_objective_aggregation!r}: one of {AGGREGATIONS}, "
                             f"and normalize_then_sum only for {', '.join(GROUP_NORMALISED)}")
        if needs_reference(loss_name, kl_coef) and reference is None:
            raise ValueError(f"{loss_name} needs a reference model here (its loss, or kl_coef={kl_coef})")
        self.loss_kwargs = dict(loss_kwargs or {})
        hyperparameters = {**loss_hyperparameters(loss_name), **self.loss_kwargs}
        if "max_completion_length" in hyperparameters and hyperparameters["max_completion_length"] is None:
            # Dr. GRPO's constant normaliser is the generation limit, a constant of the run.
            self.loss_kwargs["max_completion_length"] = max_new_tokens
        # The entropies cost a [tokens, vocab] product per update: only when an entropy option is on.
        self.computes_entropies = takes_entropies(loss_name) and (
            hyperparameters.get("top_entropy_quantile", 1.0) < 1.0 or hyperparameters.get("entropy_coef", 0.0) != 0.0)
        self.value_head = ValueHead(model.config.hidden_size) if "values" in loss_inputs(loss_name) else None
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef), dtype=torch.float64))
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
                       max_new_tokens=h.max_new_tokens, stop_ids=h.stop_token_ids or [], pad_token_id=h.pad_token_id,
                       value_head=self.value_head, score=not self.single_on_policy_update, packing=h.packing,
                       greedy=self.estimator.greedy, sampler=h.sampler)

    @property
    def single_on_policy_update(self) -> bool:
        """One update of the whole rollout whose targets do not read the sampling log-probs (GRPO, GSPO, CISPO,
        online DPO): the update's own forward gives them (its parameters are those that sampled, so ``r = 1``
        exactly, as in TRL), and the rollout skips its scoring forward."""
        h = self.hparams
        return (not self.estimator.reads_old_logps and h.num_iterations == 1 and h.minibatch_size is None
                and not h.drop_uniform_groups)

    def _score(self, prompts: List[str], completions: List[str]):
        """``(scores [N] float32, valid [N] bool, reward metrics, result)`` on this device; invalid scores are NaN;
        ``result`` is what the reward returned."""
        result = self.reward(prompts, completions)
        scores, valid = result
        metrics = dict(getattr(result, "metrics", {}) or {})
        valid = torch.as_tensor(valid, dtype=torch.bool).to(self.device)
        scores = torch.as_tensor(scores, dtype=torch.float32).to(self.device)
        valid = valid & torch.isfinite(scores)
        return torch.where(valid, scores, torch.full_like(scores, float("nan"))), valid, metrics, result

    def _scored(self, batch: Dict[str, Any], prompts: List[str], rows: Rollout):
        """``(scored rollout, raw scores [N], reward stats, reward metrics)``: the reward's scores (each member's
        for GDPO; the greedy completions' for ReMax) and the reference's log-probs."""
        h = self.hparams
        raw_scores, valid, reward_metrics, result = self._score(prompts, rows.texts)
        scores, stats = self._reward_stats(raw_scores, valid)
        reference_logps = None
        if self.reference is not None:
            with torch.inference_mode():
                reference_logps = completion_token_logps(
                    self.reference, rows.input_ids, rows.attention_mask, rows.labels, temperature=h.temperature,
                    packing=h.packing, groups=self._prompt_of_rows(len(rows.texts)))[0]
            reference_logps = reference_logps.clone()  # a normal tensor again, for the loss
        scored = Scored(rows, scores, valid, reference_logps, h.num_generations, float(self.kl_coef))
        members = getattr(result, "member_scores", None)
        if h.multi_objective_aggregation == "normalize_then_sum" and members is not None:
            scored.member_scores = self._fill_members(torch.as_tensor(members, dtype=torch.float32), valid)
            scored.member_weights = torch.as_tensor(result.member_weights, dtype=torch.float32).to(self.device)
        if rows.greedy_texts is not None:
            greedy, _, _, _ = self._score(list(batch["prompts"]), rows.greedy_texts)
            scored.greedy_scores = greedy.repeat_interleave(h.num_generations)
        return scored, raw_scores, stats, reward_metrics

    def _fill_members(self, members: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` member scores on this device, an invalid row's replaced by its group's valid mean (as the
        scores are: :class:`~rlmf.modules.targets.Scored`)."""
        g = self.hparams.num_generations
        members = members.to(self.device)
        grouped, ok = members.view(-1, g, members.shape[1]), valid.view(-1, g, 1)
        zero = torch.zeros((), dtype=members.dtype, device=members.device)
        group_mean = torch.where(ok, grouped, zero).sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp(min=1)
        return torch.where(ok, grouped, group_mean).reshape(members.shape)

    def _reward_stats(self, scores: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Invalid scores replaced by their group's valid mean (see :class:`Scored`), and TRL's reward metrics."""
        g = self.hparams.num_generations
        grouped, ok = scores.view(-1, g), valid.view(-1, g)
        zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
        group_mean = torch.where(ok, grouped, zero).sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp(min=1)
        filled = torch.where(ok, grouped, group_mean)
        spread = filled.std(1) if g > 1 else filled.reshape(-1).std().expand(filled.shape[0])
        nan = torch.tensor(float("nan"), device=scores.device)
        return filled.reshape(-1), {"reward": scores[valid].mean() if valid.any() else nan,
                                    "reward_std": spread.mean(),
                                    "frac_reward_zero_std": (spread < 1e-8).float().mean()}

    # --- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        h = self.hparams
        started = self._clock()
        rows = self._rollout(batch)
        sampled = self._clock()
        prompts = [p for p in batch["prompts"] for _ in range(h.num_generations)]
        scored, raw_scores, stats, reward_metrics = self._scored(batch, prompts, rows)
        valid = scored.valid
        targets, target_stats = self.estimator.build(scored, h)
        stats.update(target_stats)
        keep = torch.ones_like(valid)
        if h.drop_uniform_groups:
            keep = drop_uniform_groups(scored.scores, h.num_generations).repeat_interleave(h.num_generations)
            stats["dropped_groups"] = 1.0 - keep.float().mean()

        inputs = {"old_logps": rows.old_logps, "mask": rows.mask, "reference_logps": scored.reference_logps,
                  **targets}
        if h.mask_truncated_completions:  # a completion cut off by max_new_tokens gets no loss (its advantage stays)
            inputs["mask"] = inputs["mask"] & ~rows.clipped[:, None]
        updating = self._clock()
        updates = self._update(rows, inputs, keep)
        trained = self._clock()
        kl = scored.sequence_kl  # after the update: a single on-policy update fills rows.old_logps
        if kl is not None:
            stats["objective/kl"] = kl.mean()
        stats["objective/entropy"] = -(rows.old_logps * rows.mask).sum(-1).mean()
        stats["objective/kl_coef"] = float(self.kl_coef)
        if h.kl_target is not None and kl is not None:  # Ziegler et al.'s controller, once per rollout
            observed = float(kl[valid].mean()) if valid.any() else float(h.kl_target)
            self.kl_coef.fill_(adaptive_kl_coef(float(self.kl_coef), observed, h.kl_target, h.kl_horizon,
                                                n_steps=len(rows.texts)))

        metrics: Dict[str, Any] = {name: torch.stack([u[name] for u in updates]).float().nanmean()
                                   for name in (updates[0] if updates else {})}
        metrics.update(stats)
        sampled_tokens = float(rows.lengths.sum())
        forwarded = float(rows.attention_mask[keep].sum()) * h.num_iterations
        metrics.update({"completions/mean_length": rows.lengths.float().mean(),
                        "completions/clipped_ratio": rows.clipped.float().mean(),
                        "invalid_rewards": (~valid).sum().float(),
                        "lr": self.optimizers().param_groups[0]["lr"],
                        "perf/generation_tokens_per_s": sampled_tokens / max(sampled - started, 1e-9),
                        "perf/training_tokens_per_s": forwarded / max(trained - updating, 1e-9)})
        metrics.update({k: float(v) for k, v in reward_metrics.items() if isinstance(v, (int, float))
                        and math.isfinite(float(v))})
        if self.monitor is not None:
            metrics.update(self.monitor(prompts, rows.texts))
        for name, value in metrics.items():
            self.log(f"{h.metric_prefix}/train/{name}", value, prog_bar=name == "reward", on_step=True,
                     on_epoch=False, batch_size=len(batch["prompts"]))
        self._log_completions(batch_idx, prompts, rows.texts, raw_scores)

    def _update(self, rows: Rollout, inputs: Dict[str, Optional[torch.Tensor]], keep: torch.Tensor
                ) -> List[Dict[str, torch.Tensor]]:
        """``num_iterations`` passes of minibatch updates over the rollout; the metrics of each update."""
        h = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        wanted = loss_inputs(h.loss_name) + (("entropies",) if self.computes_entropies else ())
        n = rows.input_ids.shape[0]
        size = h.minibatch_size or n
        updates: List[Dict[str, torch.Tensor]] = []
        for _ in range(h.num_iterations):
            for start in range(0, n, size):
                part = torch.arange(start, min(start + size, n), device=keep.device)
                part = part[keep[part]]
                optimizer.zero_grad()
                if len(part):
                    result = self._loss(rows, inputs, part, wanted)
                    self.manual_backward(result.loss)
                    if h.gradient_clip_val:
                        self.clip_gradients(optimizer, gradient_clip_val=h.gradient_clip_val,
                                            gradient_clip_algorithm="norm")
                    updates.append({"loss/policy": result.loss.detach(), **result.metrics})
                # An empty minibatch still counts as a step (no parameter has a gradient, so none moves): the
                # number of optimiser steps per rollout stays fixed, which max_steps and resuming rely on.
                optimizer.step()
                scheduler.step()
        return updates

    def _loss(self, rows: Rollout, inputs: Dict[str, Optional[torch.Tensor]], part: torch.Tensor, wanted):
        h = self.hparams
        args = (rows.input_ids[part], rows.attention_mask[part], rows.labels[part])
        layout = {"packing": h.packing, "groups": self._prompt_of_rows(len(rows.texts))[part]}
        current: Dict[str, Optional[torch.Tensor]] = {}
        if self.value_head is not None:
            current["policy_logps"], _, current["values"] = completion_token_logps_and_values(
                self.model, self.value_head, *args, temperature=h.temperature, **layout)
        elif self.computes_entropies:
            current["policy_logps"], _, current["entropies"] = completion_token_logps_and_entropies(
                self.model, *args, temperature=h.temperature, **layout)
        else:
            current["policy_logps"], _ = completion_token_logps(self.model, *args, temperature=h.temperature,
                                                                **layout)
        sliced = {k: (v[part] if v is not None else None) for k, v in inputs.items()}
        if rows.old_logps is None:  # a single on-policy update (see single_on_policy_update): part is every row
            rows.old_logps = sliced["old_logps"] = current["policy_logps"].detach()
        every = {**sliced, **current}
        return self.loss_fn(**{k: every[k] for k in wanted}, **self.loss_kwargs)

    def _prompt_of_rows(self, n: int) -> torch.Tensor:
        """``[n]`` the prompt each rollout row completes (its ``num_generations`` rows are adjacent): the rows of a
        prompt share it when ``packing=shared_prompt``."""
        return torch.arange(n, device=self.device) // self.hparams.num_generations

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _log_completions(self, batch_idx: int, prompts: List[str], completions: List[str], scores: torch.Tensor
                         ) -> None:
        """Every ``log_completions_every`` batches, the rollout as a table, to each logger that takes tables."""
        every = self.hparams.log_completions_every
        if not every or batch_idx % every or not self.loggers:
            return
        step = self.trainer.global_step
        rows = [[step, p, c, float(s)] for p, c, s in zip(prompts, completions, scores.tolist())]
        for logger in self.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(key=f"{self.hparams.metric_prefix}/completions",
                                 columns=["step", "prompt", "completion", "reward"], data=rows)

    def configure_optimizers(self):
        # Manual optimisation: global_step counts optimizer.step() calls, and training_step steps the schedule
        # after each of them. The optimiser covers the policy and, for PPO, the value head.
        return adamw_with_cosine_schedule(self)
