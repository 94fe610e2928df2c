"""The schemas of what trains: the generator, the discriminator, the alignment algorithm and the Lightning trainer.

Each field is declared once, with its default and its help text (``metadata["help"]``); ``python -m rlmf.config``
and ``docs/config.md`` are rendered from them. The groups that describe the pipeline's data and flow (task, stage,
loop, feedback, evaluate, logger) are in :mod:`rlmf.schemas_pipeline`; :mod:`rlmf.config` registers both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class OptimConfig:
    """One training stage's optimisation: AdamW, cosine schedule with linear warm-up."""

    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate, reached at the end of the warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.1, metadata={
        "help": "Fraction of the stage's optimiser steps over which the learning rate rises linearly from 0; a cosine "
                "decay to 0 follows."})
    max_steps: int = field(default=100, metadata={
        "help": "Optimiser steps of the stage (capped by trainer.max_steps when that is positive)."})
    max_epochs: Optional[int] = field(default=None, metadata={
        "help": "When set: this many passes over the data instead of max_steps. null: max_steps decides."})
    batch_size: int = field(default=16, metadata={
        "help": "Rows per micro-batch (prompts per rollout for the online algorithms); one optimiser step sees "
                "batch_size x trainer.accumulate_grad_batches rows."})
    max_tokens: Optional[int] = field(default=None, metadata={
        "help": "Instead of batch_size rows: length-bucketed batches of as many rows as fit in this many tokens (a "
                "pair counts its prompt once and both completions, as the packed decoder sees it). Not for the online "
                "algorithms, whose completions do not exist yet. null: batch_size rows."})


