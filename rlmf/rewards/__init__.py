"""One reward interface, any judge.

Everything that turns (prompt, completion) text into a number is a :class:`Reward`:

* ``reward.score(prompts, completions, batch_size=None)`` -> ``[B]`` float32 CPU tensor (the
  :class:`~rlmf.modules.discriminator.RewardScorer` protocol), ``NaN`` for a row that could not be scored;
* ``reward.score_with_validity(...)`` -> :class:`RewardResult` ``(scores, valid, metrics)``; unpacks as
  ``scores, valid = ...``; ``metrics`` holds ``rewards/<name>/{mean,std,invalid}`` (an ensemble's: every member's).

Kinds, built by :func:`build_reward` from ``{"kind": ..., ...}`` (keys and defaults: :mod:`rlmf.rewards.schema`):

=================  ==================================================================================================
``discriminator``  a reward model ``Discriminator.save`` wrote (:func:`~rlmf.rewards.models.load_discriminator_reward`)
``classifier``     a named label's logit or probability of any sequence classifier (:class:`ClassifierReward`)
``judge``          a causal LM with a rubric, pointwise scores or pairwise round-robin (:class:`JudgeReward`)
``function``       a Python callable ``module:function`` (:class:`FunctionReward`; built-ins in
                   :mod:`rlmf.rewards.functions`)
``ensemble``       a weighted sum or mean of members, optionally z-normalised (:class:`EnsembleReward`)
=================  ==================================================================================================
"""

from rlmf.rewards.base import Reward, RewardConfigError, RewardResult, ScorerReward
from rlmf.rewards.callables import FunctionReward, resolve_function
from rlmf.rewards.ensemble import EnsembleReward
from rlmf.rewards.factory import build_reward, validate_reward_config
from rlmf.rewards.judge import Comparison, JudgeReward
from rlmf.rewards.models import ClassifierReward, load_discriminator_reward
from rlmf.rewards.schema import KINDS, SCHEMAS, register_schemas

__all__ = [
    "KINDS", "SCHEMAS", "ClassifierReward", "Comparison", "EnsembleReward", "FunctionReward", "JudgeReward", "Reward",
    "RewardConfigError", "RewardResult", "ScorerReward", "build_reward", "load_discriminator_reward",
    "register_schemas", "resolve_function", "validate_reward_config",
]
