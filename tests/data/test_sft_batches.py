"""SFT batching: every row once per epoch, batches of similar length, a new order each epoch, ranks disjoint."""

import random

from rlmf.data.sft import LengthBucketBatchSampler


def _lengths(n=500, seed=0):
    rng = random.Random(seed)
    return [rng.randint(10, 200) for _ in range(n)]


def test_each_epoch_covers_every_row_once():
    lengths = _lengths()
    sampler = LengthBucketBatchSampler(lengths, batch_size=16, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert len(batches) == len(sampler)


def test_buckets_cut_padding_against_random_batches():
    lengths = _lengths()

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    bucketed = list(LengthBucketBatchSampler(lengths, batch_size=16, seed=0))
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    shuffled = [order[i:i + 16] for i in range(0, len(order), 16)]
    assert padding(bucketed) < 0.25 * padding(shuffled)


def test_epochs_differ_and_ranks_are_disjoint():
    lengths = _lengths()
    sampler = LengthBucketBatchSampler(lengths, batch_size=16, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    ranks = [list(LengthBucketBatchSampler(lengths, 16, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    seen = [{i for b in batches for i in b} for batches in ranks]
    assert not (seen[0] & seen[1]) and len(seen[0] | seen[1]) == len(lengths)
