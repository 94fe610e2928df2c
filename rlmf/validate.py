"""The checks a config's types cannot express, run before any work (:func:`validate`).

Hydra and the schemas in :mod:`rlmf.config` already refuse an unknown key, a value of the wrong type and an unknown
group option. What is left is here: a string outside its choices, a loss hyperparameter the loss does not take or
refuses, settings that contradict each other. Every error is a :class:`~rlmf.errors.ConfigError` that names the key
and what is allowed.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from rlmf.config import ATTENTION_IMPLEMENTATIONS, STAGES
from rlmf.data.transcripts import TRANSCRIPTS
from rlmf.errors import ConfigError
from rlmf.generation import SAMPLERS
from rlmf.kernels import BACKENDS
from rlmf.losses import LOSSES, bind_loss, get_loss, loss_hyperparameters
from rlmf.losses.advantages import AGGREGATIONS
from rlmf.modules.targets import GROUP_NORMALISED, GROUP_OBJECTIVES, KL_IN_REWARD, TARGETS
from rlmf.packing import PACKINGS
from rlmf.placement import DTYPES, PRECISIONS
from rlmf.reference import check_reference_sync
from rlmf.rewards import validate_reward_config
from rlmf.tasks.base import task_class


def _choice(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")


def _check_rows(key: str, rows) -> None:
    if rows is not None and (len(rows) != 2 or not 0 <= rows[0] < rows[1]):
        raise ConfigError(f"{key}={list(rows)} must be [start, stop) with 0 <= start < stop")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def validate(cfg: DictConfig) -> None:
    """Every check a dataclass type cannot express, run by ``rlmf-train`` before any work: a value outside its
    choices, a loss hyperparameter the loss does not take, settings that contradict each other. Raises
    :class:`ConfigError` naming the key and what is allowed."""
    _validate_generator_and_trainer(cfg)
    _validate_algo(cfg)
    _validate_task_loop_and_evaluation(cfg)


def _validate_generator_and_trainer(cfg: DictConfig) -> None:
    for stage in cfg.stage.stages:
        _choice("stage.stages", stage, STAGES)
    _choice("generator.kind", cfg.generator.kind, ("tiny", "hf"))
    if cfg.generator.kind == "hf" and not cfg.generator.name_or_path:
        raise ConfigError("generator=hf needs generator.name_or_path (a hub name or a local directory)")
    _choice("generator.logprob_backend", cfg.generator.logprob_backend, BACKENDS)
    _choice("generator.packing", cfg.generator.packing, PACKINGS)
    _choice("generator.sampler", cfg.generator.sampler, SAMPLERS)
    if cfg.generator.torch_dtype is not None:
        _choice("generator.torch_dtype", cfg.generator.torch_dtype, tuple(DTYPES))
    if cfg.generator.attn_implementation is not None:
        _choice("generator.attn_implementation", cfg.generator.attn_implementation, ATTENTION_IMPLEMENTATIONS)
    _choice("trainer.precision", str(cfg.trainer.precision), PRECISIONS)
    for key in ("trainer.accumulate_grad_batches", "generator.sft.batch_size", "algo.optim.batch_size"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be at least 1")
    for key in ("generator.sft.max_epochs", "algo.optim.max_epochs"):
        if OmegaConf.select(cfg, key) is not None and OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be at least 1, or null to use max_steps")
    for key in ("generator.sft.max_tokens", "algo.optim.max_tokens"):
        if OmegaConf.select(cfg, key) is not None and OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be at least 1, or null for batch_size rows")
    on_gpu = cfg.trainer.accelerator != "cpu" and _has_cuda()
    if cfg.generator.logprob_backend == "triton" and not on_gpu and not os.environ.get("TRITON_INTERPRET"):
        raise ConfigError("generator.logprob_backend=triton needs a CUDA device (or TRITON_INTERPRET=1 to run the "
                          "kernels in Triton's slow interpreter); use auto or torch on CPU")
    _choice("discriminator.backbone", cfg.discriminator.backbone, ("minilm", "tiny", "hf"))
    _choice("discriminator.objective", cfg.discriminator.objective, ("pairs", "thumbs"))
    _choice("logger.kind", cfg.logger.kind, ("wandb", "csv", "none"))
    if cfg.stage.cache_dir is not None and (str(cfg.trainer.devices) not in ("1", "auto")
                                            or cfg.trainer.strategy not in ("auto", "single_device")):
        raise ConfigError(f"stage.cache_dir={cfg.stage.cache_dir} shares stages between single-process jobs; with "
                          f"trainer.devices={cfg.trainer.devices} strategy={cfg.trainer.strategy} leave it null and "
                          "hand stages over with stage.from_run")


def _validate_algo(cfg: DictConfig) -> None:
    _choice("algo.name", cfg.algo.name, sorted(LOSSES))
    _choice("algo.reference", cfg.algo.reference, ("frozen", "precomputed", "lora", "none"))
    allowed = loss_hyperparameters(cfg.algo.name)
    for key in cfg.algo.loss:
        if key not in allowed:
            raise ConfigError(f"algo.loss.{key} is not a hyperparameter of loss {cfg.algo.name!r}; "
                              f"it takes: {', '.join(allowed) or 'none'}")
    for key, choices in get_loss(cfg.algo.name).choices.items():  # the loss's string options (register_loss)
        _choice(f"algo.loss.{key}", cfg.algo.loss.get(key, allowed[key]), choices)
    _validate_loss(cfg)
    if get_loss(cfg.algo.name).data_format == "online":
        _validate_online(cfg)


def _validate_task_loop_and_evaluation(cfg: DictConfig) -> None:
    try:
        task_class(cfg.task.name)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    if cfg.loop.rounds < 1:
        raise ConfigError(f"loop.rounds={cfg.loop.rounds} must be at least 1")
    _choice("loop.discriminator", cfg.loop.discriminator, ("warm", "scratch"))
    _choice("loop.allocation", cfg.loop.allocation, ("uniform", "thompson"))
    _choice("feedback.pairs", cfg.feedback.pairs, ("best_worst", "clair", "ab"))
    _choice("feedback.reviser", cfg.feedback.reviser, ("guided", "llm"))
    _choice("loop.weighting", cfg.loop.weighting, ("none", "posterior"))
    k = cfg.task.get("align_samples_per_prompt")
    if cfg.feedback.chosen_rank < 1 or (k is not None and cfg.feedback.chosen_rank > k - 1):
        raise ConfigError(f"feedback.chosen_rank={cfg.feedback.chosen_rank} must lie in [1, k - 1] for the k="
                          f"{k} samples per prompt (task.align_samples_per_prompt): the worst is the rejected")
    if any(n < 1 for n in cfg.evaluate.best_of_n):
        raise ConfigError(f"evaluate.best_of_n={list(cfg.evaluate.best_of_n)}: every n must be at least 1")
    if not 0.0 <= cfg.feedback.drop_desirable < 1.0:
        raise ConfigError(f"feedback.drop_desirable={cfg.feedback.drop_desirable} must lie in [0, 1)")
    if cfg.loop.sends_per_prompt is not None and cfg.loop.sends_per_prompt < 1:
        raise ConfigError(f"loop.sends_per_prompt={cfg.loop.sends_per_prompt} must be at least 1, or null (one "
                          "send per candidate)")
    if cfg.loop.rounds > 1 and not task_class(cfg.task.name).has_feedback:
        raise ConfigError(f"loop.rounds={cfg.loop.rounds} needs a task with a feedback source; task={cfg.task.name} "
                          "brings fixed preference pairs (use loop.rounds=1)")
    if cfg.task.name == "preference_files":
        _choice("task.on_bad_row", cfg.task.on_bad_row, ("error", "skip"))
        _choice("task.transcripts", cfg.task.transcripts, TRANSCRIPTS)
        _check_rows("task.rows", cfg.task.rows)
    if cfg.evaluate.judge_rows is not None:
        _check_rows("evaluate.judge_rows", cfg.evaluate.judge_rows)
        if cfg.task.name != "preference_files" or cfg.evaluate.judge:
            raise ConfigError("evaluate.judge_rows trains a judge on rows of task.train: it needs "
                              "task=preference_files and no evaluate.judge (a judge already trained)")
        rows = cfg.task.rows
        if rows is None or max(rows[0], cfg.evaluate.judge_rows[0]) < min(rows[1], cfg.evaluate.judge_rows[1]):
            raise ConfigError(f"evaluate.judge_rows={list(cfg.evaluate.judge_rows)} overlaps task.rows="
                              f"{rows if rows is None else list(rows)}: the judge's rows must be rows the policy and "
                              "its reward model never see (set task.rows to a [start, stop) span outside them)")
    if cfg.evaluate.judge_max_epochs is not None and cfg.evaluate.judge_max_epochs < 1:
        raise ConfigError(f"evaluate.judge_max_epochs={cfg.evaluate.judge_max_epochs} must be at least 1 (or null)")
    if cfg.get("reward") is not None:
        validate_reward_config(cfg.reward, static=True)


def _validate_loss(cfg: DictConfig) -> None:
    """``algo.loss`` bound to its loss (values its ``check`` refuses, a mixture's parts), the reference it needs,
    and TR-DPO's ``algo.reference_sync_steps``."""
    try:
        loss = bind_loss(cfg.algo.name, OmegaConf.to_container(cfg.algo.loss, resolve=True))
    except ValueError as e:
        raise ConfigError(f"algo.loss: {e}") from None
    if loss.requires_reference and cfg.algo.reference == "none":
        raise ConfigError(f"loss {cfg.algo.name!r} needs reference log-probs: set algo.reference to frozen, "
                          "precomputed or lora")
    if loss.reference_per_token and cfg.algo.reference == "precomputed":
        raise ConfigError(f"loss {cfg.algo.name!r} needs the reference's per-token log-probs, and "
                          "algo.reference=precomputed caches summed ones: use frozen or lora")
    mode = cfg.algo.reference if loss.requires_reference else "none"
    try:
        check_reference_sync(cfg.algo.reference_sync_steps, cfg.algo.reference_mixup_alpha, mode, loss.data_format)
    except ValueError as e:
        raise ConfigError(f"algo.{e}") from None


def _validate_online(cfg: DictConfig) -> None:
    """``algo.online`` and its interplay with the rest of the config, for the online algorithms."""
    name, o = cfg.algo.name, cfg.algo.online
    _choice("algo.name (online)", name, tuple(TARGETS))
    if name in GROUP_OBJECTIVES and o.num_generations < 2:
        raise ConfigError(f"algo.online.num_generations={o.num_generations} must be at least 2: {name} compares each "
                          "completion with the other completions of its prompt")
    if o.num_generations < 1:
        raise ConfigError(f"algo.online.num_generations={o.num_generations} must be at least 1")
    if o.num_iterations < 1:
        raise ConfigError(f"algo.online.num_iterations={o.num_iterations} must be at least 1")
    if cfg.algo.optim.get("max_tokens") is not None:
        raise ConfigError(f"algo.optim.max_tokens={cfg.algo.optim.max_tokens}: {name} batches prompts, whose "
                          "completions do not exist yet; use algo.optim.batch_size (prompts per rollout)")
    if o.minibatch_size is not None and o.minibatch_size < 1:
        raise ConfigError(f"algo.online.minibatch_size={o.minibatch_size} must be at least 1, or null")
    if name == "online_dpo" and o.minibatch_size is not None and o.minibatch_size % o.num_generations:
        raise ConfigError(f"algo.online.minibatch_size={o.minibatch_size} must be a multiple of "
                          f"algo.online.num_generations={o.num_generations} for online_dpo (a pair never spans two "
                          "minibatches), or null")
    _choice("algo.online.scale_rewards", o.scale_rewards, ("group", "batch", "none"))
    _choice("algo.online.multi_objective_aggregation", o.multi_objective_aggregation, AGGREGATIONS)
    if o.multi_objective_aggregation == "normalize_then_sum" and (name not in GROUP_NORMALISED
                                                                 or o.scale_rewards != "group"):
        raise ConfigError(f"algo.online.multi_objective_aggregation=normalize_then_sum applies to the "
                          f"group-normalised objectives ({', '.join(GROUP_NORMALISED)}) with scale_rewards=group (GDPO "
                          f"scales each reward by its group's std and the sum by the batch's), not {name} with "
                          f"scale_rewards={o.scale_rewards}")
    if o.drop_uniform_groups and name not in GROUP_OBJECTIVES:
        raise ConfigError(f"algo.online.drop_uniform_groups applies to the group objectives "
                          f"({', '.join(GROUP_OBJECTIVES)}), not {name}")
    if o.kl_target is not None:
        if name not in KL_IN_REWARD:
            raise ConfigError(f"algo.online.kl_target applies where the KL is in the reward ({', '.join(KL_IN_REWARD)}),"
                              f" not {name}")
        if o.kl_target <= 0 or o.kl_horizon <= 0 or o.kl_coef <= 0:
            raise ConfigError(f"algo.online.kl_target={o.kl_target}, kl_horizon={o.kl_horizon} and "
                              f"kl_coef={o.kl_coef} must all be > 0 for the adaptive KL coefficient")
    for key in ("gamma", "lam"):
        if not 0.0 <= o[key] <= 1.0:
            raise ConfigError(f"algo.online.{key}={o[key]} must lie in [0, 1]")
    if o.log_completions_every < 0:
        raise ConfigError(f"algo.online.log_completions_every={o.log_completions_every} must be >= 0 (0: never)")
    if cfg.trainer.accumulate_grad_batches != 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches} does not apply "
                          f"to {name}: it steps once per minibatch of algo.online.minibatch_size")
    if cfg.algo.reference in ("precomputed", "lora"):
        raise ConfigError(f"algo.reference={cfg.algo.reference} does not apply to {name}: its fresh samples are "
                          "scored by a frozen copy of the starting policy (frozen or none)")
