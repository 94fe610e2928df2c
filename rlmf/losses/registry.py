"""The loss registry: :class:`LossResult`, ``LOSSES`` and how a loss is registered, looked up and bound.

A leaf of :mod:`rlmf.losses`: every family module registers its functions here, and the package's ``__init__``
imports the families (filling ``LOSSES``) and re-exports these names.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

DATA_FORMATS = ("sft", "paired", "unpaired", "paired_online", "online")


@dataclass
class LossResult:
    """A scalar ``loss`` (the batch mean) and detached scalar ``metrics`` named like ``rewards/chosen``."""

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


LOSSES: Dict[str, Callable[..., LossResult]] = {}


def register_loss(name: str, *, data: str, reference: bool, targets: Optional[str] = None,
                  choices: Optional[Dict[str, Tuple[str, ...]]] = None, check: Optional[Callable[..., None]] = None,
                  bind: Optional[Callable[..., "BoundLoss"]] = None) -> Callable:
    """Register ``fn`` under ``name``.

    ``data`` says which batches the loss consumes (one of ``DATA_FORMATS``); ``reference`` says whether it needs
    reference-model log-probs (reference-free losses make the trainer skip loading a reference model).
    ``targets`` (required for ``data="online"``, only there) names the advantage estimator the online trainer
    builds the loss's per-completion inputs with (a key of ``rlmf.modules.targets.ESTIMATORS``), so an objective
    that reuses an estimator takes no trainer code. ``choices`` maps a string hyperparameter to its allowed values,
    checked with the config before any work (``rlmf.validate.validate``). ``check``, called with every hyperparameter
    by keyword, raises ``ValueError`` for values the loss refuses, so that :func:`bind_loss` refuses them before any
    work. ``bind`` is for a loss made of other losses (:mod:`rlmf.losses.mixture`): it builds the :class:`BoundLoss`
    from the hyperparameters, which decide its inputs.
    """
    if data not in DATA_FORMATS:
        raise ValueError(f"register_loss({name!r}): data={data!r} is not one of {DATA_FORMATS}")
    if (data == "online") != (targets is not None):
        raise ValueError(f"register_loss({name!r}): targets= names the estimator of an online loss, and only of one")

    def decorate(fn: Callable[..., LossResult]) -> Callable[..., LossResult]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice ({LOSSES[name].__module__} and {fn.__module__})")
        fn.loss_name = name
        fn.data_format = data
        fn.requires_reference = reference
        fn.targets = targets
        fn.choices = dict(choices or {})
        fn.check_hyperparameters = check
        fn.bind = bind
        LOSSES[name] = fn
        return fn

    return decorate


def get_loss(name: str) -> Callable[..., LossResult]:
    """The loss registered as ``name``; a ``KeyError`` listing the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}") from None


def loss_hyperparameters(name: str) -> Dict[str, object]:
    """Keyword-only hyperparameters of a loss and their defaults (what ``conf/algo/<name>.yaml`` may set)."""
    fn = get_loss(name)
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _signature_inputs(fn: Callable) -> Tuple[str, ...]:
    return tuple(
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty
    )


def loss_inputs(name: str, hyperparameters: Optional[Mapping[str, Any]] = None) -> Tuple[str, ...]:
    """Names of the tensors a loss requires: its positional-or-keyword parameters without a default, or, for a
    loss made of others, those of its parts under ``hyperparameters`` (its defaults when None)."""
    return bind_loss(name, hyperparameters).inputs


@dataclass(frozen=True)
class BoundLoss:
    """A registered loss with its hyperparameters bound (:func:`bind_loss`): ``bound(**tensors)`` is the loss, and
    the fields say what it needs."""

    name: str
    data_format: str
    requires_reference: bool  # of this binding: a mixture needs reference log-probs only if a part does
    inputs: Tuple[str, ...]  # the tensors it takes, besides the optional per-example ``weights``
    takes_weights: bool
    call: Callable[..., LossResult]

    def __call__(self, **tensors: torch.Tensor) -> LossResult:
        return self.call(**tensors)

    @property
    def reference_per_token(self) -> bool:
        """Whether it needs the reference's per-token log-probs (a cache of summed ones cannot serve it)."""
        return any(i.startswith("reference_") and i.endswith("_token_logps") for i in self.inputs)


def bind_loss(name: str, hyperparameters: Optional[Mapping[str, Any]] = None) -> BoundLoss:
    """The loss ``name`` with ``hyperparameters`` (``algo.loss``; the rest at their defaults) bound.

    Raises ``ValueError`` (``KeyError`` for an unknown name) before any work: for a key that is not a
    hyperparameter of the loss, a string outside its ``choices``, and values its ``check`` refuses.
    """
    fn = get_loss(name)
    hyperparameters = dict(hyperparameters or {})
    defaults = loss_hyperparameters(name)
    unknown = [key for key in hyperparameters if key not in defaults]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} is not a hyperparameter of loss {name!r}; it takes: "
                         f"{', '.join(defaults) or 'none'}")
    for key, allowed in fn.choices.items():
        if key in hyperparameters and hyperparameters[key] not in allowed:
            raise ValueError(f"{key}={hyperparameters[key]!r} is not valid for loss {name!r}; choose one of: "
                             f"{', '.join(allowed)}")
    if fn.bind is not None:
        return fn.bind(**{**defaults, **hyperparameters})
    if fn.check_hyperparameters is not None:
        fn.check_hyperparameters(**{**defaults, **hyperparameters})
    return BoundLoss(name, fn.data_format, fn.requires_reference, _signature_inputs(fn), takes_weights(name),
                     functools.partial(fn, **hyperparameters))


FAMILIES = ("preference", "online", "sft")


def loss_family(name: str) -> str:
    """The family whose optimisation defaults a loss takes (``generator.optim_by_family``): ``online`` for the online
    objectives, ``sft`` for maximum likelihood, ``preference`` for every offline preference or feedback loss."""
    data_format = get_loss(name).data_format
    return data_format if data_format in ("online", "sft") else "preference"


def takes_weights(name: str) -> bool:
    """Whether a loss takes the optional per-example ``weights`` [B] (every offline loss does)."""
    return "weights" in inspect.signature(get_loss(name)).parameters


def takes_entropies(name: str) -> bool:
    """Whether a loss takes the optional per-token ``entropies`` [B, T] of the policy (its entropy options read
    them; the online trainer computes them only when an option is on)."""
    return "entropies" in inspect.signature(get_loss(name)).parameters
