"""An LLM judge: a causal LM asked with a rubric template, answering greedily in a few tokens.

``pointwise``: the template (placeholders ``{prompt}``, ``{completion}``, optionally ``{min_score}`` and
``{max_score}``) asks for a number; the reward is the *first number* in the answer. An answer with no number, or
one outside ``[min_score, max_score]``, makes the row invalid (NaN, counted in ``rewards/<name>/invalid``).

``pairwise``: the template (``{prompt}``, ``{first}``, ``{second}``) asks which reply is better, answering 1 or 2.
:meth:`JudgeReward.compare` returns, per pair, 1.0 when ``a`` is preferred, 0.0 when ``b`` is, NaN when the answer
is neither 1 nor 2. Each pair's order is drawn from a ``random.Random(seed)`` owned by the judge (one draw per pair,
so a run is reproducible given the seed and the sequence of calls); a swapped pair shows ``b`` first and its answer
is mapped back, so a judge's position bias averages out instead of favouring ``a``.

As a reward, pairwise mode plays a *round-robin within each group*: rows with the same prompt text form a group
(as the feedback loop's k samples per prompt do) and every two members are compared once; a row's reward is its
win rate over its valid comparisons, in [0, 1]. A row alone in its group, or whose comparisons were all invalid, is
invalid. A group of k costs k(k-1)/2 judge calls. To score against a fixed reference reply instead, call
:meth:`JudgeReward.compare` with the references as ``b``.

Decoding goes through :func:`rlmf.generation.generate` (greedy, the checkpoint's stop tokens), with the filled
template sent as one user message through the tokenizer's chat template when it has one (``chat_template``).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from itertools import combinations
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from rlmf.placement import Placement
from rlmf.rewards.base import Reward, RewardConfigError, keep_rng, place

MODES = ("pointwise", "pairwise")
REQUIRED_PLACEHOLDERS = {"pointwise": ("prompt", "completion"), "pairwise": ("prompt", "first", "second")}
OPTIONAL_PLACEHOLDERS = {"pointwise": ("min_score", "max_score"), "pairwise": ()}

POINTWISE_TEMPLATE = (
    "You are grading a reply to a request.\n\n"
    "Request:\n{prompt}\n\n"
    "Reply:\n{completion}\n\n"
    "How good is the reply? Answer with one number from {min_score:g} to {max_score:g} and nothing else.\n"
    "Score:"
)
PAIRWISE_TEMPLATE = (
    "You are comparing two replies to the same request.\n\n"
    "Request:\n{prompt}\n\n"
    "Reply 1:\n{first}\n\n"
    "Reply 2:\n{second}\n\n"
    "Which reply is better? Answer 1 or 2 and nothing else.\n"
    "Answer:"
)
DEFAULT_TEMPLATES = {"pointwise": POINTWISE_TEMPLATE, "pairwise": PAIRWISE_TEMPLATE}

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def first_number(answer: str) -> Optional[float]:
    """The first number written in ``answer`` (``"Score: 7/10"`` -> 7.0), or None when there is none."""
    match = _NUMBER.search(answer)
    return float(match.group()) if match else None


def check_template(template: str, mode: str) -> str:
    """``template`` if it is a valid ``str.format`` template for ``mode``; a clear error otherwise."""
    if mode not in MODES:
        raise RewardConfigError(f"judge mode={mode!r} is not one of {', '.join(MODES)}")
    required, optional = REQUIRED_PLACEHOLDERS[mode], OPTIONAL_PLACEHOLDERS[mode]
    allowed = ", ".join("{" + p + "}" for p in required + optional)
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise RewardConfigError(f"judge template is not a valid str.format template ({e}); write a literal brace "
                                f"as {{{{ or }}}}; placeholders allowed in mode={mode}: {allowed}") from None
    unknown = sorted(f for f in fields if f not in required + optional)
    missing = [p for p in required if p not in fields]
    if unknown or missing:
        problems = ([f"missing {', '.join('{' + p + '}' for p in missing)}"] if missing else []) + (
            [f"unknown {', '.join('{' + (p or '') + '}' for p in unknown)}"] if unknown else [])
        raise RewardConfigError(f"judge template (mode={mode}) has {'; '.join(problems)}: placeholders allowed in "
                                f"mode={mode}: {allowed} (the first {len(required)} required; a literal brace is "
                                "written {{ or }})")
    return template


@dataclass
class Comparison:
    """One :meth:`JudgeReward.compare_with_details` call: ``preference`` [B] (1.0: ``a`` better, 0.0: ``b``, NaN:
    unparseable), ``swapped`` [B] bool (``b`` was shown first), the judge's raw ``answers``."""

    preference: torch.Tensor
    swapped: torch.Tensor
    answers: List[str]


