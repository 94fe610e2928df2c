"""A weighted combination of rewards.

``combine: sum`` gives ``sum_i w_i r_i``; ``combine: mean`` the weighted mean ``sum_i w_i r_i / sum_i w_i``.
With ``normalize: zscore`` each member's scores are first standardised over the batch's rows valid in the ensemble
(``(r - mean) / std``, population std; a member constant over those rows contributes 0), so members on different
scales (a logit, a probability, a 1-10 judge score) weigh what their weights say.

Validity is strict: a row invalid for any member is invalid in the ensemble (NaN). Skipping the failed member for
that row would give that row a reward on another scale than its neighbours' (other members, other weights), which
a preference built from it could not tell apart.

The result is an :class:`EnsembleResult`: also every member's own scores and the weights, for an objective that
normalises each reward before summing them (GDPO, ``algo.online.multi_objective_aggregation=normalize_then_sum``).

Metrics: every member's ``rewards/<member>/{mean,std,invalid}`` (raw scores, before normalisation, over that
member's valid rows) and its own extra metrics, then the ensemble's ``rewards/<name>/{mean,std,invalid}``. Members
are named by their ``name`` (default: their kind); a name used twice gets the member's index appended (``judge_2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from rlmf.rewards.base import Reward, RewardConfigError, RewardResult

COMBINES = ("sum", "mean")
NORMALIZES = ("none", "zscore")


def check_ensemble(n_members: int, weights: Optional[Sequence[float]], combine: str, normalize: str) -> None:
    if n_members == 0:
        raise RewardConfigError("ensemble reward needs at least one member: members: [{kind: ...}, ...]")
    if combine not in COMBINES:
        raise RewardConfigError(f"ensemble combine={combine!r} is not one of {', '.join(COMBINES)}")
    if normalize not in NORMALIZES:
        raise RewardConfigError(f"ensemble normalize={normalize!r} is not one of {', '.join(NORMALIZES)}")
    if weights is None:
        return
    if len(weights) != n_members:
        raise RewardConfigError(f"ensemble weights has {len(weights)} values for {n_members} members; give one "
                                "weight per member, or null for all 1")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise RewardConfigError(f"ensemble weights={list(weights)} must be finite numbers")
    if combine == "mean" and sum(weights) == 0:
        raise RewardConfigError(f"ensemble combine=mean divides by the sum of weights={list(weights)}, which is 0")


def zscore(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``scores`` standardised with the mean and population std of ``scores[rows]``; 0 where that std is 0."""
    kept = scores[rows].double()
    if len(kept) == 0:
        return torch.zeros_like(scores)
    mean, std = kept.mean(), kept.std(unbiased=False)
    centred = scores.double() - mean
    return (centred / std if std > 1e-12 else torch.zeros_like(centred)).float()


@dataclass
class EnsembleResult(RewardResult):
    """A :class:`RewardResult` with ``member_scores`` ``[B, K]`` (each member's raw score, NaN where that member
    could not score the row; before ``normalize``) and ``member_weights`` ``[K]`` (the ensemble's weights)."""

    member_scores: Optional[torch.Tensor] = None
    member_weights: Optional[torch.Tensor] = None


class EnsembleReward(Reward):
    kind = "ensemble"

    def __init__(self, members: Sequence[Reward], weights: Optional[Sequence[float]] = None, *, combine: str = "sum",
                 normalize: str = "none", name: Optional[str] = None, placement=None):
        members = list(members)
        check_ensemble(len(members), weights, combine, normalize)
        super().__init__(name=name, placement=placement)
        self.members: List[Reward] = members
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(members)
        self.combine, self.normalize = combine, normalize
        names = [m.name for m in members]
        for index, member in enumerate(members):
            if names.count(member.name) > 1 or member.name == self.name:
                member.name = f"{member.name}_{index}"

    def score_with_validity(self, prompts, completions, batch_size=None) -> EnsembleResult:
        result = super().score_with_validity(prompts, completions, batch_size)
        members = self._member_scores if len(result.scores) else torch.zeros(0, len(self.members))
        return EnsembleResult(result.scores, result.valid, result.metrics, member_scores=members,
                              member_weights=torch.tensor(self.weights))

    def _score(self, prompts, completions, batch_size):
        results = [m.score_with_validity(prompts, completions, batch_size) for m in self.members]
        self._member_scores = torch.stack([r.scores for r in results], dim=1)  # read by score_with_validity
        valid = torch.stack([r.valid for r in results]).all(dim=0)
        total = torch.zeros(len(prompts), dtype=torch.float64)
        for weight, result in zip(self.weights, results):
            member = zscore(result.scores, valid) if self.normalize == "zscore" else result.scores
            total += weight * torch.where(valid, member, torch.zeros_like(member)).double()
        if self.combine == "mean":
            total /= sum(self.weights)
        metrics = {}
        for result in results:
            metrics.update(result.metrics)  # each member's rewards/<member>/... (a nested ensemble's members too)
        return total.float(), valid, metrics
