"""A/B feedback: completions answered by the task's feedback source, as preference pairs and thumbs rows.

:func:`ab_feedback` is what the ``feedback`` stage makes of one send per candidate (the default);
:func:`bandit_feedback` runs a bandit A/B test per prompt (``loop.allocation``, ``loop.sends_per_prompt``) and
weighs each pair by its evidence (``loop.weighting=posterior``); :func:`gold_ordered_pairs` builds the
discriminator's held-out evaluation pairs from a task's gold metric.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Sequence, Tuple

from rlmf.data.formats import FeedbackExample, PreferencePair
from rlmf.feedback.bandit import posterior_pair, run_ab_test


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


def bandit_feedback(task, prompts: Sequence[str], completions: Sequence[str], k: int, budget: int, allocation: str,
                    posterior_weights: bool, send_rng: random.Random, bandit_rng: random.Random
                    ) -> Tuple[List[PreferencePair], List[FeedbackExample], List[Dict[str, Any]]]:
    """One A/B test per prompt over its ``k`` candidates (``completions`` ``[len(prompts) * k]``, adjacent), with
    ``budget`` sends allocated by ``allocation`` (:func:`rlmf.feedback.bandit.run_ab_test`); each send is one answer
    of ``task.feedback`` (one more recipient like the prompt's), drawn with ``send_rng``.

    Each test gives at most one pair, the best against the worst posterior mean reply rate, weighted by the
    posterior probability that the chosen's rate is the higher (``posterior_weights``; else 1), and the two as a
    thumbs-up and a thumbs-down with that weight. Returns ``(pairs, thumbs, tests)``; ``tests`` are rows for
    ``ab_tests.jsonl``: the prompt, its group, every candidate's sends, replies, posterior mean and (with a gold
    metric) gold reply probability, the regret after each send, and the pair's weight.
    """
    pairs: List[PreferencePair] = []
    thumbs: List[FeedbackExample] = []
    tests: List[Dict[str, Any]] = []
    for n, prompt in enumerate(prompts):
        candidates = list(completions[n * k:(n + 1) * k])
        gold = task.gold([prompt] * k, candidates) if task.has_gold else None
        test = run_ab_test(lambda i: task.feedback([prompt], [candidates[i]], send_rng)[0], k, budget, allocation,
                           bandit_rng, gold)
        row = {"prompt": prompt, "group": task.group(prompt), "sends": test.sends, "replies": test.replies,
               "posterior_mean": [test.posterior_mean(i) for i in range(k)], "gold": gold, "regret": test.regret,
               "weight": None}
        picked = posterior_pair(test)
        if picked is not None and candidates[picked[0]] != candidates[picked[1]]:
            chosen, rejected, win = picked
            weight = win if posterior_weights else 1.0
            row["weight"] = weight
            pairs.append(PreferencePair(prompt, candidates[chosen], candidates[rejected], weight=weight))
            thumbs += [FeedbackExample(prompt, candidates[chosen], True, weight=weight),
                       FeedbackExample(prompt, candidates[rejected], False, weight=weight)]
        tests.append(row)
    return pairs, thumbs, tests
