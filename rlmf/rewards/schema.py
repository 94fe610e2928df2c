"""The reward config of each kind: keys, types and defaults, in one place.

:func:`rlmf.rewards.build_reward` fills a partial config from these defaults, so the code and the ``conf/reward``
yaml files cannot drift; the same dataclasses are the Hydra schemas of the ``reward`` group (register them with
:func:`register_schemas`, under ``reward/schema``, the way ``task/schema`` is done). A null key takes the kind's
default behaviour described in its help text (``metadata["help"]``, rendered by ``python -m rlmf.config reward``);
a required key is null until set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


_NAME_HELP = "Metric name: rewards/<name>/... null: the kind."
_DTYPE_HELP = "dtype of the weights: float32 | bfloat16 | float16. null: the run's weights dtype."


@dataclass
class DiscriminatorRewardConfig:
    """A reward model written by ``Discriminator.save`` (rlmf.modules.discriminator)."""

    kind: str = field(default="discriminator", metadata={"help": "The reward kind (set by its yaml)."})
    name: Optional[str] = field(default=None, metadata={"help": _NAME_HELP})
    path: Optional[str] = field(default=None, metadata={
        "help": "A directory Discriminator.save wrote. null: the run's trained discriminator."})
    batch_size: Optional[int] = field(default=None, metadata={
        "help": "Rows per forward. null: the discriminator's score_batch_size."})
    torch_dtype: Optional[str] = field(default=None, metadata={"help": _DTYPE_HELP})


@dataclass
class ClassifierRewardConfig:
    """Any ``AutoModelForSequenceClassification``: the logit (or probability) of one label is the reward."""

    kind: str = field(default="classifier", metadata={"help": "The reward kind (set by its yaml)."})
    name: Optional[str] = field(default=None, metadata={"help": _NAME_HELP})
    name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Required: the classifier, a hub name or a local directory."})
    label: Optional[str] = field(default=None, metadata={
        "help": "Required: a label name of the model's config.id2label (e.g. \"not hate\")."})
    probability: bool = field(default=False, metadata={
        "help": "false: the label's logit | true: its probability (softmax; sigmoid for one logit or multi-label)."})
    input: str = field(default="completion", metadata={
        "help": "What the classifier reads: completion (alone) | concat (prompt + completion as one text) | pair (a "
                "sentence pair)."})
    max_length: int = field(default=512, metadata={
        "help": "Most tokens per row. completion: its end is cut | concat: the text's start | pair: the prompt's "
                "start first."})
    batch_size: int = field(default=32, metadata={"help": "Rows per forward."})
    torch_dtype: Optional[str] = field(default=None, metadata={"help": _DTYPE_HELP})


@dataclass
class JudgeRewardConfig:
    """A causal LM asked with a rubric; greedy decoding of a few tokens, the first number in the answer is read."""

    kind: str = field(default="judge", metadata={"help": "The reward kind (set by its yaml)."})
    name: Optional[str] = field(default=None, metadata={"help": _NAME_HELP})
    name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Required: the judge LM, a hub name or a local directory."})
    mode: str = field(default="pointwise", metadata={
        "help": "pointwise: a score per completion | pairwise: which of two completions is better (a round-robin "
                "among a prompt's samples; the reward is each sample's win rate)."})
    template: Optional[str] = field(default=None, metadata={
        "help": "A str.format rubric. pointwise: {prompt} and {completion} required, {min_score} {max_score} "
                "optional | pairwise: {prompt} {first} {second} required. null: the mode's built-in rubric "
                "(rlmf.rewards.judge)."})
    min_score: float = field(default=1.0, metadata={
        "help": "pointwise: an answer below this is an invalid row."})
    max_score: float = field(default=10.0, metadata={
        "help": "pointwise: an answer above this is an invalid row."})
    max_new_tokens: int = field(default=8, metadata={"help": "Most tokens the judge may answer with."})
    max_prompt_length: int = field(default=1024, metadata={
        "help": "Most tokens of the filled rubric; a longer one keeps its end."})
    batch_size: int = field(default=8, metadata={"help": "Rubrics per generate call."})
    chat_template: Optional[bool] = field(default=None, metadata={
        "help": "null: use the tokenizer's chat template when it has one | true: require one | false: raw text."})
    seed: int = field(default=0, metadata={
        "help": "pairwise: seeds the random order of each pair, which cancels position bias."})
    torch_dtype: Optional[str] = field(default=None, metadata={"help": _DTYPE_HELP})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "eager | sdpa | flash_attention_2 | ... null: transformers chooses."})


@dataclass
class FunctionRewardConfig:
    """A Python callable ``f(prompts, completions, **kwargs) -> list of floats`` named ``module:function``."""

    kind: str = field(default="function", metadata={"help": "The reward kind (set by its yaml)."})
    name: Optional[str] = field(default=None, metadata={"help": _NAME_HELP})
    function: Optional[str] = field(default=None, metadata={
        "help": "Required: module:function, e.g. rlmf.rewards.functions:persona_email_gold."})
    kwargs: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Extra keyword arguments passed on every call."})


@dataclass
class EnsembleRewardConfig:
    """A weighted combination of other rewards (each any kind, ensembles included)."""

    kind: str = field(default="ensemble", metadata={"help": "The reward kind (set by its yaml)."})
    name: Optional[str] = field(default=None, metadata={"help": _NAME_HELP})
    members: List[Any] = field(default_factory=list, metadata={
        "help": "Required, at least one: the reward configs combined (any kind). A row invalid for one member is "
                "invalid."})
    weights: Optional[List[float]] = field(default=None, metadata={"help": "One per member. null: all 1."})
    combine: str = field(default="sum", metadata={
        "help": "sum: sum_i w_i r_i | mean: sum_i w_i r_i / sum_i w_i."})
    normalize: str = field(default="none", metadata={
        "help": "none | zscore: each member standardised over the batch's valid rows before combining."})


SCHEMAS = {
    "discriminator": DiscriminatorRewardConfig,
    "classifier": ClassifierRewardConfig,
    "judge": JudgeRewardConfig,
    "function": FunctionRewardConfig,
    "ensemble": EnsembleRewardConfig,
}
KINDS = tuple(SCHEMAS)


def defaults(kind: str) -> Dict[str, Any]:
    """The default config of ``kind`` as a plain dict."""
    return dataclasses.asdict(SCHEMAS[kind]())


def register_schemas(config_store) -> None:
    """Store every kind's schema under ``reward/schema/<kind>`` in a Hydra ``ConfigStore``."""
    for kind, schema in SCHEMAS.items():
        config_store.store(group="reward/schema", name=kind, node=schema)
