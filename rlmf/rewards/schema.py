"""The reward config of each kind: keys, types and defaults, in one place.

:func:`rlmf.rewards.build_reward` fills a partial config from these defaults, so the code and the ``conf/reward``
yaml files cannot drift; the same dataclasses are the Hydra schemas of the ``reward`` group (register them with
:func:`register_schemas`, under ``reward/schema``, the way ``task/schema`` is done). A null key takes the kind's
default behaviour described next to it; a required key is null (``???`` in yaml) until set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class DiscriminatorRewardConfig:
    """A reward model written by ``Discriminator.save`` (rlmf.modules.discriminator)."""

    kind: str = "discriminator"
    name: Optional[str] = None  # metric name rewards/<name>/...; null: the kind
    path: Optional[str] = None  # the Discriminator.save directory; null: the run's trained one (context discriminator_path)
    batch_size: Optional[int] = None  # pairs per forward; null: the discriminator's score_batch_size
    torch_dtype: Optional[str] = None  # float32 | bfloat16 | float16; null: the run's weights dtype


@dataclass
class ClassifierRewardConfig:
    """Any ``AutoModelForSequenceClassification``: the logit (or probability) of one label is the reward."""

    kind: str = "classifier"
    name: Optional[str] = None
    name_or_path: Optional[str] = None  # required: a hub name or a local directory
    label: Optional[str] = None  # required: a label name in the model's config.id2label (e.g. "not hate")
    probability: bool = False  # false: the label's logit; true: its probability (softmax; sigmoid for 1 logit or multi-label)
    input: str = "completion"  # completion (alone) | concat (prompt + completion as one text) | pair (a sentence pair)
    max_length: int = 512  # most tokens per row; completion: its end is cut; concat: the start of the text; pair: the prompt's start first
    batch_size: int = 32
    torch_dtype: Optional[str] = None  # float32 | bfloat16 | float16; null: the run's weights dtype


@dataclass
class JudgeRewardConfig:
    """A causal LM asked with a rubric; greedy decoding of a few tokens, the first number in the answer is read."""

    kind: str = "judge"
    name: Optional[str] = None
    name_or_path: Optional[str] = None  # required: the judge LM, a hub name or a local directory
    mode: str = "pointwise"  # pointwise: a score per completion | pairwise: which of two completions is better
    # str.format template. pointwise: {prompt} {completion} required, {min_score} {max_score} optional;
    # pairwise: {prompt} {first} {second} required. null: the built-in template of the mode (rlmf.rewards.judge).
    template: Optional[str] = None
    min_score: float = 1.0  # pointwise: answers outside [min_score, max_score] are invalid rows
    max_score: float = 10.0
    max_new_tokens: int = 8  # tokens the judge may answer with
    max_prompt_length: int = 1024  # tokens of the filled template; longer ones keep their end
    batch_size: int = 8
    chat_template: Optional[bool] = None  # null: use the tokenizer's chat template when it has one; true: require one
    seed: int = 0  # pairwise: seeds the per-pair order randomisation
    torch_dtype: Optional[str] = None  # float32 | bfloat16 | float16; null: the run's weights dtype
    attn_implementation: Optional[str] = None  # eager | sdpa | ...; null: transformers' choice


@dataclass
class FunctionRewardConfig:
    """A Python callable ``f(prompts, completions, **kwargs) -> list of floats`` named ``module:function``."""

    kind: str = "function"
    name: Optional[str] = None
    function: Optional[str] = None  # required, e.g. rlmf.rewards.functions:persona_email_gold
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of every call


@dataclass
class EnsembleRewardConfig:
    """A weighted combination of other rewards (each any kind, ensembles included)."""

    kind: str = "ensemble"
    name: Optional[str] = None
    members: List[Any] = field(default_factory=list)  # required, at least one: reward configs
    weights: Optional[List[float]] = None  # one per member; null: all 1
    combine: str = "sum"  # sum: sum_i w_i r_i | mean: sum_i w_i r_i / sum_i w_i
    normalize: str = "none"  # none | zscore: each member z-normalised over the batch's valid rows first


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
