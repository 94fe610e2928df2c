"""Several offline losses in one run, each with a weight: ``loss = sum_k weight_k * loss_k``.

``algo.loss.parts`` names the parts and gives each its weight and, optionally, its hyperparameters (the part's
defaults otherwise)::

    algo:
      name: mixture
      loss:
        parts:
          dpo: {weight: 0.8, beta: 0.1}
          bco_pair: {weight: 0.2, beta: 0.1}
          sft_chosen: {weight: 1.0}

Keyed by loss name, so a part appears once and its metrics have one clear prefix: each part's metrics are logged as
``<part>/<metric>`` (``dpo/rewards/margins``, ``bco_pair/rewards/delta``) beside its unweighted ``<part>/loss``.
Every part reads the same batch: all must have the mixture's data format (``paired``). The mixture takes the union
of its parts' inputs and needs reference log-probs only if a part does. Everything is checked by
:func:`bind_mixture` before any work (``rlmf.validate.validate`` binds ``algo.loss``).
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from rlmf.losses.registry import BoundLoss, LossResult, bind_loss, get_loss, register_loss

# MPO's mixture: the DPO (sigmoid) preference loss, BCO's quality loss and SFT on the chosen responses, weighted
# 0.8, 0.2 and 1.0 (Wang et al. 2024; TRL's documented MPO recipe), each loss at its own defaults.
MPO_PARTS = MappingProxyType({
    "dpo": {"weight": 0.8, "beta": 0.1},
    "bco_pair": {"weight": 0.2, "beta": 0.1},
    "sft_chosen": {"weight": 1.0},
})
DATA_FORMAT = "paired"


def _weight(name: str, spec: Mapping[str, Any]) -> float:
    weight = spec.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"parts.{name}.weight={weight!r} must be a finite number >= 0 (every part needs a weight)")
    return float(weight)


def _bind_part(name: str, spec: Any) -> Tuple[str, float, BoundLoss]:
    if not isinstance(spec, Mapping):
        raise ValueError(f"parts.{name}={spec!r} must be a mapping with a weight and, optionally, the loss's "
                         "hyperparameters, e.g. {weight: 0.8, beta: 0.1}")
    if name == "mixture":
        raise ValueError("parts.mixture: a mixture cannot contain a mixture; list its parts instead")
    try:
        fn = get_loss(name)
    except KeyError as error:
        raise ValueError(f"parts.{name}: {error.args[0]}") from None
    if fn.data_format != DATA_FORMAT:
        hint = " (on paired data, SFT of the chosen completions is sft_chosen)" if name == "sft" else ""
        raise ValueError(f"parts.{name} reads {fn.data_format} batches, but every part of a mixture reads the same "
                         f"{DATA_FORMAT} batch{hint}")
    weight = _weight(name, spec)
    try:
        bound = bind_loss(name, {k: v for k, v in spec.items() if k != "weight"})
    except ValueError as error:
        raise ValueError(f"parts.{name}: {error}") from None
    return name, weight, bound


def mixture_parts(parts: Any) -> List[Tuple[str, float, BoundLoss]]:
    """``(name, weight, bound loss)`` per part of ``parts`` (``algo.loss.parts``), in order; ``ValueError`` naming
    ``parts.<name>...`` for an empty or malformed mapping, an unknown loss, another data format, a weight that is
    not a finite number >= 0 (or all weights 0), or a hyperparameter the part refuses."""
    if not isinstance(parts, Mapping) or not parts:
        raise ValueError(f"parts={parts!r} must map at least one loss name to its weight (and hyperparameters)")
    bound = [_bind_part(name, spec) for name, spec in parts.items()]
    if not any(weight > 0 for _, weight, _ in bound):
        raise ValueError("parts: every weight is 0, so the loss would be 0; give at least one part a weight > 0")
    return bound


def _combine(parts: List[Tuple[str, float, BoundLoss]], tensors: Dict[str, torch.Tensor],
             weights: Optional[torch.Tensor]) -> LossResult:
    total, metrics = 0.0, {}
    for name, weight, part in parts:
        missing = [i for i in part.inputs if i not in tensors]
        if missing:
            raise ValueError(f"mixture: part {name!r} needs {', '.join(missing)}, which were not given")
        extra = {"weights": weights} if weights is not None and part.takes_weights else {}
        result = part(**{i: tensors[i] for i in part.inputs}, **extra)
        total = total + weight * result.loss
        metrics[f"{name}/loss"] = result.loss.detach()
        metrics.update({f"{name}/{key}": value for key, value in result.metrics.items()})
    return LossResult(loss=total, metrics=metrics)


def bind_mixture(*, parts: Any = MPO_PARTS) -> BoundLoss:
    """The mixture of ``parts`` as a :class:`BoundLoss`: inputs the union of the parts', in order of appearance."""
    bound = mixture_parts(parts)
    inputs: List[str] = []
    for _, _, part in bound:
        inputs += [i for i in part.inputs if i not in inputs]

    def call(weights: Optional[torch.Tensor] = None, **tensors: torch.Tensor) -> LossResult:
        return _combine(bound, tensors, weights)

    return BoundLoss("mixture", DATA_FORMAT, any(part.requires_reference for _, _, part in bound), tuple(inputs),
                     True, call)


@register_loss("mixture", data=DATA_FORMAT, reference=True, bind=bind_mixture)
def mixture(weights: Optional[torch.Tensor] = None, *, parts: Mapping[str, Mapping[str, Any]] = MPO_PARTS,
            **inputs: torch.Tensor) -> LossResult:
    """A weighted sum of paired losses, each on the same batch.

        loss = sum_k weight_k * loss_k(inputs)

    As TRL's DPO trainer with a list of ``loss_type`` and ``loss_weights``. ``parts`` maps each loss name to its
    ``weight`` (a finite number >= 0) and, optionally, its hyperparameters. Default: MPO's mixture (Wang et al. 2024,
    "Enhancing the Reasoning Ability of Multimodal Large Language Models via Mixed Preference Optimization"),
    {'dpo': {'weight': 0.8, 'beta': 0.1}, 'bco_pair': {'weight': 0.2, 'beta': 0.1}, 'sft_chosen': {'weight': 1.0}}:
    DPO's preference loss, BCO's quality loss (ours with its batch-mean reward shift) and SFT on the chosen
    responses. With per-example ``weights`` [B] every part takes them. Metrics: each part's as
    ``<part>/<metric>`` and its unweighted loss as ``<part>/loss``. Requested reference log-probs are computed only
    if a part takes them (``algo.reference=none`` is allowed for a reference-free mixture).
    Inputs: the union of the parts' [B] inputs, by name (:func:`rlmf.losses.loss_inputs` with these ``parts``).
    """
    return bind_mixture(parts=parts)(weights=weights, **inputs)
