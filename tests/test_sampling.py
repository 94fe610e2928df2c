"""Our decode loop's parts (rlmf/sampling.py): one draw per row is exactly softmax(logits / T), and the preallocated KV
layer holds what transformers' growing one holds through every operation the loop does. The loop against
model.generate: tests/test_generation.py."""

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from rlmf.sampling import PreallocatedLayer, draw, kv_cache


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_draw_is_the_softmax_at_the_temperature(temperature):
    logits = torch.tensor([2.0, 1.0, -float("inf"), 0.5, -1.0, 3.0, -1.5, -float("inf"), 0.0, 1.5])
    probs = torch.softmax(logits.double() / temperature, -1)
    n = 200_000
    torch.manual_seed(0)
    tokens = draw(logits.expand(n, -1), temperature)
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    assert counts[logits == -float("inf")].sum() == 0, "a token of probability 0 is never drawn"
    possible = probs > 0
    expected = probs[possible] * n
    assert expected.min() >= 5, "every bin the test reads expects at least 5 draws"
    assert chisquare(counts[possible].numpy(), expected.numpy()).pvalue > 1e-3


def test_draw_resolves_small_probabilities_and_is_seeded():
    """A token of probability 1e-3 beside one of almost 1 is drawn at its rate (float64 cumulative weights), and a
    seed gives the same draws, one random number per row."""
    logits = torch.tensor([0.0, -6.9077553, -30.0])  # probabilities ~0.999, ~1e-3, ~1e-13
    n = 400_000
    torch.manual_seed(1)
    tokens = draw(logits.expand(n, -1), 1.0)
    rare = float((tokens == 1).double().mean())
    p = float(torch.softmax(logits.double(), -1)[1])
    assert abs(rare - p) < 5 * (p / n) ** 0.5
    torch.manual_seed(1)
    assert torch.equal(draw(logits.expand(n, -1), 1.0), tokens)
    torch.manual_seed(1)
    draw(logits.expand(7, -1), 1.0)
    after_draw = torch.rand(1)
    torch.manual_seed(1)
    torch.rand(7, 1, dtype=torch.float64)
    assert torch.equal(torch.rand(1), after_draw), "a draw takes one float64 uniform per row from torch's RNG"


def test_preallocated_layer_holds_what_the_growing_layer_holds():
    """Prefill, decode steps, the prompt repeated per completion, rows leaving, and growth past the capacity: the
    keys and values read back are those of transformers' DynamicLayer after the same operations."""
    torch.manual_seed(0)
    ours, theirs = PreallocatedLayer(capacity=7), DynamicLayer()

    def update(rows, length):
        keys, values = torch.randn(rows, 2, length, 4), torch.randn(rows, 2, length, 3)
        for layer in (ours, theirs):
            out = layer.update(keys, values)
        torch.testing.assert_close(out, (ours.keys, ours.values), rtol=0, atol=0)
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert ours.get_seq_length() == theirs.get_seq_length()

    update(3, 5)
    for layer in (ours, theirs):
        layer.batch_repeat_interleave(2)
    update(6, 1)
    kept = torch.tensor([0, 2, 3, 5])
    for layer in (ours, theirs):
        layer.batch_select_indices(kept)
    for _ in range(4):  # 5 + 1 + 4 > 7: the buffer grows
        update(4, 1)
    assert ours.get_seq_length() == 10


def test_kv_cache_preallocates_full_attention_and_keeps_sliding_window_layers(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("gemma2"))  # a sliding-window and a full layer
    kinds = {type(layer) for layer in kv_cache(model, 32).layers}
    assert kinds == {PreallocatedLayer, DynamicSlidingWindowLayer}
