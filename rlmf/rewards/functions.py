"""Built-in reward functions for ``kind: function`` (``function: rlmf.rewards.functions:<name>``)."""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence

from rlmf.tasks import persona_email


@functools.lru_cache(maxsize=4)
def default_world(seed: int = 0) -> persona_email.World:
    """The persona-email world of ``seed`` at the task's default sizes (``build_world`` defaults), built once."""
    return persona_email.build_world(seed=seed)


def persona_email_gold(prompts: Sequence[str], completions: Sequence[str], *,
                       world: Optional[persona_email.World] = None, seed: int = 0) -> List[float]:
    """The persona-email recipient simulator's gold reply probability of each email, in (0, 1).

    The prompts must be briefs of the world. Which world: ``world`` when given (the pipeline passes its own,
    ``build_reward(cfg, world=task.world)``, so sizes set under ``task`` are honoured); otherwise the world
    ``build_world(seed=seed)`` makes at default sizes, cached (``kwargs: {seed: ...}`` in the config). This is the
    hidden ground truth the evaluation reports: training on it is an oracle (upper-bound) experiment.
    """
    given = world is not None
    if not given:
        world = default_world(seed)
    simulator, scores = world.simulator, []
    for prompt, email in zip(prompts, completions):
        try:
            brief = world.brief_for(prompt)
        except KeyError:
            where = "the world passed as world=" if given else f"the default-size world of seed={seed}"
            raise KeyError(f"persona_email_gold: prompt {prompt[:60]!r}... is not a brief of {where}; pass the run's "
                           "world (build_reward(cfg, world=task.world)) or the seed and sizes it was built with"
                           ) from None
        scores.append(simulator.reply_probability(brief.prospect, email))
    return scores
