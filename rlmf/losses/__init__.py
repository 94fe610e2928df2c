"""Preference and feedback objectives as pure functions over sequence log-probs.

Every loss takes keyword tensors (see each function's docstring for shapes) plus keyword hyperparameters, and
returns a :class:`LossResult`. Every offline loss (the ``sft``, ``paired``, ``unpaired`` and ``paired_online`` data
formats) also takes optional per-example ``weights`` [B] (>= 0): its batch mean becomes ``sum(w * l) / sum(w)``
(token means weight every token of an example by its ``w``); ``None``, the default, and weights of 1 give the
unweighted loss. The online objectives weigh completions by their rewards instead. ``LOSSES`` maps the name used in ``conf/algo/<name>.yaml`` to the function;
:func:`get_loss` looks one up with an error that lists the valid names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict

import torch

DATA_FORMATS = ("sft", "paired", "unpaired", "paired_online", "online")


@dataclass
class LossResult:
    """A scalar ``loss`` (the batch mean) and detached scalar ``metrics`` named like ``rewards/chosen``."""

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


LOSSES: Dict[str, Callable[..., LossResult]] = {}


def register_loss(name: str, *, data: str, reference: bool) -> Callable:
    """Register ``fn`` under ``name``.

    ``data`` says which batches the loss consumes (one of ``DATA_FORMATS``); ``reference`` says whether it needs
    reference-model log-probs (reference-free losses make the trainer skip loading a reference model).
    """
    if data not in DATA_FORMATS:
        raise ValueError(f"register_loss({name!r}): data={data!r} is not one of {DATA_FORMATS}")

    def decorate(fn: Callable[..., LossResult]) -> Callable[..., LossResult]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice ({LOSSES[name].__module__} and {fn.__module__})")
        fn.loss_name = name
        fn.data_format = data
        fn.requires_reference = reference
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


def loss_inputs(name: str) -> tuple:
    """Names of the tensors a loss requires (its positional-or-keyword parameters without a default)."""
    fn = get_loss(name)
    return tuple(
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty
    )


FAMILIES = ("preference", "online", "sft")


def loss_family(name: str) -> str:
    """The family whose optimisation defaults a loss takes (``generator.optim_by_family``): ``online`` for the online
    objectives, ``sft`` for maximum likelihood, ``preference`` for every offline preference or feedback loss."""
    data_format = get_loss(name).data_format
    return data_format if data_format in ("online", "sft") else "preference"


def takes_weights(name: str) -> bool:
    """Whether a loss takes the optional per-example ``weights`` [B] (every offline loss does)."""
    return "weights" in inspect.signature(get_loss(name)).parameters


# Importing the family modules fills LOSSES. Keep this list sorted; one module per family.
from rlmf.losses import (  # noqa: E402,F401  (registration side effects)
    apo,
    dpo,
    dpo_variants,
    hypo,
    kto,
    orpo,
    policy_gradient,
    sft,
    simpo,
)
