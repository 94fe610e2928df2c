"""A Python function as a reward: ``"module:function"`` called with ``(prompts, completions, **kwargs)``.

The function returns one number per row; ``None`` or a non-finite number marks the row invalid (NaN, counted).

Keyword arguments come from two places: the config's ``kwargs`` (the same every call) and the *context* given to
:func:`rlmf.rewards.build_reward` (objects of the run, e.g. ``world``, the persona-email task's world). A context
entry is passed only when the function's signature names it (or takes ``**kwargs``), so one context serves every
function. Both are checked against the signature at construction.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from rlmf.rewards.base import Reward, RewardConfigError


def resolve_function(spec: Union[str, Callable]) -> Callable:
    """The callable named ``"package.module:function"`` (``function`` may be dotted: ``Class.method``)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise RewardConfigError(f"function reward: function={spec!r} must name a callable as 'module:function', "
                                "e.g. 'rlmf.rewards.functions:persona_email_gold'")
    module_name, attribute = spec.split(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardConfigError(f"function reward: cannot import module {module_name!r} of function={spec!r}: "
                                f"{type(e).__name__}: {e}") from e
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise RewardConfigError(f"function reward: {module_name!r} has no {attribute!r} (function={spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise RewardConfigError(f"function reward: {spec!r} is a {type(target).__name__}, not a callable")
    return target


def context_for(function: Callable, context: Mapping[str, Any]) -> Dict[str, Any]:
    """The entries of ``context`` that ``function`` accepts as keyword arguments."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass nothing
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(context)
    accepted = {n for n, p in parameters.items()
                if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in context.items() if k in accepted}


class FunctionReward(Reward):
    """``function(prompts, completions, **kwargs, **accepted context) -> list of floats`` as a reward."""

    kind = "function"

    def __init__(self, function: Union[str, Callable], kwargs: Optional[Mapping[str, Any]] = None, *,
                 context: Optional[Mapping[str, Any]] = None, name: Optional[str] = None, placement=None):
        super().__init__(name=name, placement=placement)
        self.function = resolve_function(function)
        self.label = function if isinstance(function, str) else getattr(function, "__qualname__", repr(function))
        self.kwargs = {**context_for(self.function, context or {}), **dict(kwargs or {})}
        try:
            inspect.signature(self.function).bind([], [], **self.kwargs)
        except TypeError as e:
            raise RewardConfigError(f"function reward {self.label!r} cannot be called as f(prompts, completions"
                                    f"{''.join(', ' + k + '=...' for k in self.kwargs)}): {e}") from None
        except ValueError:  # no signature to check
            pass

    def _score(self, prompts, completions, batch_size):
        values = self.function(prompts, completions, **self.kwargs)
        values = list(values.tolist() if isinstance(values, torch.Tensor) else values)
        if len(values) != len(prompts):
            raise RuntimeError(f"function reward {self.label!r} returned {len(values)} values for {len(prompts)} rows")
        valid = torch.tensor([v is not None for v in values])
        return torch.tensor([float("nan") if v is None else float(v) for v in values]), valid, {}
