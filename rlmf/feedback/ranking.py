"""Machine feedback from a reward: each prompt's best and worst scored completion as a pair and two thumbs rows."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from rlmf.data.formats import FeedbackExample, PreferencePair


def best_worst_feedback(prompts: Sequence[str], completions: Sequence[str], scores: torch.Tensor, valid: torch.Tensor,
                        k: int) -> Tuple[List[PreferencePair], List[FeedbackExample]]:
    """One RLMF round's data from ``k`` scored completions per prompt (``completions``, ``scores`` and ``valid``
    ``[len(prompts) * k]``, a prompt's ``k`` adjacent).

    The highest-scored valid completion is chosen over the lowest (a pair), and is a thumbs-up while the lowest is a
    thumbs-down. Completions the reward could not score take no part; a prompt with fewer than two scored
    completions, or whose best and worst texts are equal, gives nothing. Returns ``(pairs, thumbs)``.
    """
    rewards, ok = scores.view(len(prompts), k), valid.view(len(prompts), k)
    pairs, thumbs = [], []
    for i, prompt in enumerate(prompts):
        if int(ok[i].sum()) < 2:
            continue
        best = int(rewards[i].masked_fill(~ok[i], float("-inf")).argmax())
        worst = int(rewards[i].masked_fill(~ok[i], float("inf")).argmin())
        chosen, rejected = completions[i * k + best], completions[i * k + worst]
        if chosen != rejected:
            pairs.append(PreferencePair(prompt, chosen, rejected))
            thumbs += [FeedbackExample(prompt, chosen, True), FeedbackExample(prompt, rejected, False)]
    return pairs, thumbs