@dataclass
class TinyGeneratorConfig:
    """Sizes of the small Llama that generator=tiny builds from scratch."""

    vocab_size: int = field(default=1024, metadata={
        "help": "Vocabulary of the BPE tokenizer trained on the task's own text."})
    hidden_size: int = field(default=128, metadata={"help": "Width of the residual stream."})
    num_layers: int = field(default=2, metadata={"help": "Transformer blocks."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads per block (must divide hidden_size)."})
    intermediate_size: int = field(default=344, metadata={"help": "Width of the feed-forward (MLP) layer."})
    max_position_embeddings: int = field(default=256, metadata={
        "help": "Longest sequence the model is built for (at least generator.max_length)."})


# The generator's default for the algorithm's family (an interpolation resolved when the config is read).
_FAMILY_DEFAULT = "${{generator.optim_by_family.${{loss_family:${{algo.name}}}}.{}}}"


@dataclass
class GeneratorConfig:
    """The policy: which causal LM, its sequence lengths and sampling, and its SFT stage."""

    kind: str = field(default="tiny", metadata={
        "help": "tiny: a small Llama trained from scratch on the task (generator.tiny) | hf: a pretrained causal LM "
                "(generator.name_or_path)."})
    name_or_path: Optional[str] = field(default=None, metadata={
        "help": "kind=hf: a hub name, a local model directory or a .gguf file. Unused by kind=tiny."})
    torch_dtype: Optional[str] = field(default=None, metadata={
        "help": "dtype of the weights on load: float32 | bfloat16 | float16. null: follow trainer.precision (bf16-true "
                "gives bfloat16, a mixed precision keeps float32)."})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "transformers' attention kernel: eager | sdpa | flash_attention_2 | flash_attention_3 | "
                "flex_attention. null: transformers chooses."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations during the backward pass: less memory for roughly a third more time."})
    tiny: TinyGeneratorConfig = field(default_factory=TinyGeneratorConfig, metadata={
        "help": "Sizes of the kind=tiny model."})
    logprob_backend: str = field(default="auto", metadata={
        "help": "How completion log-probs are computed (rlmf.kernels): auto | triton (fused kernels, CUDA only) | "
                "torch."})
    packing: str = field(default="shared_prompt", metadata={
        "help": "Layout of the rows the decoder runs for log-probs (rlmf.packing). shared_prompt: rows packed without "
                "padding, a prompt shared by several completions (a pair, a prompt's online samples, a KTO row and "
                "its mismatched row) encoded once | padding_free: packed without sharing | none: padded rows. The "
                "numbers are the same; a model whose attention cannot take a packed mask (flash-attention) falls back "
                "to padded rows and logs why."})
    max_length: int = field(default=192, metadata={
        "help": "Most tokens of prompt plus completion in training rows; a longer completion loses its end."})
    max_prompt_length: int = field(default=96, metadata={
        "help": "Most prompt tokens kept; a longer prompt loses its start."})
    max_new_tokens: int = field(default=96, metadata={"help": "Most tokens sampled per completion."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature of the feedback, alignment and evaluation samples."})
    sampler: str = field(default="hf", metadata={
        "help": "What draws every sample and greedy completion (rlmf.generation.SAMPLERS): hf (transformers' "
                "model.generate) | rlmf (our decode loop, rlmf.sampling: a prompt prefilled once for all its "
                "completions, finished rows leave the batch, one uniform per token drawn). The same distribution and "
                "the same greedy tokens; a seed gives other samples."})
    sft: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, max_steps=300, batch_size=16), metadata={
        "help": "Optimisation of the SFT stage on the task's demonstrations."})
    optim_by_family: Dict[str, Dict[str, Any]] = field(default_factory=lambda: {
        family: {"lr": 1e-4, "batch_size": 8} for family in ("preference", "online", "sft")}, metadata={
        "help": "Learning rate and batch size that suit this generator, per family of objectives (preference | "
                "online | sft; rlmf.losses.loss_family): algo.optim takes them unless set. The tiny model's are here, "
                "pretrained models' in conf/generator/hf.yaml."})


@dataclass
class DiscriminatorConfig:
    """Constructor arguments of ``rlmf.modules.discriminator.Discriminator`` plus its training loop."""

    backbone: str = field(default="minilm", metadata={
        "help": "The encoder: minilm (pretrained all-MiniLM-L6-v2) | tiny (a small BERT from scratch, "
                "discriminator.tiny) | hf (any transformers encoder, discriminator.name_or_path)."})
    name_or_path: Optional[str] = field(default=None, metadata={
        "help": "backbone=hf: a hub name or a local directory (e.g. one Discriminator.save wrote)."})
    tiny: Optional[Dict[str, Any]] = field(default=None, metadata={
        "help": "backbone=tiny: the encoder's BertConfig sizes (hidden_size, num_hidden_layers, ...). null otherwise."})
    max_length: int = field(default=256, metadata={
        "help": "Most tokens per (prompt, completion) row; the prompt's start is cut first."})
    lr: float = field(default=5e-5, metadata={"help": "AdamW peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay, on weight matrices only (never biases or norms)."})
    warmup_ratio: float = field(default=0.1, metadata={
        "help": "Fraction of the steps over which the learning rate rises from 0, before a linear decay to 0."})
    margin: float = field(default=0.0, metadata={
        "help": "objective=pairs: the Bradley-Terry margin m in -log sigmoid(r_chosen - r_rejected - m)."})
    objective: str = field(default="pairs", metadata={
        "help": "pairs: Bradley-Terry on preference pairs | thumbs: binary cross-entropy on thumbs-up/down rows."})
    score_batch_size: int = field(default=64, metadata={
        "help": "Rows per forward when the discriminator scores samples (feedback rounds, evaluation)."})
    batch_size: int = field(default=16, metadata={"help": "Training and validation rows per step."})
    max_epochs: int = field(default=2, metadata={"help": "Passes over the training rows."})


@dataclass
class OnlineConfig:
    """Rollouts and advantages of the online algorithms (the ``online`` losses: ``algo=grpo|ppo|rloo|...``;
    :mod:`rlmf.modules.online`, :mod:`rlmf.modules.targets`).

    Each training batch of ``algo.optim.batch_size`` prompts is sampled ``num_generations`` times, scored by the
    run's ``reward=``, and trained on for ``num_iterations`` passes in minibatches of ``minibatch_size`` completions
    (null: the whole rollout at once), one optimiser step per minibatch. The objective's own hyperparameters (clip
    range, GRPO's beta and loss_type, PPO's value clip) are in ``algo.loss``.
    """

    num_generations: int = field(default=4, metadata={
        "help": "Completions sampled per prompt (the group); at least 2 where the advantage compares them."})
    num_iterations: int = field(default=1, metadata={
        "help": "Optimisation passes over each rollout (PPO's epochs; above 1 the clip range starts to matter)."})
    minibatch_size: Optional[int] = field(default=None, metadata={
        "help": "Completions per optimiser step. null: the whole rollout in one step."})
    temperature: Optional[float] = field(default=None, metadata={
        "help": "Temperature of sampling and of scoring the samples. null: generator.temperature."})
    max_new_tokens: Optional[int] = field(default=None, metadata={
        "help": "Most tokens per sampled completion. null: generator.max_new_tokens."})
    scale_rewards: str = field(default="group", metadata={
        "help": "grpo, gspo, cispo: what divides the centred rewards: group (each prompt's std) | batch (the "
                "rollout's std) | none."})
    drop_uniform_groups: bool = field(default=False, metadata={
        "help": "grpo: leave out prompts whose completions all got the same reward (DAPO's dynamic sampling)."})
    kl_coef: float = field(default=0.05, metadata={
        "help": "ppo, rloo, reinforce_pp(_baseline), remax: weight of the KL penalty folded into the reward (per "
                "token; summed over the completion for rloo)."})
    kl_target: Optional[float] = field(default=None, metadata={
        "help": "Adapt kl_coef so the summed KL tracks this value (Ziegler et al.'s controller). null: kl_coef fixed."})
    kl_horizon: float = field(default=10000.0, metadata={
        "help": "The adaptive KL controller's horizon, in completions."})
    gamma: float = field(default=1.0, metadata={
        "help": "Discount: GAE's for ppo; the return's for reinforce_pp(_baseline) and remax."})
    lam: float = field(default=0.95, metadata={"help": "ppo: GAE's lambda."})
    log_completions_every: int = field(default=10, metadata={
        "help": "Log a table of sampled completions and their rewards every this many batches (W&B). 0: never."})
    mask_truncated_completions: bool = field(default=False, metadata={
        "help": "A completion that hits max_new_tokens without a stop token still counts in the advantages but "
                "gets no loss (DAPO's overlong filtering)."})
    multi_objective_aggregation: str = field(default="sum_then_normalize", metadata={
        "help": "grpo, gspo, cispo with several rewards (reward=ensemble): sum_then_normalize (the ensemble's score, "
                "then scale_rewards) | normalize_then_sum (GDPO: each reward normalised in its group, then the "
                "weighted sum normalised over the batch)."})


@dataclass
class AlgoConfig:
    """The alignment objective of the align stage, its reference policy and its optimisation."""

    name: str = field(default="dpo", metadata={
        "help": "The loss: a key of rlmf.losses.LOSSES (docs/losses.md lists them); each has a conf/algo yaml."})
    reference: str = field(default="frozen", metadata={
        "help": "The reference policy: frozen (a frozen copy of the start) | precomputed (its log-probs cached on "
                "disk once) | lora (the policy trains a LoRA adapter; the adapter off is the reference) | none."})
    loss: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Keyword hyperparameters of the loss (beta, ...); validation refuses one the loss does not take."})
    online_samples: int = field(default=4, metadata={
        "help": "hypo: completions sampled per prompt for the KL term (at least 2)."})
    online: OnlineConfig = field(default_factory=OnlineConfig, metadata={
        "help": "Rollouts and advantages of the online algorithms (ppo, grpo, rloo, online_dpo, ...)."})
    lora_rank: int = field(default=8, metadata={"help": "reference=lora: rank of the adapter."})
    reference_cache_dir: str = field(default=".cache/rlmf/reference_logps", metadata={
        "help": "reference=precomputed: where the cached reference log-probs live (shared by a sweep over beta)."})
    reference_sync_steps: Optional[int] = field(default=None, metadata={
        "help": "TR-DPO (Gorbatovski et al. 2024): every this many optimiser steps the frozen reference becomes "
                "alpha * policy + (1 - alpha) * reference. null: the reference stays fixed."})
    reference_mixup_alpha: float = field(default=0.6, metadata={
        "help": "TR-DPO's alpha in that update (1: a plain copy of the policy)."})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=_FAMILY_DEFAULT.format("lr"), max_steps=60,
                                                                    batch_size=_FAMILY_DEFAULT.format("batch_size")),
                               metadata={"help": "Optimisation of the align stage; lr and batch_size default to "
                                                 "generator.optim_by_family for the loss's family."})


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by every stage. ``max_steps`` > 0 caps every stage (quick runs, sweeps)."""

    accelerator: str = field(default="auto", metadata={
        "help": "auto | cpu | gpu: where training runs, and also sampling, scoring and evaluation."})
    devices: Any = field(default=1, metadata={
        "help": "Lightning's devices: a count (-1: every visible device), a list of indices or auto."})
    strategy: str = field(default="auto", metadata={"help": "Lightning's strategy: auto | ddp | fsdp | ..."})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16-mixed where the device supports it, else 32-true) | 32-true | bf16-mixed | bf16-true | "
                "..."})
    accumulate_grad_batches: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    max_bad_steps: int = field(default=5, metadata={
        "help": "A step with a non-finite loss or gradient is skipped and counted (<stage>/train/skipped_steps); this "
                "many in a row stop the run with an error naming the stage, step and batch (0 or 1: the first)."})
    gradient_clip_val: float = field(default=1.0, metadata={
        "help": "Clip the gradient's norm to this (the online algorithms clip their own, to the same value)."})
    log_every_n_steps: int = field(default=10, metadata={
        "help": "Log training metrics every this many optimiser steps (every rollout for the online algorithms)."})
    val_check_interval: Optional[int] = field(default=None, metadata={
        "help": "Validate every this many steps. null: once, at the end of the stage."})
    max_steps: int = field(default=-1, metadata={
        "help": "When positive: caps the optimiser steps of every stage (quick runs, sweeps). -1: no cap."})
    progress_bar: bool = field(default=True, metadata={"help": "Show progress bars for training and sampling."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes (0: load in the main one)."})
