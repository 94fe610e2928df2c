"""The embedded task: deterministic for a seed, held-out personas truly held out, a simulator that prefers what
it should."""

import random

import pytest

from rlmf.tasks.persona_email import (ROLES, Brief, Prospect, RecipientSimulator, build_world, compose_email,
                                      corpus_texts)


def test_world_is_deterministic_for_a_seed():
    a, b = build_world(seed=3, num_prospects=80), build_world(seed=3, num_prospects=80)
    assert [x.prompt for x in a.train] == [x.prompt for x in b.train]
    assert a.demonstrations == b.demonstrations
    c = build_world(seed=4, num_prospects=80)
    assert a.demonstrations != c.demonstrations


def test_splits_and_sizes_follow_the_config():
    world = build_world(seed=0, num_prospects=100, emails_per_prospect=3, heldout_persona_fraction=0.2)
    assert len(world.train) + len(world.validation) + len(world.heldout) == 100
    assert len(world.demonstrations["train"]) == 3 * len(world.train)
    seen = {b.prospect.persona for b in world.train + world.validation}
    heldout = {b.prospect.persona for b in world.heldout}
    assert heldout and not (seen & heldout), "held-out personas must never appear in train or validation"
    assert len(set(corpus_texts(world))) > 100


def test_too_small_world_is_a_clear_error():
    with pytest.raises(ValueError, match="task.num_prospects"):
        build_world(num_prospects=3)


def _prospect(role="CTO", size="mid-market"):
    return Prospect(first="Dana", last="Kim", company="Nexora", role=role, industry="fintech", size=size,
                    pain="a recent phishing scare")


GOOD_CTO = ("Hi Dana,\nI noticed Nexora is dealing with a recent phishing scare.\n"
            "VaultLine keeps customer data encrypted and audit-ready for SOC 2.\n"
            "Would a 15-minute call next Tuesday be useful?\nBest,\nAlex")


def test_simulator_prefers_the_role_specific_claim():
    sim = RecipientSimulator()
    growth = GOOD_CTO.replace("keeps customer data encrypted and audit-ready for SOC 2",
                              "helped similar teams grow qualified pipeline by 30%")
    assert sim.reply_probability(_prospect("CTO"), GOOD_CTO) > sim.reply_probability(_prospect("CTO"), growth) + 0.2
    assert (sim.reply_probability(_prospect("VP Marketing"), growth)
            > sim.reply_probability(_prospect("VP Marketing"), GOOD_CTO) + 0.2)


def test_simulator_punishes_spam_length_and_impersonal_greetings():
    sim, cto = RecipientSimulator(), _prospect("CTO", size="enterprise")
    base = sim.reply_probability(cto, GOOD_CTO)
    spam = GOOD_CTO.replace("Would a", "FREE trial, guaranteed results, act now!\nWould a")
    longer = GOOD_CTO.replace("Would a", "We have been in business for many years. " * 4 + "\nWould a")
    impersonal = GOOD_CTO.replace("Hi Dana,", "To whom it may concern,")
    for worse in (spam, longer, impersonal):
        assert sim.reply_probability(cto, worse) < base - 0.1
    assert sim.reply_probability(cto, "") < 0.01
    assert sim.reply_probability(cto, "garbage tokens without structure") < 0.1


def test_quality_knob_moves_the_gold_reply_rate():
    world, sim, rng = build_world(seed=0), RecipientSimulator(), random.Random(0)

    def mean_rate(quality):
        rates = [sim.reply_probability(b.prospect, compose_email(b, rng, quality)) for b in world.heldout]
        return sum(rates) / len(rates)

    low, mid, high = mean_rate(0.0), mean_rate(0.5), mean_rate(1.0)
    assert low < mid < high and high > 0.7 and low < 0.35


def test_draw_reply_follows_the_gold_probability():
    sim, prospect, rng = RecipientSimulator(), _prospect(), random.Random(0)
    p = sim.reply_probability(prospect, GOOD_CTO)
    draws = [sim.draw_reply(prospect, GOOD_CTO, rng) for _ in range(4000)]
    assert abs(sum(draws) / len(draws) - p) < 0.03


def test_every_role_has_pain_points_and_claims():
    world = build_world(seed=1)
    roles = {b.prospect.role for b in world.train}
    assert roles == set(ROLES)
    assert all(isinstance(b, Brief) and b.prompt.endswith("Email:\n") for b in world.heldout)
