"""A/B tests of candidate completions with a bandit: who gets which email, and how sure we are of the winner.

One A/B test is the ``k`` candidate emails written for one brief, sent to ``budget`` recipients like its prospect one
at a time. :func:`run_ab_test` allocates the sends:

- ``uniform``: the classic A/B test, candidate ``t mod k`` at send ``t`` (equal sends, in order);
- ``thompson``: Thompson sampling (Thompson 1933; Chapelle and Li 2011, "An Empirical Evaluation of Thompson
  Sampling"): each send goes to the candidate whose reply rate, drawn from its Beta posterior
  ``Beta(1 + replies, 1 + sends - replies)`` (a uniform prior), is highest; so sends concentrate on the emails that
  get replies, and fewer recipients get a bad email.

With the simulator's gold reply probabilities the test also records the cumulative regret after each send,
``sum_t (max_i p_i - p_{chosen_t})``: replies lost against always sending the best email (in expectation).

:func:`posterior_pair` turns a finished test into a preference pair (best vs worst posterior mean) with the
posterior probability that the chosen email's reply rate beats the rejected one's (:func:`win_probability`), the
evidence the pair rests on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

ALLOCATIONS = ("uniform", "thompson")


@dataclass
class ABTest:
    """Sends, replies and (when gold is known) the cumulative regret of one A/B test of ``k`` candidates."""

    sends: List[int]
    replies: List[int]
    regret: List[float] = field(default_factory=list)  # after each send

    def posterior(self, i: int) -> Tuple[int, int]:
        """``(alpha, beta)`` of candidate ``i``'s Beta posterior of its reply rate (uniform prior)."""
        return 1 + self.replies[i], 1 + self.sends[i] - self.replies[i]

    def posterior_mean(self, i: int) -> float:
        a, b = self.posterior(i)
        return a / (a + b)

    def interval(self, i: int, level: float = 0.95, draws: int = 4000, seed: int = 0) -> Tuple[float, float]:
        """Equal-tailed credible interval of candidate ``i``'s reply rate (by sampling the posterior, seeded)."""
        rng = random.Random(seed)
        a, b = self.posterior(i)
        xs = sorted(rng.betavariate(a, b) for _ in range(draws))
        tail = (1 - level) / 2
        return xs[int(tail * (draws - 1))], xs[int((1 - tail) * (draws - 1))]


def run_ab_test(send: Callable[[int], bool], k: int, budget: int, allocation: str, rng: random.Random,
                gold: Optional[Sequence[float]] = None) -> ABTest:
    """Allocate ``budget`` sends among ``k`` candidates; ``send(i)`` sends candidate ``i`` to one more recipient and
    returns whether they replied. ``rng`` drives Thompson's posterior draws (``send`` has its own randomness).
    ``gold`` (the candidates' true reply probabilities) fills :attr:`ABTest.regret`."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} is not one of {ALLOCATIONS}")
    if k < 1 or budget < 0:
        raise ValueError(f"an A/B test needs k >= 1 candidates and budget >= 0 sends, got k={k}, budget={budget}")
    test = ABTest(sends=[0] * k, replies=[0] * k)
    best, lost = (max(gold) if gold is not None else None), 0.0
    for t in range(budget):
        if allocation == "uniform":
            i = t % k
        else:
            draws = [rng.betavariate(*test.posterior(j)) for j in range(k)]
            i = max(range(k), key=draws.__getitem__)
        test.sends[i] += 1
        test.replies[i] += bool(send(i))
        if gold is not None:
            lost += best - gold[i]
            test.regret.append(lost)
    return test


def win_probability(alpha_a: int, beta_a: int, alpha_b: int, beta_b: int) -> float:
    """``P(X_a > X_b)`` for independent ``X_a ~ Beta(alpha_a, beta_a)``, ``X_b ~ Beta(alpha_b, beta_b)``, integer
    parameters, exactly:

        P(X_a > X_b) = sum_{i=0}^{alpha_a - 1} B(alpha_b + i, beta_a + beta_b) / ((beta_a + i) B(1 + i, beta_a) B(alpha_b, beta_b))

    (the closed form of the Beta-Beta comparison, e.g. Miller 2015, "Formulas for Bayesian A/B Testing"), summed in
    log space with ``lgamma``.
    """
    def log_beta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    total = 0.0
    for i in range(int(alpha_a)):
        total += math.exp(log_beta(alpha_b + i, beta_a + beta_b) - math.log(beta_a + i)
                          - log_beta(1 + i, beta_a) - log_beta(alpha_b, beta_b))
    return min(1.0, max(0.0, total))


def posterior_pair(test: ABTest) -> Optional[Tuple[int, int, float]]:
    """``(chosen, rejected, P(chosen's rate > rejected's))``: the candidates with the highest and the lowest posterior
    mean reply rate; None when every posterior mean is equal (no evidence either way)."""
    k = len(test.sends)
    means = [test.posterior_mean(i) for i in range(k)]
    chosen = max(range(k), key=means.__getitem__)
    rejected = min(range(k), key=means.__getitem__)
    if means[chosen] == means[rejected]:
        return None
    return chosen, rejected, win_probability(*test.posterior(chosen), *test.posterior(rejected))
