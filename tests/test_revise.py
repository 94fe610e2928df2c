"""CLAIR revisions (rlmf.feedback.revise): one-line edits, the reward picks the best and keeps it only when it beats
the original; the LLM reviser's answer is the revision; the main job builds (revision, sample) pairs."""

import pytest
import torch

from rlmf.feedback.revise import GuidedReviser, LLMReviser, edit_distance, line_deletions


def exclamation_penalty(prompts, completions):
    scores = torch.tensor([-float(c.count("!")) - 0.01 * len(c) for c in completions])
    return scores, torch.ones(len(completions), dtype=torch.bool)


def test_line_deletions_and_edit_distance():
    assert line_deletions("a\nb\nc") == ["b\nc", "a\nc", "a\nb"]
    assert line_deletions("one line") == []
    assert edit_distance("abc", "abc") == 0.0 and edit_distance("abc", "xyz") == 1.0
    assert 0 < edit_distance("Hi,\nBuy now!!!\nBest", "Hi,\nBest") < 1


def test_guided_reviser_keeps_the_best_edit_only_when_it_beats_the_original():
    reviser = GuidedReviser(exclamation_penalty)
    assert reviser(["p"], ["Hi,\nBuy now!!!\nBest"]) == ["Hi,\nBest"]  # the spam line goes
    assert reviser(["p"], ["Hi"]) == [None]  # no one-line edit of a one-line text
    rewriting = GuidedReviser(exclamation_penalty, rewrite=lambda prompts, prefixes: ["Thanks!!"] * len(prefixes))
    # deleting the last line is shorter than any rewrite, and both beat the original
    assert rewriting(["p"], ["Hi,\nok\nBest!"]) == ["Hi,\nok"]

    def flat(prompts, completions):  # no edit scores above the original
        return torch.zeros(len(completions)), torch.ones(len(completions), dtype=torch.bool)

    assert GuidedReviser(flat)(["p"], ["a\nb"]) == [None]


def test_llm_reviser_answers_and_template_check():
    asked = []

    def answer(texts):
        asked.extend(texts)
        return ["Hi,\nBest", "same"]

    assert LLMReviser(answer)(["brief", "brief"], ["Hi,\nBuy!!\nBest", "same"]) == ["Hi,\nBest", None]
    assert "brief" in asked[0] and "Buy!!" in asked[0]
    with pytest.raises(ValueError, match="placeholders"):
        LLMReviser(answer, template="Revise: {completion}")


def test_the_main_job_aligns_on_clair_pairs(compose, tmp_path):
    from rlmf.train import run_job

    summary = run_job(compose("experiment=quick", "feedback.pairs=clair", "algo=apo_zero"), tmp_path / "run")
    assert "align/clair/edit_distance" in summary and 0 <= summary["align/clair/revised_fraction"] <= 1
    if summary["align/pairs"]:
        assert 0 < summary["align/clair/edit_distance"] < 1
        assert "align/chosen_gold_reply_rate" in summary
    assert "gold/reply_rate/aligned" in summary


def test_a_reviser_that_revises_nothing_stops_the_round_with_the_reason(compose, tmp_path):
    """The tiny quick generator asked to revise (feedback.reviser=llm) answers nothing usable: the align stage
    stops, naming the reviser and what to change, instead of failing later on an empty dataset."""
    from rlmf.train import run_job

    with pytest.raises(RuntimeError, match=r"feedback.pairs=clair: the llm reviser revised none of the 16 samples "
                                           r"\(every answer was empty or the sample unchanged\)"):
        run_job(compose("experiment=quick", "feedback.pairs=clair", "feedback.reviser=llm"), tmp_path / "run")
