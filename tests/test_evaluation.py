"""Held-out pair metrics and win rates (rlmf.evaluation), against the definitions written out by hand."""

import math

import pytest
import torch

from rlmf.evaluation import pair_metrics, win_rate


def test_pair_metrics_by_hand():
    pc, pr = torch.tensor([-10.0, -20.0, -5.0, -8.0]), torch.tensor([-12.0, -15.0, -5.0, -9.0])
    rc, rr = torch.tensor([-11.0, -19.0, -6.0, -8.0]), torch.tensor([-11.0, -16.0, -4.0, -8.5])
    lengths = torch.tensor([5.0, 10.0, 1.0, 4.0])
    m = pair_metrics(pc, pr, lengths, rc, rr, beta=0.5)
    assert m["preference_accuracy"] == pytest.approx(2 / 4)  # -10 > -12 and -8 > -9; a tie is not a win
    assert m["logps_per_token/chosen"] == pytest.approx((-2.0 - 2.0 - 5.0 - 2.0) / 4)
    # beta * ((pc - rc) - (pr - rr)) per pair: 0.5 * (1 - -1), 0.5 * (-1 - 1), 0.5 * (1 - -1), 0.5 * (0 - -0.5)
    margins = [1.0, -1.0, 1.0, 0.25]
    assert m["rewards/margins"] == pytest.approx(sum(margins) / 4)
    assert m["rewards/accuracies"] == pytest.approx(3 / 4)
    assert set(pair_metrics(pc, pr, lengths)) == {"preference_accuracy", "logps_per_token/chosen"}


def test_win_rate_counts_ties_as_half_and_gives_a_95_interval():
    ours = [[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]]
    theirs = [[0.0, 3.0], [1.0, 1.0], [3.0, 2.0]]
    rate, half = win_rate(ours, theirs)
    per_prompt = [0.5, 0.0, 0.75]
    mean = sum(per_prompt) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_prompt) / 2)
    assert rate == pytest.approx(mean)
    assert half == pytest.approx(1.959964 * sd / math.sqrt(3), rel=1e-6)
    assert win_rate([[1.0]], [[0.0]]) == (1.0, pytest.approx(float("nan"), nan_ok=True))
    with pytest.raises(ValueError, match="2 prompts against 1"):
        win_rate([[1.0], [2.0]], [[0.0]])
