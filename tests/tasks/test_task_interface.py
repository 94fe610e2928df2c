"""The Task interface: the stages speak only to it, so a third task is one class and one config section.

``ThanksTask`` below is such a task, defined here and nowhere in the product: support tickets to answer, a
feedback source that replies with a probability that grows with the politeness of the answer, and that probability as
the gold metric. The whole main job runs on it, every stage included, without a line of the stages changed.
"""

import random

import pytest
from omegaconf import OmegaConf

from rlmf.data.formats import PromptOnly
from rlmf.feedback.ab import ab_feedback, gold_ordered_pairs
from rlmf.feedback.ranking import best_worst_feedback
from rlmf.tasks.base import TASKS, Task, build_task, register_task
from rlmf.train import run_job

WORDS = ("thanks", "please", "sorry", "glad", "kindly")


@register_task("thanks_test")
class ThanksTask(Task):
    has_feedback = True
    has_gold = True
    metric_name = "thanks_rate"  # the stages name the gold and feedback metrics with the task's word

    def _tickets(self, start, n):
        return [f"Ticket {i}: my order {i * 7 % 13} is late. Answer:" for i in range(start, start + n)]

    def corpus(self):
        return [t + " " + " ".join(WORDS) + " we will check it" for t in self._tickets(0, 60)]

    def demonstrations(self, split):
        rng = random.Random(self.seed + (split == "train"))
        tickets = self._tickets(0, 40) if split == "train" else self._tickets(40, 8)
        return [(t, f" {rng.choice(WORDS)} we will check it") for t in tickets]

    def train_prompts(self):
        return [PromptOnly(t) for t in self._tickets(0, self.setting("align_prompts", 8))]

    def eval_prompts(self):
        return [PromptOnly(t) for t in self._tickets(100, 6)]

    def feedback_prompts(self):
        return [PromptOnly(t) for t in self._tickets(0, 12)]

    def feedback(self, prompts, completions, rng):
        return [rng.random() < p for p in self.gold(prompts, completions)]

    def gold(self, prompts, completions):
        return [min(0.95, 0.1 + 0.3 * sum(w in c.split() for w in WORDS)) for c in completions]


def test_build_task_names_the_registered_ones():
    assert {"persona_email", "preference_files", "thanks_test"} <= set(TASKS)
    with pytest.raises(KeyError, match=r"task.name='nope' is not a registered task; choose one of: .*persona_email"):
        build_task(OmegaConf.create({"name": "nope"}), 0)
    # A task outside the package by its import path
    task = build_task(OmegaConf.create({"name": f"{__name__}:ThanksTask"}), 3)
    assert isinstance(task, ThanksTask) and task.seed == 3
    with pytest.raises(KeyError, match="cannot import Nope"):
        build_task(OmegaConf.create({"name": f"{__name__}:Nope"}), 0)


def test_an_unknown_task_fails_validation_with_the_choices(compose):
    from rlmf.errors import ConfigError
    from rlmf.validate import validate

    cfg = compose("experiment=quick")
    cfg.task = OmegaConf.create({"name": "nope"})
    with pytest.raises(ConfigError, match=r"task.name='nope' is not a registered task; choose one of"):
        validate(cfg)


def test_a_third_task_runs_the_whole_main_job(compose, tmp_path):
    cfg = compose("experiment=quick")
    cfg.task = OmegaConf.create({"name": "thanks_test", "align_prompts": 8, "feedback_samples_per_prompt": 4,
                                 "align_samples_per_prompt": 2})
    summary = run_job(cfg, tmp_path / "run")
    for key in ("sft/steps", "feedback/pairs", "discriminator/accuracy", "align/pairs", "gold/thanks_rate/sft",
                "gold/thanks_rate_greedy/aligned", "feedback/observed_thanks_rate", "align/chosen_gold_thanks_rate",
                "kl/aligned"):
        assert key in summary, key
    assert not [key for key in summary if "reply_rate" in key], "the embedded task's words leaked into the stages"
    assert summary["feedback/thumbs"] == 12 * 4


def test_ab_feedback_pairs_replied_with_ignored_within_a_prompt():
    prompts = ["a"] * 3 + ["b"] * 3
    completions = ["x", "y", "z", "u", "v", "w"]
    pairs, thumbs = ab_feedback(prompts, completions, [True, False, True, False, True, False], k=3)
    # a: replied x, z; ignored y -> (x, y). b: replied v; ignored u, w -> (v, u).
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("a", "x", "y"), ("b", "v", "u")]
    assert [t.desirable for t in thumbs] == [True, False, True, False, True, False]
    # identical texts make no pair
    assert ab_feedback(["a", "a"], ["s", "s"], [True, False], k=2)[0] == []
    with pytest.raises(ValueError, match="must be as many"):
        ab_feedback(["a"], ["s", "t"], [True], k=2)


def test_gold_ordered_pairs_and_best_worst_feedback():
    import torch

    pairs = gold_ordered_pairs(["a", "a", "b", "b"], ["lo", "hi", "same", "same2"], [0.1, 0.5, 0.3, 0.3])
    assert [(p.chosen, p.rejected) for p in pairs] == [("hi", "lo")]
    scores = torch.tensor([0.2, 0.9, 0.5, 1.0, float("nan"), 3.0])
    valid = torch.tensor([True, True, True, True, False, True])
    pairs, thumbs = best_worst_feedback(["p", "q"], ["a", "b", "c", "d", "e", "f"], scores, valid, k=3)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p", "b", "a"), ("q", "f", "d")]
    assert [(t.completion, t.desirable) for t in thumbs] == [("b", True), ("a", False), ("f", True), ("d", False)]
