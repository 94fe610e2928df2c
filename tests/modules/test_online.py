"""The online algorithms: rollouts sample the policy and keep its log-probs; one OnlineGenerator step of every online
loss samples, scores, updates the parameters and logs TRL's metrics; completions the reward cannot score are counted;
the options (truncated completions, entropies, GDPO, ReMax's greedy baseline) reach the loss as defined."""

import math

import lightning as L
import pytest
import torch

from rlmf.data.collate import OnlinePromptCollator
from rlmf.data.formats import PromptOnly
from rlmf.data.loading import RowsDataModule
from rlmf.data.tokenization import tokenize_prompts
from rlmf.modules.rollouts import rollout
from rlmf.generation import SAMPLERS, stop_token_ids
from rlmf.logprobs import completion_token_logps
from rlmf.models import build_tiny_generator, train_tokenizer
from rlmf.modules.online import OnlineGenerator
from rlmf.modules.targets import ONLINE, TARGETS, Scored
from rlmf.reference import frozen_copy
from rlmf.rewards import RewardResult
from rlmf.tasks.persona_email import build_world, corpus_texts


@pytest.fixture(scope="module")
def setup():
    world = build_world(seed=0, num_prospects=40)
    tokenizer = train_tokenizer(corpus_texts(world), vocab_size=300)
    prompts = [b.prompt for b in world.train[:4]]
    return tokenizer, prompts


def tiny_model(tokenizer):
    return build_tiny_generator(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                max_position_embeddings=320, seed=0)


def prompt_rows(tokenizer, prompts):
    features = tokenize_prompts([PromptOnly(p) for p in prompts], tokenizer, 96)
    return [{**f, "prompt": p} for f, p in zip(features, prompts)]


def length_reward(prompts, completions):
    """A stub reward: the completion's length in characters."""
    scores = torch.tensor([float(len(c)) for c in completions])
    return RewardResult(scores, torch.ones(len(completions), dtype=torch.bool), {"rewards/length/mean": 1.0})


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_rollout_rows_and_old_logps(setup, sampler):
    tokenizer, prompts = setup
    model = tiny_model(tokenizer)
    batch = OnlinePromptCollator(tokenizer.pad_token_id)(prompt_rows(tokenizer, prompts[:2]))
    torch.manual_seed(0)
    rows = rollout(model, tokenizer, batch["prompt_ids"], batch["prompt_mask"], num_generations=3, temperature=0.7,
                   max_new_tokens=12, stop_ids=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                   sampler=sampler)
    n, width = rows.input_ids.shape
    assert n == 6 and rows.attention_mask.shape == rows.labels.shape == (n, width)
    assert rows.old_logps.shape == rows.mask.shape == (n, width - 1) and not rows.old_logps.requires_grad
    assert len(rows.texts) == n and rows.lengths.shape == rows.clipped.shape == (n,)
    assert torch.equal(rows.mask.sum(-1), rows.lengths)
    assert bool((rows.lengths <= 12).all())
    expected, mask = completion_token_logps(model, rows.input_ids, rows.attention_mask, rows.labels, temperature=0.7)
    assert torch.equal(mask, rows.mask)
    torch.testing.assert_close(rows.old_logps, expected.detach())
    # The prompt part is the prompt repeated per generation, left-padded.
    assert torch.equal(rows.input_ids[:3, : batch["prompt_ids"].shape[1]], batch["prompt_ids"][:1].expand(3, -1))


def _fit(tokenizer, prompts, name, reward, tmp_path, **kwargs):
    model = tiny_model(tokenizer)
    reference = frozen_copy(model)
    module = OnlineGenerator(model, tokenizer, reward, loss_name=name, reference=reference, num_generations=3,
                             max_new_tokens=10, lr=1e-2, stop_token_ids=stop_token_ids(model, tokenizer),
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
    logged = {}
    original = module.log
    module.log = lambda key, value, *a, **k: (logged.__setitem__(key, value), original(key, value, *a, **k))
    before = [p.detach().clone() for p in model.parameters()]
    data = RowsDataModule(prompt_rows(tokenizer, prompts), [], OnlinePromptCollator(tokenizer.pad_token_id),
                          batch_size=2)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                        accelerator="cpu")
    trainer.fit(module, datamodule=data)
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    return module, trainer, logged, changed


