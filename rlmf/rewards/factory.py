"""``build_reward(config, placement, **context)``: any reward kind from a plain dict or a DictConfig.

The whole config tree (ensemble members included) is validated first, by :func:`validate_reward_config`, which
loads no model; only then is anything built. Errors are :class:`~rlmf.rewards.base.RewardConfigError` (a
``rlmf.config.ConfigError``) naming the key, its place in the tree (``reward.members[1].label``) and what is allowed.

Context: keyword arguments describing the run, passed to every member of the tree:

* ``world``: the persona-email :class:`~rlmf.tasks.persona_email.World` (``PersonaEmailTask.reward_context()``), for
  function rewards that take a ``world`` argument (``rlmf.rewards.functions:persona_email_gold``);
* ``discriminator_path``: the run's trained discriminator directory, used by ``kind: discriminator`` with
  ``path: null``;
* anything else a function reward's signature names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Optional

from rlmf.placement import DTYPES, Placement
from rlmf.rewards.base import Reward, RewardConfigError, ScorerReward
from rlmf.rewards.callables import FunctionReward, context_for, resolve_function
from rlmf.rewards.ensemble import EnsembleReward, check_ensemble
from rlmf.rewards.judge import DEFAULT_TEMPLATES, MODES, JudgeReward, check_template
from rlmf.rewards.models import CLASSIFIER_INPUTS, ClassifierReward, load_discriminator_reward
from rlmf.rewards.schema import KINDS, SCHEMAS, defaults


def _plain(config: Any) -> Any:
    """A plain dict/list tree of ``config`` (DictConfig resolved; ``???`` is None)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        DictConfig = ListConfig = ()
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=True, throw_on_missing=False)
    if isinstance(config, Mapping):
        return {k: _plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [_plain(v) for v in config]
    return None if config == "???" else config


def _required(spec: Dict[str, Any], key: str, what: str) -> None:
    if spec.get(key) in (None, ""):
        raise RewardConfigError(f"{spec['kind']} reward needs {key}: {what}")


def _positive(spec: Dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = spec.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise RewardConfigError(f"{spec['kind']} reward {key}={value!r} must be an integer of at least 1")


def _dtype(spec: Dict[str, Any]) -> None:
    if spec.get("torch_dtype") is not None and spec["torch_dtype"] not in DTYPES:
        raise RewardConfigError(f"{spec['kind']} reward torch_dtype={spec['torch_dtype']!r} is not one of "
                                f"{', '.join(DTYPES)} (or null: the run's dtype)")


def _check(spec: Dict[str, Any], context: Dict[str, Any], static: bool) -> None:
    kind = spec["kind"]
    _dtype(spec)
    if kind == "discriminator":
        path = spec["path"] or context.get("discriminator_path")
        if path is None and not static:
            raise RewardConfigError("discriminator reward needs path (a directory Discriminator.save wrote), or the "
                                    "run's trained discriminator as context discriminator_path")
        if path is not None and not static:
            from rlmf.modules.discriminator import HYPERPARAMETERS_FILE

            if not (Path(path) / HYPERPARAMETERS_FILE).is_file():
                raise RewardConfigError(f"discriminator reward path={str(path)!r} has no {HYPERPARAMETERS_FILE}: is "
                                        "it a directory Discriminator.save wrote?")
        _positive(spec, "batch_size")
    elif kind == "classifier":
        _required(spec, "name_or_path", "an AutoModelForSequenceClassification hub name or local directory")
        _required(spec, "label", "the name of the label whose logit (or probability) is the reward, as in the "
                                 "model's config.id2label (e.g. label: \"not hate\")")
        if spec["input"] not in CLASSIFIER_INPUTS:
            raise RewardConfigError(f"classifier reward input={spec['input']!r} is not one of "
                                    f"{', '.join(CLASSIFIER_INPUTS)}")
        if not isinstance(spec["probability"], bool):
            raise RewardConfigError(f"classifier reward probability={spec['probability']!r} must be true or false")
        _positive(spec, "max_length", "batch_size")
    elif kind == "judge":
        _required(spec, "name_or_path", "the judge causal LM, a hub name or a local directory")
        if spec["mode"] not in MODES:
            raise RewardConfigError(f"judge reward mode={spec['mode']!r} is not one of {', '.join(MODES)}")
        check_template(DEFAULT_TEMPLATES[spec["mode"]] if spec["template"] is None else spec["template"], spec["mode"])
        if spec["mode"] == "pointwise" and not spec["min_score"] < spec["max_score"]:
            raise RewardConfigError(f"judge reward min_score={spec['min_score']} must be below "
                                    f"max_score={spec['max_score']}")
        _positive(spec, "max_new_tokens", "max_prompt_length", "batch_size")
    elif kind == "function":
        _required(spec, "function", "a callable named 'module:function', e.g. "
                                    "'rlmf.rewards.functions:persona_email_gold'")
        if not isinstance(spec["kwargs"], Mapping):
            raise RewardConfigError(f"function reward kwargs={spec['kwargs']!r} must be a mapping")
        if static:
            resolve_function(spec["function"])  # imports it
        else:
            FunctionReward(spec["function"], spec["kwargs"], context=context)  # imports it, checks the signature
    elif kind == "ensemble":
        members = spec["members"]
        if not isinstance(members, list):
            raise RewardConfigError(f"ensemble reward members must be a list of reward configs, got {members!r}")
        check_ensemble(len(members), spec["weights"], spec["combine"], spec["normalize"])


def validate_reward_config(config: Any, where: str = "reward", *, static: bool = False, **context: Any
                           ) -> Dict[str, Any]:
    """The plain, default-filled config tree of ``config``, or a :class:`RewardConfigError`. Loads no model.

    ``static=True`` checks only what the config alone decides (kinds, keys, values, templates, that functions
    import), not what depends on the run: discriminator directories and the context a function needs. That is
    the check to run when a job's config is composed, before any stage has written anything.

    Ensemble members may also be already built :class:`Reward` objects or scorers (``score`` method): they are
    kept as they are.
    """
    config = _plain(config)
    if isinstance(config, Reward) or callable(getattr(config, "score", None)):
        return config
    if not isinstance(config, Mapping):
        raise RewardConfigError(f"{where} must be a mapping with a kind (one of {', '.join(KINDS)}), got {config!r}")
    kind = config.get("kind")
    if kind not in SCHEMAS:
        raise RewardConfigError(f"{where}.kind={kind!r} is not a reward kind; choose one of: {', '.join(KINDS)}")
    allowed = defaults(kind)
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise RewardConfigError(f"{where}: {', '.join(unknown)} {'is not a key' if len(unknown) == 1 else 'are not keys'}"
                                f" of a {kind} reward; its keys: {', '.join(allowed)}")
    spec = {**allowed, **{k: v for k, v in config.items() if v is not None or k not in ("members", "kwargs")}}
    try:
        _check(spec, context, static)
    except RewardConfigError as e:
        raise RewardConfigError(f"{where}: {e}") from None
    if kind == "ensemble":
        spec["members"] = [validate_reward_config(m, f"{where}.members[{i}]", static=static, **context)
                           for i, m in enumerate(spec["members"])]
    return spec


def _build(spec: Any, placement: Optional[Placement], context: Dict[str, Any]) -> Reward:
    if isinstance(spec, Reward):
        return spec
    if not isinstance(spec, Mapping):
        return ScorerReward(spec, placement=placement)
    kind, name = spec["kind"], spec["name"]
    if kind == "discriminator":
        return load_discriminator_reward(spec["path"] or context["discriminator_path"], name=name,
                                         placement=placement, batch_size=spec["batch_size"],
                                         torch_dtype=spec["torch_dtype"])
    if kind == "classifier":
        return ClassifierReward(spec["name_or_path"], spec["label"], probability=spec["probability"],
                                input=spec["input"], max_length=spec["max_length"], batch_size=spec["batch_size"],
                                torch_dtype=spec["torch_dtype"], name=name, placement=placement)
    if kind == "judge":
        options = {k: v for k, v in spec.items() if k not in ("kind", "name", "name_or_path")}
        return JudgeReward(spec["name_or_path"], **options, name=name, placement=placement)
    if kind == "function":
        return FunctionReward(spec["function"], spec["kwargs"], context=context, name=name, placement=placement)
    members = [_build(member, placement, context) for member in spec["members"]]
    return EnsembleReward(members, spec["weights"], combine=spec["combine"], normalize=spec["normalize"], name=name,
                          placement=placement)


def build_reward(config: Any, placement: Optional[Placement] = None, **context: Any) -> Reward:
    """The reward ``config`` describes (``{"kind": ..., ...}``, a dict or DictConfig; see
    :mod:`rlmf.rewards.schema` for each kind's keys), its models placed with ``placement`` (default: CPU, float32).

    ``context`` describes the run (module docstring). Already built rewards and scorers pass through.
    """
    if isinstance(config, Reward):
        return config
    spec = validate_reward_config(config, **context)
    return _build(spec, placement, context)


# re-exported for callers that only need the function-reward helpers
__all__ = ["build_reward", "validate_reward_config", "resolve_function", "context_for"]
