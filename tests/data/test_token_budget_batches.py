"""Token-budget batches (``max_tokens``): as many rows as fit in the budget, each row once per epoch, the same
number of batches on every rank, and a resumed run continues with the very next batch although epochs differ in
length."""

import random
from types import SimpleNamespace

import pytest

from rlmf.data.alignment import AlignmentDataModule, packed_tokens
from rlmf.data.loading import EpochBatchSampler, training_progress

_rng = random.Random(0)
LENGTHS = [_rng.randint(20, 200) for _ in range(300)]


def test_batches_fit_the_budget_and_cover_every_row_once():
    sampler = EpochBatchSampler(len(LENGTHS), batch_size=8, seed=1, lengths=LENGTHS, max_tokens=600)
    batches = sampler.epoch_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in b) <= 600 for b in batches)
    assert len({len(b) for b in batches}) > 1  # a row count follows the lengths, it is not fixed
    # bucketing keeps the budget full: on average well over half of it is used
    assert sum(LENGTHS) / len(batches) > 0.8 * 600
    assert sampler.epoch_batches(0) == batches and sampler.epoch_batches(1) != batches


def test_a_row_longer_than_the_budget_is_a_batch_of_its_own():
    sampler = EpochBatchSampler(3, batch_size=2, lengths=[50, 500, 60], max_tokens=100, shuffle=False)
    assert sampler.epoch_batches(0) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="max_tokens"):
        EpochBatchSampler(3, batch_size=2, max_tokens=100)


def test_ranks_get_as_many_disjoint_batches():
    ranks = [EpochBatchSampler(len(LENGTHS), 8, seed=3, lengths=LENGTHS, max_tokens=500, rank=r, world_size=2)
             for r in range(2)]
    mine = [r.epoch_batches(2) for r in ranks]
    assert len(mine[0]) == len(mine[1])
    assert not {i for b in mine[0] for i in b} & {i for b in mine[1] for i in b}


def test_resume_finds_the_next_batch_across_epochs_of_different_lengths():
    sampler = EpochBatchSampler(len(LENGTHS), 8, seed=5, lengths=LENGTHS, max_tokens=700)
    counts = [len(sampler.epoch_batches(e)) for e in range(3)]
    assert len(set(counts)) > 1, "the test needs epochs of different lengths"
    uninterrupted = [b for e in range(3) for b in sampler.epoch_batches(e)]
    for done in (0, counts[0] - 1, counts[0], counts[0] + counts[1] + 2):
        trainer = SimpleNamespace(global_step=done, accumulate_grad_batches=1)
        resumed = EpochBatchSampler(len(LENGTHS), 8, seed=5, lengths=LENGTHS, max_tokens=700,
                                    progress=training_progress(trainer))
        assert next(iter(resumed)) == uninterrupted[done]


def test_alignment_batches_count_a_pairs_prompt_once():
    features = [{"prompt_ids": [1] * p, "chosen_ids": [2] * c, "rejected_ids": [3] * r}
                for p, c, r in [(30, 10, 20), (5, 5, 5), (40, 30, 30), (10, 10, 10)] * 5]
    assert packed_tokens(features[0]) == 60
    data = AlignmentDataModule(features, [], "paired", pad_token_id=0, max_length=200, batch_size=2, max_tokens=130)
    batches = list(data.train_dataloader())
    assert sum(b["chosen_lengths"].shape[0] for b in batches) == len(features)
    for b in batches:
        tokens = (b["prompt_lengths"] + b["chosen_lengths"] + b["rejected_lengths"]).sum()
        assert tokens <= 130 or b["chosen_lengths"].shape[0] == 1
    assert data.batches_per_epoch() == len(batches)