OBJECTIVE_METRICS = {
    "grpo": ("kl", "clip_ratio/region_mean"),
    "rloo": ("clip_ratio/region_mean", "objective/non_score_reward", "objective/rlhf_reward"),
    "ppo": ("loss/value", "policy/clipfrac", "policy/approxkl", "val/explained_variance",
            "objective/non_score_reward", "objective/rlhf_reward"),
    "online_dpo": ("rewards/chosen", "rewards/margins", "pairs"),
    "gspo": ("clip_ratio/region_mean",),
    "cispo": ("cispo_clip_ratio",),
    "reinforce_pp": ("clip_ratio/region_mean", "objective/non_score_reward", "objective/rlhf_reward"),
    "reinforce_pp_baseline": ("clip_ratio/region_mean", "objective/non_score_reward", "objective/rlhf_reward"),
    "remax": ("clip_ratio/region_mean", "greedy_reward", "objective/non_score_reward", "objective/rlhf_reward"),
}


def test_every_online_loss_has_a_smoke_test():
    assert set(OBJECTIVE_METRICS) == set(ONLINE)


@pytest.mark.parametrize("name", sorted(OBJECTIVE_METRICS))
def test_one_training_step_updates_the_policy_and_logs_trl_metrics(setup, name, tmp_path):
    tokenizer, prompts = setup
    module, trainer, logged, changed = _fit(tokenizer, prompts, name, length_reward, tmp_path,
                                            num_iterations=2, minibatch_size=3)
    assert changed, "no parameter moved"
    # global_step counts optimiser steps: one rollout of 2 x 3 rows gives 2 iterations x 2 minibatches of 3; the
    # trainer checks max_steps=2 between training steps (the pipeline makes max_steps a multiple of this).
    assert trainer.global_step == 4
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                "completions/clipped_ratio", "loss/policy", "invalid_rewards", "rewards/length/mean",
                "objective/kl", "objective/entropy", "perf/generation_tokens_per_s", "perf/training_tokens_per_s",
                *OBJECTIVE_METRICS[name]):
        assert f"align/train/{key}" in logged, key
        assert torch.isfinite(torch.as_tensor(logged[f"align/train/{key}"])), key
    assert float(logged["align/train/invalid_rewards"]) == 0
    # Checkpoints hold the policy, the KL coefficient and (PPO) the value head, never the reference.
    expected = {f"model.{k}" for k in module.model.state_dict()} | {"kl_coef"}
    if name == "ppo":
        expected |= {"value_head.linear.weight", "value_head.linear.bias"}
        assert module.value_head.linear.weight.abs().sum() > 0, "the value head did not learn"
    assert module.state_dict().keys() == expected


def test_invalid_rewards_are_counted_and_get_no_advantage(setup, tmp_path):
    tokenizer, prompts = setup

    def half_invalid(p, c):
        scores = torch.tensor([float(len(x)) for x in c])
        valid = torch.arange(len(c)) % 2 == 0
        return RewardResult(torch.where(valid, scores, torch.full_like(scores, float("nan"))), valid, {})

    module, _, logged, _ = _fit(tokenizer, prompts, "grpo", half_invalid, tmp_path)
    assert float(logged["align/train/invalid_rewards"]) == 3  # 2 prompts x 3 generations, every other one invalid

    scores = torch.tensor([1.0, 5.0, 3.0, 2.0, 2.0, 9.0])
    valid = torch.tensor([True, False, True, True, True, False])
    filled, _ = module._reward_stats(torch.where(valid, scores, torch.full((), float("nan"))), valid)
    assert filled.tolist() == [1.0, 2.0, 3.0, 2.0, 2.0, 2.0]  # invalid rows take their group's valid mean
    targets, _ = TARGETS["grpo"](Scored(None, filled, valid, None, 3, 0.0), module.hparams)
    assert torch.equal(targets["advantages"][~valid], torch.zeros(2))
    assert targets["advantages"][0] < 0 < targets["advantages"][2]


