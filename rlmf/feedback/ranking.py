"""Machine feedback from a reward: each prompt's best and worst scored completion as a pair and two thumbs rows."""

from __future__ import annotations

import random
from typing import List, Sequence, Tuple

import torch

from rlmf.data.formats import FeedbackExample, PreferencePair


def best_worst_feedback(prompts: Sequence[str], completions: Sequence[str], scores: torch.Tensor, valid: torch.Tensor,
                        k: int, chosen_rank: int = 1) -> Tuple[List[PreferencePair], List[FeedbackExample]]:
    """One RLMF round's data from ``k`` scored completions per prompt (``completions``, ``scores`` and ``valid``
    ``[len(prompts) * k]``, a prompt's ``k`` adjacent).

    The highest-scored valid completion is chosen over the lowest (a pair), and is a thumbs-up while the lowest is a
    thumbs-down. Completions the reward could not score take no part; a prompt with fewer than two scored
    completions, or whose best and worst texts are equal, gives nothing. Returns ``(pairs, thumbs)``.

    ``chosen_rank`` r > 1 chooses the r-th highest-scored valid completion instead of the best (ties in sample order),
    still over the lowest: a prompt with at most r scored completions, or whose r-th is tied with the lowest, gives
    nothing. With r = k - 1 the chosen is the second-worst, below the model's typical sample (APO's "worse chosen"
    data condition).
    """
    rewards, ok = scores.view(len(prompts), k), valid.view(len(prompts), k)
    pairs, thumbs = [], []
    for i, prompt in enumerate(prompts):
        if int(ok[i].sum()) < max(2, chosen_rank + 1):
            continue
        if chosen_rank == 1:
            best = int(rewards[i].masked_fill(~ok[i], float("-inf")).argmax())
        else:
            order = torch.argsort(rewards[i].masked_fill(~ok[i], float("-inf")), descending=True, stable=True)
            best = int(order[chosen_rank - 1])
        worst = int(rewards[i].masked_fill(~ok[i], float("inf")).argmin())
        if chosen_rank > 1 and not rewards[i, best] > rewards[i, worst]:  # tied with the worst: no preference
            continue
        chosen, rejected = completions[i * k + best], completions[i * k + worst]
        if chosen != rejected:
            pairs.append(PreferencePair(prompt, chosen, rejected))
            thumbs += [FeedbackExample(prompt, chosen, True), FeedbackExample(prompt, rejected, False)]
    return pairs, thumbs


def drop_desirable(pairs: List[PreferencePair], thumbs: List[FeedbackExample], fraction: float, rng: random.Random
                   ) -> Tuple[List[PreferencePair], List[FeedbackExample], int]:
    """Leave out ``round(fraction * n)`` of the ``n`` desirable thumbs rows, drawn with ``rng``, and every pair whose
    chosen completion (for its prompt) is one of them; undesirable rows all stay. KTO's data-imbalance experiment
    (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", sec. 4.3): KTO learns from
    the unpaired rows that remain, DPO from the pairs that remain. Returns ``(pairs, thumbs, dropped)``."""
    desirable = [i for i, t in enumerate(thumbs) if t.desirable]
    dropped = set(rng.sample(desirable, round(fraction * len(desirable))))
    gone = {(thumbs[i].prompt, thumbs[i].completion) for i in dropped}
    return ([p for p in pairs if (p.prompt, p.chosen) not in gone],
            [t for i, t in enumerate(thumbs) if i not in dropped], len(dropped))
