"""The one reward interface: (prompt, completion) text in, ``[B]`` float32 rewards out, with a validity mask.

Every reward kind subclasses :class:`Reward` and implements ``_score``; callers use

* :meth:`Reward.score_with_validity` -> :class:`RewardResult` (``scores``, ``valid``, ``metrics``), or
* :meth:`Reward.score` -> the ``[B]`` float32 CPU tensor alone, the :class:`~rlmf.modules.discriminator.RewardScorer`
  protocol the feedback loop already speaks.

A row that a judge could not score (an unparseable or out-of-range answer, a function returning None or NaN, a
non-finite model output) is *invalid*: its score is ``NaN`` in both methods, never 0, and ``valid`` is False for it.
NaN propagates through any arithmetic a caller does, so a failed row cannot pass for a real reward unnoticed;
callers that must have a number drop rows with ``~valid`` (or ``torch.isnan``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from rlmf.errors import ConfigError
from rlmf.placement import DTYPES, Placement


class RewardConfigError(ConfigError):
    """A reward config that cannot work; raised before any model is loaded, naming the key and what is allowed."""


@dataclass
class RewardResult:
    """What one scoring call returns.

    Attributes:
        scores: ``[B]`` float32 CPU tensor; ``NaN`` exactly where ``valid`` is False.
        valid: ``[B]`` bool CPU tensor.
        metrics: plain floats keyed ``rewards/<name>/<metric>``: ``mean`` and ``std`` (over the valid rows; NaN if
            none), ``invalid`` (rows invalid in this call), plus kind-specific ones (an ensemble adds every member's).

    Unpacks as ``scores, valid = result``.
    """

    scores: torch.Tensor
    valid: torch.Tensor
    metrics: Dict[str, float] = field(default_factory=dict)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.scores, self.valid))

    def __len__(self) -> int:
        return 2

    @property
    def num_invalid(self) -> int:
        return int((~self.valid).sum())


def summary_metrics(name: str, scores: torch.Tensor, valid: torch.Tensor) -> Dict[str, float]:
    """``rewards/<name>/{mean,std,invalid}``: mean and population std over the valid rows, count of invalid ones."""
    kept = scores[valid].double()
    mean = float(kept.mean()) if len(kept) else float("nan")
    std = float(kept.std(unbiased=False)) if len(kept) else float("nan")
    return {f"rewards/{name}/mean": mean, f"rewards/{name}/std": std,
            f"rewards/{name}/invalid": float((~valid).sum())}


def default_placement() -> Placement:
    """CPU, float32, no autocast: the placement of a reward built without one."""
    return Placement(device=torch.device("cpu"))


class Reward:
    """Base of every reward kind. Subclasses set ``kind`` and implement :meth:`_score`.

    Attributes:
        name: the metric name (``rewards/<name>/...``); defaults to the kind.
        rows_scored, rows_invalid: running totals over every call, for accounting across a whole stage.
        last_metrics: the metrics of the latest call (for callers that use :meth:`score`).
    """

    kind = "reward"

    def __init__(self, name: Optional[str] = None, placement: Optional[Placement] = None):
        self.name = name or self.kind
        self.placement = placement or default_placement()
        self.rows_scored = 0
        self.rows_invalid = 0
        self.last_metrics: Dict[str, float] = {}

    # -- to implement -------------------------------------------------------------------------------------------

    def _score(self, prompts: List[str], completions: List[str], batch_size: Optional[int]
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, float]]:
        """``(values [B], valid [B] bool or None, extra metrics)``. Values of invalid rows are ignored; None for
        ``valid`` means every row is valid. Non-finite values are made invalid by the caller."""
        raise NotImplementedError

    # -- the interface ------------------------------------------------------------------------------------------

    def score_with_validity(self, prompts: Sequence[str], completions: Sequence[str],
                            batch_size: Optional[int] = None) -> RewardResult:
        """Rewards of ``completions[i]`` as replies to ``prompts[i]``, with the rows that could not be scored."""
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"reward {self.name!r} got {len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            values, valid, extra = torch.zeros(0), None, {}
        else:
            values, valid, extra = self._score(prompts, completions, batch_size)
        values = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        if len(values) != len(prompts):
            raise RuntimeError(f"reward {self.name!r} returned {len(values)} values for {len(prompts)} rows")
        valid = (torch.ones(len(values), dtype=torch.bool) if valid is None
                 else torch.as_tensor(valid, dtype=torch.bool).cpu().reshape(-1).clone())
        valid &= torch.isfinite(values)
        scores = torch.where(valid, values, torch.full_like(values, float("nan")))
        metrics = {**summary_metrics(self.name, scores, valid), **extra}
        self.rows_scored += len(scores)
        self.rows_invalid += int((~valid).sum())
        self.last_metrics = metrics
        return RewardResult(scores, valid, metrics)

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch_size: Optional[int] = None
              ) -> torch.Tensor:
        """``[B]`` float32 CPU rewards; ``NaN`` for rows that could not be scored (never 0). The
        :class:`~rlmf.modules.discriminator.RewardScorer` protocol."""
        return self.score_with_validity(prompts, completions, batch_size).scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ScorerReward(Reward):
    """Any object with ``score(prompts, completions, batch_size=None) -> [B]`` (a loaded
    :class:`~rlmf.modules.discriminator.Discriminator`, a test stub) as a :class:`Reward`, scored under the
    placement's ``inference()`` (no gradients, the run's autocast)."""

    kind = "scorer"

    def __init__(self, scorer: Any, name: Optional[str] = None, placement: Optional[Placement] = None,
                 batch_size: Optional[int] = None):
        if not callable(getattr(scorer, "score", None)):
            raise TypeError(f"{type(scorer).__name__} has no score(prompts, completions) method")
        super().__init__(name=name, placement=placement)
        self.scorer = scorer
        self.batch_size = batch_size

    def _score(self, prompts, completions, batch_size):
        with self.placement.inference():
            values = self.scorer.score(prompts, completions, batch_size=batch_size or self.batch_size)
        return values, None, {}


def place(model: torch.nn.Module, placement: Placement, torch_dtype: Optional[str]) -> torch.nn.Module:
    """``model`` on the placement's device in eval mode: in ``torch_dtype`` when given, else the run's dtype."""
    if torch_dtype is None:
        return placement.put(model)
    model.to(dtype=DTYPES[torch_dtype])
    return placement.put(model, cast=False)


@contextlib.contextmanager
def keep_rng(device: torch.device) -> Iterator[None]:
    """Leave torch's global RNG state as it was (``rlmf.generation.generate`` reseeds it for every batch)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
