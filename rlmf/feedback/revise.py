"""CLAIR revisions: a sampled completion and a minimally different better one as a preference pair.

D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions" (CLAIR): instead of two
independent samples that differ everywhere, the rejected completion is the model's own sample and the chosen one a
minimal revision of it, so the pair's difference is the thing to learn. Two revisers (``feedback.reviser``):

- :class:`GuidedReviser` (``guided``, the default): proposes one-line edits of the completion (delete a line; let
  the generator rewrite one line given the lines before it) and keeps the edit the run's reward scores highest, if it
  scores above the original. Completions are split on newlines (an email's greeting, hook, claim, ... lines).
- :class:`LLMReviser` (``llm``): a causal LM (the generator itself by default, or ``feedback.reviser_path``) asked with
  a template to revise the completion minimally; its greedy answer is the revision.

Both return, per completion, the revision or None (no better edit found; an empty or unchanged answer).
:func:`edit_distance` is the normalised character distance reported for the pairs.
"""

from __future__ import annotations

import difflib
from typing import Callable, List, Optional, Sequence

import torch

# reward(prompts, completions) -> RewardResult-like (scores [N], valid [N]); rewrite(prompts, prefixes) -> next lines
RewardFn = Callable[[List[str], List[str]], object]
RewriteFn = Callable[[List[str], List[str]], List[str]]

LLM_TEMPLATE = ("Revise the email below as little as possible so that the recipient is more likely to reply. Keep "
                "every line that works; answer with the revised email only.\n\nBrief:\n{prompt}\n\nEmail:\n"
                "{completion}\n\nRevised email:\n")


def edit_distance(a: str, b: str) -> float:
    """``1 - ratio`` of :class:`difflib.SequenceMatcher` over characters: 0 for equal texts, 1 for nothing shared."""
    return 1.0 - difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def line_deletions(text: str) -> List[str]:
    """Every version of ``text`` with one of its lines removed (texts of one line give none)."""
    lines = text.split("\n")
    if len(lines) < 2:
        return []
    return ["\n".join(lines[:j] + lines[j + 1:]) for j in range(len(lines))]


class GuidedReviser:
    """Reward-guided minimal revisions: the best one-line edit by ``reward``, kept when it beats the original.

    ``rewrite(prompts, prefixes)`` (optional) returns, for each prompt and email prefix (the lines before the one to
    rewrite, newline-terminated), one new line; the pipeline samples it from the generator.
    """

    def __init__(self, reward: RewardFn, rewrite: Optional[RewriteFn] = None):
        self.reward, self.rewrite = reward, rewrite

    def candidates(self, prompt: str, text: str) -> List[str]:
        out = line_deletions(text)
        if self.rewrite is not None:
            lines = text.split("\n")
            prefixes = ["\n".join(lines[:j]) + ("\n" if j else "") for j in range(len(lines))]
            new_lines = self.rewrite([prompt] * len(lines), prefixes)
            out += ["\n".join(lines[:j] + [new.split("\n")[0].strip()] + lines[j + 1:])
                    for j, new in enumerate(new_lines) if new.split("\n")[0].strip()]
        return [c for c in dict.fromkeys(out) if c.strip() and c != text]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> List[Optional[str]]:
        revisions: List[Optional[str]] = []
        for prompt, text in zip(prompts, completions):
            options = self.candidates(prompt, text)
            if not options:
                revisions.append(None)
                continue
            result = self.reward([prompt] * (len(options) + 1), [text] + options)
            scores, valid = result
            scores = torch.as_tensor(scores, dtype=torch.float64)
            valid = torch.as_tensor(valid, dtype=torch.bool)
            if not bool(valid[0]) or not bool(valid[1:].any()):
                revisions.append(None)
                continue
            best = int(scores[1:].masked_fill(~valid[1:], float("-inf")).argmax())
            revisions.append(options[best] if scores[1 + best] > scores[0] else None)
        return revisions


class LLMReviser:
    """A causal LM's greedy minimal revision: ``generate(template.format(prompt=..., completion=...))``."""

    def __init__(self, generate_fn: Callable[[List[str]], List[str]], template: str = LLM_TEMPLATE):
        if "{prompt}" not in template or "{completion}" not in template:
            raise ValueError("feedback: the reviser template needs the {prompt} and {completion} placeholders")
        self.generate_fn, self.template = generate_fn, template

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> List[Optional[str]]:
        answers = self.generate_fn([self.template.format(prompt=p, completion=c)
                                    for p, c in zip(prompts, completions)])
        return [a.strip() if a.strip() and a.strip() != c.strip() else None for a, c in zip(answers, completions)]