class JudgeReward(Reward):
    """A causal-LM judge (see the module docstring for the two modes).

    Args:
        name_or_path: the judge LM, loaded with :func:`rlmf.models.load_generator`: a hub name, a local directory
            or a ``.gguf`` file (dequantised to a float model, :func:`rlmf.models.load_gguf`).
        mode: ``pointwise`` or ``pairwise``.
        template: the rubric (validated here); None: the mode's built-in template.
        min_score, max_score: pointwise: the valid range of the answer's number.
        max_new_tokens: answer length; max_prompt_length: tokens of the filled template kept (its end).
        batch_size: judge prompts per generate call.
        chat_template: None: use the tokenizer's chat template when it has one; True: require one; False: raw text.
        seed: pairwise: seed of the order randomisation.
        torch_dtype, attn_implementation: as for the generator; None dtype: the placement's.
        model, tokenizer: an already loaded judge (instead of ``name_or_path``; tests, sharing the policy).
    """

    kind = "judge"

    def __init__(self, name_or_path: Optional[str] = None, *, mode: str = "pointwise",
                 template: Optional[str] = None, min_score: float = 1.0, max_score: float = 10.0,
                 max_new_tokens: int = 8, max_prompt_length: int = 1024, batch_size: int = 8,
                 chat_template: Optional[bool] = None, seed: int = 0, torch_dtype: Optional[str] = None,
                 attn_implementation: Optional[str] = None, name: Optional[str] = None,
                 placement: Optional[Placement] = None, model=None, tokenizer=None):
        self.template = check_template(DEFAULT_TEMPLATES.get(mode, "") if template is None else template, mode)
        if mode == "pointwise" and not min_score < max_score:
            raise RewardConfigError(f"judge min_score={min_score} must be below max_score={max_score}")
        if max_new_tokens < 1:
            raise RewardConfigError(f"judge max_new_tokens={max_new_tokens} must be at least 1")
        super().__init__(name=name, placement=placement)
        self.mode, self.min_score, self.max_score = mode, float(min_score), float(max_score)
        self.max_new_tokens, self.max_prompt_length, self.batch_size = max_new_tokens, max_prompt_length, batch_size
        self.seed = seed
        self.rng = random.Random(seed)
        if model is None:
            from rlmf.models import load_generator

            if not name_or_path:
                raise RewardConfigError("judge needs name_or_path (the judge LM: a hub name, a local directory or "
                                        "a .gguf file)")
            model, tokenizer = load_generator(name_or_path, torch_dtype=torch_dtype,
                                              attn_implementation=attn_implementation)
            self.model = place(model, self.placement, torch_dtype)
        else:
            self.model = model
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise RewardConfigError(f"judge chat_template=true but the tokenizer of {name_or_path} has no chat "
                                    "template; set chat_template to null or false")
        self.use_chat_template = has_template if chat_template is None else bool(chat_template)
        self.last_answers: List[str] = []
        self._call_batch_size: Optional[int] = None  # the batch_size of the score call under way
        self.comparisons = 0  # pairwise: comparisons made, and how many got no usable answer, over every call
        self.invalid_comparisons = 0

    # -- decoding (the seam tests replace) ---------------------------------------------------------------------

    def _decode(self, texts: List[str]) -> List[str]:
        """The judge's greedy answers to the filled templates ``texts``."""
        from rlmf.data.formats import PromptOnly
        from rlmf.generation import generate

        rows = [PromptOnly(t, ({"role": "user", "content": t},)) if self.use_chat_template else PromptOnly(t)
                for t in texts]
        with keep_rng(self.placement.device), self.placement.inference():
            return generate(self.model, self.tokenizer, rows, max_new_tokens=self.max_new_tokens, do_sample=False,
                            batch_size=self._call_batch_size or self.batch_size,
                            max_prompt_length=self.max_prompt_length)

    def ask(self, texts: List[str]) -> List[str]:
        answers = list(self._decode(list(texts)))
        if len(answers) != len(texts):
            raise RuntimeError(f"judge decoding returned {len(answers)} answers for {len(texts)} prompts")
        self.last_answers = answers
        return answers

    # -- pointwise ---------------------------------------------------------------------------------------------

    def fill(self, prompt: str, completion: str) -> str:
        return self.template.format(prompt=prompt, completion=completion, min_score=self.min_score,
                                    max_score=self.max_score)

    def parse_score(self, answer: str) -> Optional[float]:
        """The answer's first number if it lies in ``[min_score, max_score]``, else None (an invalid row)."""
        value = first_number(answer)
        return value if value is not None and self.min_score <= value <= self.max_score else None

    def _pointwise(self, prompts: List[str], completions: List[str]):
        answers = self.ask([self.fill(p, c) for p, c in zip(prompts, completions)])
        parsed = [self.parse_score(a) for a in answers]
        values = torch.tensor([float("nan") if v is None else v for v in parsed], dtype=torch.float32)
        return values, torch.tensor([v is not None for v in parsed]), {}

    # -- pairwise ----------------------------------------------------------------------------------------------

    def compare_with_details(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> Comparison:
        """Judge ``a[i]`` against ``b[i]`` for ``prompts[i]``, each pair shown in a random order."""
        if self.mode != "pairwise":
            raise RuntimeError(f"judge {self.name!r} is mode={self.mode}; compare needs mode=pairwise")
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"compare got {len(prompts)} prompts, {len(a)} a and {len(b)} b; they must pair up")
        swapped = [self.rng.random() < 0.5 for _ in prompts]
        texts = [self.template.format(prompt=p, first=y if s else x, second=x if s else y)
                 for p, x, y, s in zip(prompts, a, b, swapped)]
        answers = self.ask(texts) if texts else []
        preference = []
        for answer, swap in zip(answers, swapped):
            choice = first_number(answer)
            if choice not in (1.0, 2.0):
                preference.append(float("nan"))
            else:
                preference.append(float((choice == 1.0) != swap))  # position 1 is a unless swapped
        self.comparisons += len(answers)
        self.invalid_comparisons += sum(p != p for p in preference)
        return Comparison(torch.tensor(preference, dtype=torch.float32), torch.tensor(swapped, dtype=torch.bool),
                          answers)

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """``[B]`` float32: 1.0 where ``a[i]`` is judged better than ``b[i]``, 0.0 where ``b[i]`` is, NaN where the
        judge's answer is neither 1 nor 2."""
        return self.compare_with_details(prompts, a, b).preference

    def _round_robin(self, prompts: List[str], completions: List[str]):
        groups: Dict[str, List[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(i)
        pairs: List[Tuple[int, int]] = [pair for rows in groups.values() for pair in combinations(rows, 2)]
        wins, counts = torch.zeros(len(prompts)), torch.zeros(len(prompts))
        extra = {f"rewards/{self.name}/comparisons": float(len(pairs))}
        if pairs:
            details = self.compare_with_details([prompts[i] for i, _ in pairs], [completions[i] for i, _ in pairs],
                                                [completions[j] for _, j in pairs])
            done = ~torch.isnan(details.preference)
            for (i, j), pref, ok in zip(pairs, details.preference.tolist(), done.tolist()):
                if ok:
                    wins[i] += pref
                    wins[j] += 1.0 - pref
                    counts[i] += 1
                    counts[j] += 1
            first = [(p == 1.0) != s for p, s, d in zip(details.preference.tolist(), details.swapped.tolist(),
                                                        done.tolist()) if d]
            extra[f"rewards/{self.name}/invalid_comparisons"] = float((~done).sum())
            extra[f"rewards/{self.name}/first_position_rate"] = sum(first) / len(first) if first else float("nan")
        valid = counts > 0
        return torch.where(valid, wins / counts.clamp(min=1), torch.full_like(wins, float("nan"))), valid, extra

    # -- the reward --------------------------------------------------------------------------------------------

    def _score(self, prompts, completions, batch_size):
        self._call_batch_size = batch_size
        try:
            if self.mode == "pointwise":
                return self._pointwise(prompts, completions)
            return self._round_robin(prompts, completions)
        finally:
            self._call_batch_size = None
