"""Bandit A/B tests (rlmf.feedback.bandit) and the feedback they make (rlmf.feedback.ab.bandit_feedback):
Thompson sampling concentrates sends on the best email and loses fewer replies than uniform allocation; the
posterior win probability matches a Monte Carlo estimate; a pair's weight is that probability."""

import random

import pytest

from rlmf.feedback.ab import bandit_feedback
from rlmf.feedback.bandit import posterior_pair, run_ab_test, win_probability


def bernoulli_sender(rates, seed):
    rng = random.Random(seed)
    return lambda i: rng.random() < rates[i]


@pytest.mark.parametrize("params", [(3, 2, 1, 4), (1, 1, 1, 1), (10, 3, 7, 5), (2, 9, 1, 1)])
def test_win_probability_matches_monte_carlo(params):
    a1, b1, a2, b2 = params
    rng = random.Random(0)
    n = 200_000
    estimate = sum(rng.betavariate(a1, b1) > rng.betavariate(a2, b2) for _ in range(n)) / n
    assert win_probability(*params) == pytest.approx(estimate, abs=4 / n ** 0.5)
    assert win_probability(a1, b1, a2, b2) + win_probability(a2, b2, a1, b1) == pytest.approx(1.0, abs=1e-9)


def test_uniform_allocation_is_round_robin_and_thompson_finds_the_best():
    rates = [0.05, 0.1, 0.5, 0.2]
    uniform = run_ab_test(bernoulli_sender(rates, 1), 4, 200, "uniform", random.Random(0), gold=rates)
    assert uniform.sends == [50, 50, 50, 50]
    regrets, best_sends = {"uniform": [], "thompson": []}, []
    for seed in range(20):
        for allocation in regrets:
            test = run_ab_test(bernoulli_sender(rates, seed), 4, 200, allocation, random.Random(seed), gold=rates)
            regrets[allocation].append(test.regret[-1])
            if allocation == "thompson":
                best_sends.append(test.sends[2])
    assert sum(regrets["thompson"]) < 0.5 * sum(regrets["uniform"])
    assert sum(best_sends) / len(best_sends) > 120, "Thompson sends most recipients the best email"
    assert regrets["uniform"][0] == pytest.approx(50 * (0.45 + 0.4 + 0.0 + 0.3))


def test_posterior_pair_and_its_weight():
    test = run_ab_test(bernoulli_sender([0.0, 1.0, 0.5], 0), 3, 30, "uniform", random.Random(0))
    chosen, rejected, win = posterior_pair(test)
    assert (chosen, rejected) == (1, 0) and win > 0.999
    assert posterior_pair(run_ab_test(lambda i: False, 2, 4, "uniform", random.Random(0))) is None  # a tie
    with pytest.raises(ValueError, match="allocation='greedy'"):
        run_ab_test(lambda i: False, 2, 4, "greedy", random.Random(0))


class CountingTask:
    """A stand-in task whose recipients reply with probability 0.1 + 0.2 * (number of '!' in the email)."""

    has_gold = True

    def gold(self, prompts, completions):
        return [min(0.9, 0.1 + 0.2 * c.count("!")) for c in completions]

    def feedback(self, prompts, completions, rng):
        return [rng.random() < p for p in self.gold(prompts, completions)]

    def group(self, prompt):
        return prompt.split()[0]


def test_bandit_feedback_weighs_pairs_by_the_evidence():
    prompts = ["cto a", "cfo b"]
    completions = ["hi", "hi!!!!", "hi!", "hey", "yo", "yo!!"]
    pairs, thumbs, tests = bandit_feedback(CountingTask(), prompts, completions, 3, 60, "thompson", True,
                                           random.Random(0), random.Random(1))
    assert [t["group"] for t in tests] == ["cto", "cfo"] and all(sum(t["sends"]) == 60 for t in tests)
    assert [p.chosen for p in pairs] == ["hi!!!!", "yo!!"]
    assert all(0.5 < p.weight <= 1 for p in pairs) and [t.weight for t in thumbs] == [p.weight for p in pairs
                                                                                     for _ in range(2)]
    assert tests[0]["sends"][1] == max(tests[0]["sends"]), "Thompson sent the best email most"
    unweighted, _, _ = bandit_feedback(CountingTask(), prompts, completions, 3, 60, "thompson", False,
                                       random.Random(0), random.Random(1))
    assert [p.weight for p in unweighted] == [1.0, 1.0]


def test_the_main_job_runs_a_weighted_thompson_feedback_stage(compose, tmp_path):
    import json

    from rlmf.train import run_job

    cfg = compose("experiment=quick", "stage.stages=[sft,feedback,discriminator]", "loop.allocation=thompson",
                  "loop.sends_per_prompt=6", "loop.weighting=posterior")
    summary = run_job(cfg, tmp_path / "run")
    assert summary["feedback/sends"] == 16 * 6
    assert 0.5 < summary["feedback/mean_pair_weight"] <= 1 and summary["feedback/regret"] >= 0
    tests = [json.loads(line) for line in (tmp_path / "run" / "feedback" / "ab_tests.jsonl").read_text().splitlines()]
    assert len(tests) == 16 and all(sum(t["sends"]) == 6 for t in tests)
    pairs = [json.loads(line) for line in (tmp_path / "run" / "feedback" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(0.5 < p.get("weight", 1.0) <= 1.0 for p in pairs)
    assert summary["discriminator/train_rows"] == len(pairs)
