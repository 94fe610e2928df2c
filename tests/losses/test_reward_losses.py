"""The discriminator's pure losses against their formulas written out by hand, plus gradcheck."""

import math

import pytest
import torch

from rlmf.losses import LOSSES
from rlmf.losses.reward import bradley_terry_loss, thumbs_loss


def log_sigmoid_by_hand(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize("margin", [0.0, 0.5, 2.0])
def test_bradley_terry_matches_formula(margin):
    chosen = [1.5, -0.3, 2.0, 0.0, 4.0]
    rejected = [0.5, 0.7, 2.0, -1.0, -3.0]
    expected = sum(-log_sigmoid_by_hand(c - r - margin) for c, r in zip(chosen, rejected)) / len(chosen)
    result = bradley_terry_loss(torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64), margin=margin)
    assert result.loss.item() == pytest.approx(expected, rel=1e-12)
    assert result.metrics["discriminator/loss"].item() == pytest.approx(expected, rel=1e-12)
    # 1.5>0.5, -0.3<0.7, 2.0==2.0 (a tie is not a win), 0>-1, 4>-3
    assert result.metrics["discriminator/accuracy"].item() == pytest.approx(3 / 5)
    assert result.metrics["discriminator/margin"].item() == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 5)


def test_thumbs_matches_formula():
    rewards = [2.0, -1.0, 0.3, -0.2, 0.0]
    desirable = [1, 0, 0, 1, 1]
    expected = -sum(
        y * log_sigmoid_by_hand(r) + (1 - y) * log_sigmoid_by_hand(-r) for r, y in zip(rewards, desirable)
    ) / len(rewards)
    result = thumbs_loss(torch.tensor(rewards, dtype=torch.float64), torch.tensor(desirable, dtype=torch.bool))
    assert result.loss.item() == pytest.approx(expected, rel=1e-12)
    # right: 2.0 up, -1.0 down; wrong: 0.3 down, -0.2 up, 0.0 up (0 is not > 0)
    assert result.metrics["discriminator/accuracy"].item() == pytest.approx(2 / 5)
    signed = [(2 * y - 1) * r for r, y in zip(rewards, desirable)]
    assert result.metrics["discriminator/margin"].item() == pytest.approx(sum(signed) / 5)


def test_gradcheck():
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    rejected = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    desirable = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c, r: bradley_terry_loss(c, r, margin=0.3).loss, (chosen, rejected))
    assert torch.autograd.gradcheck(lambda r: thumbs_loss(r, desirable).loss, (chosen,))


def test_extreme_rewards_stay_finite():
    result = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert result.loss.item() == pytest.approx(400.0)
    assert torch.isfinite(thumbs_loss(torch.tensor([-500.0]), torch.tensor([1.0])).loss)


def test_metrics_are_detached_and_shapes_checked():
    chosen = torch.zeros(3, requires_grad=True)
    result = bradley_terry_loss(chosen, torch.zeros(3))
    assert result.loss.requires_grad and not any(m.requires_grad for m in result.metrics.values())
    with pytest.raises(ValueError, match=r"\[B\]"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[B\]"):
        thumbs_loss(torch.zeros(3, 1), torch.zeros(3, 1))


def test_not_registered_as_generator_losses():
    assert bradley_terry_loss not in LOSSES.values() and thumbs_loss not in LOSSES.values()
