"""A/B feedback: completions answered by the task's feedback source, as preference pairs and thumbs rows.

:func:`ab_feedback` is what the ``feedback`` stage makes of the simulated recipients' replies; :func:`gold_ordered_pairs`
builds the discriminator's held-out evaluation pairs from a task's gold metric.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from rlmf.data.formats import FeedbackExample, PreferencePair


def ab_feedback(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[bool], k: int
                ) -> Tuple[List[PreferencePair], List[FeedbackExample]]:
    """Pairs and thumbs from answered completions, ``k`` per prompt, the completions of a prompt adjacent
    (``prompts`` repeated alike).

    Every completion with its answer is a thumbs row. Within a prompt the i-th answered completion is paired with
    the i-th unanswered one (an A/B test decided by the recipients: chosen = replied to); identical texts make no
    pair. Returns ``(pairs, thumbs)``.
    """
    if not len(prompts) == len(completions) == len(answers):
        raise ValueError(f"ab_feedback: {len(prompts)} prompts, {len(completions)} completions and {len(answers)} "
                         "answers must be as many")
    thumbs = [FeedbackExample(p, c, bool(a)) for p, c, a in zip(prompts, completions, answers)]
    pairs: List[PreferencePair] = []
    for start in range(0, len(thumbs), k):
        rows, prompt = thumbs[start: start + k], prompts[start]
        replied = [r.completion for r in rows if r.desirable]
        ignored = [r.completion for r in rows if not r.desirable]
        pairs += [PreferencePair(prompt, a, b) for a, b in zip(replied, ignored) if a != b]
    return pairs, thumbs


def gold_ordered_pairs(prompts: Sequence[str], completions: Sequence[str], gold: Sequence[float],
                       min_gap: float = 1e-3) -> List[PreferencePair]:
    """Completions two per prompt (adjacent), ordered into pairs by their gold value; pairs closer than ``min_gap``
    are dropped (no ground-truth preference to check against)."""
    pairs = []
    for i in range(0, len(completions) - 1, 2):
        (a, ga), (b, gb) = (completions[i], gold[i]), (completions[i + 1], gold[i + 1])
        if abs(ga - gb) >= min_gap:
            pairs.append(PreferencePair(prompts[i], a, b) if ga > gb else PreferencePair(prompts[i], b, a))
    return pairs