def test_fewer_than_two_generations_is_refused(setup):
    tokenizer, _ = setup
    with pytest.raises(ValueError, match="num_generations=1"):
        OnlineGenerator(tiny_model(tokenizer), tokenizer, length_reward, loss_name="rloo", kl_coef=0.0,
                        num_generations=1)


def test_resume_position_counts_rollouts_not_optimiser_steps():
    """A resumed online fit continues with the next batch: global_step counts optimiser steps, several per batch."""
    from types import SimpleNamespace

    from rlmf.data.loading import training_progress

    trainer = SimpleNamespace(accumulate_grad_batches=1, global_step=8)
    assert training_progress(trainer, steps_per_batch=4)(lambda epoch: 3) == (0, 2)
    trainer.global_step = 16
    assert training_progress(trainer, steps_per_batch=4)(lambda epoch: 3) == (1, 1)
    assert training_progress(trainer)(lambda epoch: 3) == (5, 1)


@pytest.mark.parametrize("name", ["grpo", "online_dpo", "gspo"])
def test_a_single_on_policy_update_skips_the_scoring_forward_and_changes_nothing(setup, tmp_path, monkeypatch, name):
    """GRPO, GSPO (CISPO alike) and online DPO with one update of the whole rollout take the sampling log-probs from
    the update's own forward (the parameters are those that sampled): the same parameters after training as with the
    scoring pass."""
    tokenizer, prompts = setup
    results = {}
    for skip in (True, False):
        if not skip:
            monkeypatch.setattr(OnlineGenerator, "single_on_policy_update", property(lambda self: False))
        calls = []
        monkeypatch.setattr("rlmf.modules.rollouts.completion_token_logps",
                            lambda *a, **k: calls.append(1) or completion_token_logps(*a, **k))
        torch.manual_seed(0)
        module, _, logged, _ = _fit(tokenizer, prompts, name, length_reward, tmp_path / str(skip))
        assert len(calls) == (0 if skip else 2), "one scoring forward per rollout, none when skipped"
        results[skip] = ([p.detach() for p in module.model.parameters()], logged)
    for a, b in zip(results[True][0], results[False][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in ("objective/kl", "objective/entropy"):
        torch.testing.assert_close(torch.as_tensor(results[True][1][f"align/train/{key}"]),
                                   torch.as_tensor(results[False][1][f"align/train/{key}"]), rtol=1e-5, atol=1e-6)


def test_completions_table_goes_to_loggers_that_take_tables(setup, tmp_path):
    from lightning.pytorch.loggers.logger import DummyLogger

    class TableLogger(DummyLogger):
        def __init__(self):
            super().__init__()
            self.tables = []

        def log_table(self, key, columns, data):
            self.tables.append((key, columns, data))

    tokenizer, prompts = setup
    model = tiny_model(tokenizer)
    logger = TableLogger()
    module = OnlineGenerator(model, tokenizer, length_reward, loss_name="rloo", kl_coef=0.0, num_generations=2,
                             max_new_tokens=6, stop_token_ids=stop_token_ids(model, tokenizer),
                             pad_token_id=tokenizer.pad_token_id, log_completions_every=2)
    data = RowsDataModule(prompt_rows(tokenizer, prompts), [], OnlinePromptCollator(tokenizer.pad_token_id),
                          batch_size=1)
    trainer = L.Trainer(max_steps=3, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                        accelerator="cpu")
    trainer.fit(module, datamodule=data)
    assert [len(data) for _, _, data in logger.tables] == [2, 2], "batches 0 and 2 of 3, two completions each"
    key, columns, rows = logger.tables[0]
    assert key == "align/completions" and columns == ["step", "prompt", "completion", "reward"]
    assert rows[0][1] in prompts and rows[0][3] == float(len(rows[0][2]))


# ------------------------------------------------------------------------------------------- the new options


def _fit_spied(tokenizer, prompts, name, reward, tmp_path, max_steps=1, edit_rows=None, **kwargs):
    """One rollout of ``name`` (``edit_rows`` may change it before it is used); returns the module, the rollout and
    the keyword inputs of every loss call."""
    model = tiny_model(tokenizer)
    module = OnlineGenerator(model, tokenizer, reward, loss_name=name, reference=frozen_copy(model), num_generations=3,
                             max_new_tokens=kwargs.pop("max_new_tokens", 10), lr=1e-2,
                             stop_token_ids=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                             **kwargs)
    calls, rollouts = [], []
    loss_fn, rollout_fn = module.loss_fn, module._rollout
    module.loss_fn = lambda **inputs: calls.append(inputs) or loss_fn(**inputs)
    edit = edit_rows or (lambda rows: rows)
    module._rollout = lambda batch: rollouts.append(edit(rollout_fn(batch))) or rollouts[-1]
    data = RowsDataModule(prompt_rows(tokenizer, prompts), [], OnlinePromptCollator(tokenizer.pad_token_id),
                          batch_size=2)
    L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
              accelerator="cpu").fit(module, datamodule=data)
    return module, rollouts[0], calls


def test_truncated_completions_get_no_loss_but_keep_their_advantage(setup, tmp_path):
    tokenizer, prompts = setup

    def some_truncated(rows):  # the tiny model rarely stops: say that every other completion did
        rows.clipped = torch.arange(len(rows.texts)) % 2 == 0
        return rows

    _, rows, calls = _fit_spied(tokenizer, prompts, "grpo", length_reward, tmp_path, edit_rows=some_truncated,
                                mask_truncated_completions=True)
    mask = calls[0]["mask"]
    assert not mask[rows.clipped].any()
    assert torch.equal(mask[~rows.clipped], rows.mask[~rows.clipped])
    assert (calls[0]["advantages"][rows.clipped] != 0).any()  # still in the group statistics (as TRL)


def test_entropy_options_get_the_policys_exact_entropies(setup, tmp_path):
    tokenizer, prompts = setup
    module, rows, calls = _fit_spied(tokenizer, prompts, "grpo", length_reward, tmp_path,
                                     loss_kwargs={"top_entropy_quantile": 0.5, "entropy_coef": 0.01})
    assert module.computes_entropies
    entropies = calls[0]["entropies"]
    assert entropies.shape == rows.mask.shape and entropies.requires_grad
    assert (entropies[rows.mask] > 0).all() and (entropies[~rows.mask] == 0).all()
    plain, _, plain_calls = _fit_spied(tokenizer, prompts, "grpo", length_reward, tmp_path)
    assert not plain.computes_entropies and "entropies" not in plain_calls[0]


def test_gdpo_normalises_each_reward_of_an_ensemble(setup, tmp_path):
    from rlmf.losses.advantages import decoupled_group_advantages
    from rlmf.rewards import EnsembleReward, FunctionReward

    tokenizer, prompts = setup
    length = FunctionReward(lambda prompts, completions: [float(len(c)) for c in completions], name="length")
    vowels = FunctionReward(lambda prompts, completions: [float(sum(c.count(v) for v in "aeiou") % 2)
                                                          for c in completions], name="vowels")
    reward = EnsembleReward([length, vowels], weights=[1.0, 3.0])
    _, rows, calls = _fit_spied(tokenizer, prompts, "gspo", reward.score_with_validity, tmp_path,
                                multi_objective_aggregation="normalize_then_sum")
    members = torch.stack([length.score(["p"] * len(rows.texts), rows.texts),
                           vowels.score(["p"] * len(rows.texts), rows.texts)], dim=1)
    expected = decoupled_group_advantages(members, torch.tensor([1.0, 3.0]), 3)
    torch.testing.assert_close(calls[0]["advantages"], expected)
    with pytest.raises(ValueError, match="normalize_then_sum only for cispo, grpo, gspo"):
        OnlineGenerator(tiny_model(tokenizer), tokenizer, reward, loss_name="rloo", kl_coef=0.0,
                        multi_objective_aggregation="normalize_then_sum")


def test_remax_subtracts_the_reward_of_each_prompts_greedy_completion(setup, tmp_path):
    tokenizer, prompts = setup
    torch.manual_seed(0)
    module, rows, calls = _fit_spied(tokenizer, prompts, "remax", length_reward, tmp_path, kl_coef=0.0)
    assert len(rows.greedy_texts) == 2
    greedy = torch.tensor([float(len(t)) for t in rows.greedy_texts]).repeat_interleave(3)
    scores = torch.tensor([float(len(t)) for t in rows.texts])
    # No KL: every completion token's advantage is its reward minus its prompt's greedy reward.
    expected = torch.where(rows.mask, (scores - greedy)[:, None], torch.zeros(()))
    torch.testing.assert_close(calls[0]["advantages"], expected.to(calls[0]["advantages"].dtype))
    # The greedy decode draws no random numbers: the samples are those of a rollout without it.
    batch = OnlinePromptCollator(tokenizer.pad_token_id)(prompt_rows(tokenizer, prompts[:2]))
    model = tiny_model(tokenizer)
    drawn = []
    for greedy_too in (False, True):
        torch.manual_seed(1)
        out = rollout(model, tokenizer, batch["prompt_ids"], batch["prompt_mask"], num_generations=2,
                      temperature=1.0, max_new_tokens=6, stop_ids=stop_token_ids(model, tokenizer),
                      pad_token_id=tokenizer.pad_token_id, greedy=greedy_too)
        drawn.append((out.texts, torch.rand(1)))
    assert drawn[0][0] == drawn[1][0] and torch.equal(drawn[0][1], drawn[1][1])


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_targets_follow_the_paper(baseline):
    """REINFORCE++'s targets from a scored rollout against the formula: per-token k1 penalty plus the score at the
    last token (scores centred per group first for the baseline variant), returns-to-go, whitened over the batch;
    an invalid row takes no part."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    mask = torch.arange(5) < torch.tensor([5, 2, 4, 3, 1, 5])[:, None]
    old = -torch.rand(mask.shape, generator=g, dtype=torch.float64)
    reference = old + 0.2 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    scores = torch.randn(6, generator=g, dtype=torch.float64)
    valid = torch.tensor([True, True, True, True, False, True])
    rows = SimpleNamespace(mask=mask, old_logps=old)
    hparams = SimpleNamespace(gamma=1.0)
    name = "reinforce_pp_baseline" if baseline else "reinforce_pp"
    targets, stats = TARGETS[name](Scored(rows, scores, valid, reference, 3, 0.1), hparams)
    used = (scores.view(2, 3) - scores.view(2, 3).mean(1, keepdim=True)).view(-1) if baseline else scores
    keep = mask & valid[:, None]
    returns = {}
    for i in range(6):
        tokens = [t for t in range(5) if keep[i, t]]
        rewards = [-0.1 * (old[i, t] - reference[i, t]).item() for t in tokens]
        if tokens:
            rewards[-1] += used[i].item()
        for j, t in enumerate(tokens):
            returns[i, t] = sum(rewards[j:])
    mean = sum(returns.values()) / len(returns)
    std = math.sqrt(sum((r - mean) ** 2 for r in returns.values()) / (len(returns) - 1) + 1e-8)
    expected = torch.zeros(mask.shape, dtype=torch.float64)
    for (i, t), value in returns.items():
        expected[i, t] = (value - mean) / std
    torch.testing.assert_close(targets["advantages"], expected, atol=1e-10, rtol=1e-10)
    assert torch.equal(targets["mask"], keep) and "objective/non_score_reward" in stats


def test_dr_grpo_from_a_config_gets_the_generation_limit(setup):
    """``conf/algo/grpo.yaml`` passes ``max_completion_length: null``: the trainer fills in its generation limit."""
    tokenizer, _ = setup
    module = OnlineGenerator(tiny_model(tokenizer), tokenizer, length_reward, loss_name="grpo", max_new_tokens=12,
                             reference=frozen_copy(tiny_model(tokenizer)),
                             loss_kwargs={"loss_type": "dr_grpo", "max_completion_length": None})
    assert module.loss_kwargs["max_completion_length"] == 12
