"""rlmf.rewards: every reward kind behind one interface, their invalid rows, ensembles, and config validation.

All models are tiny and local: a BERT sequence classifier saved here, a tiny discriminator, and the tiny causal-LM
checkpoints of tests/checkpoints.py as the judge.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlmf.placement import Placement
from rlmf.rewards import (ClassifierReward, EnsembleReward, FunctionReward, JudgeReward, RewardConfigError,
                          RewardResult, ScorerReward, build_reward, validate_reward_config)
from rlmf.rewards.functions import default_world, persona_email_gold
from rlmf.rewards.judge import PAIRWISE_TEMPLATE, POINTWISE_TEMPLATE, first_number
from rlmf.rewards.schema import KINDS, defaults
from rlmf.tasks.persona_email import build_world

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["Write to Dana about the audit.", "Reply to the invoice question.", "Thank Omar for the call."]
COMPLETIONS = ["Hi Dana, audits take weeks; we fix that.", "The invoice is attached.", "Thanks Omar!"]


# --- fixtures --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random BERT classifier with two named labels, saved with its (MiniLM WordPiece) tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rlmf.modules.discriminator import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        id2label={0: "hate", 1: "not hate"}, label2id={"hate": 0, "not hate": 1},
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("classifier")
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def discriminator_dir(tmp_path_factory):
    from rlmf.modules.discriminator import Discriminator

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("discriminator")
    Discriminator(backbone="tiny", max_length=64, tiny={"hidden_size": 32, "num_hidden_layers": 1,
                                                        "num_attention_heads": 2, "intermediate_size": 64,
                                                        "max_position_embeddings": 128}).save(directory)
    return directory


@pytest.fixture(scope="module")
def world():
    return build_world(seed=5, num_prospects=40, emails_per_prospect=2)


class StubScorer:
    """A discriminator-like scorer: fixed rewards, whatever the text."""

    def __init__(self, values):
        self.values = torch.tensor(values, dtype=torch.float32)
        self.calls = 0

    def score(self, prompts, completions, batch_size=None):
        self.calls += 1
        return self.values[: len(prompts)].clone()


def stub_judge(mode="pointwise", answer=None, **options):
    """A JudgeReward with no model whose answers come from ``answer(filled_template) -> str``."""
    judge = JudgeReward(mode=mode, model=object(), tokenizer=object(), **options)
    judge.seen = []

    def decode(texts):
        judge.seen += texts
        return [answer(t) for t in texts]

    judge._decode = decode
    return judge


# --- the interface ---------------------------------------------------------------------------------------------

def test_result_unpacks_and_score_is_nan_never_zero_for_invalid_rows():
    reward = FunctionReward(lambda p, c: [1.0, None, float("nan"), float("inf"), 0.0])
    result = reward.score_with_validity(["p"] * 5, ["c"] * 5)
    scores, valid = result
    assert isinstance(result, RewardResult) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert valid.tolist() == [True, False, False, False, True]
    assert scores[valid].tolist() == [1.0, 0.0] and torch.isnan(scores[~valid]).all()
    assert torch.equal(torch.isnan(reward.score(["p"] * 5, ["c"] * 5)), ~valid)
    assert result.metrics == {"rewards/function/mean": 0.5, "rewards/function/std": 0.5, "rewards/function/invalid": 3.0}
    assert (reward.rows_scored, reward.rows_invalid) == (10, 6)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward.score(["a", "b"], ["c"])
    assert reward.score([], []).shape == (0,)


# --- classifier ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("input", ["completion", "concat", "pair"])
def test_classifier_reward_is_the_named_labels_logit(classifier_dir, input):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = build_reward({"kind": "classifier", "name_or_path": str(classifier_dir), "label": "not hate",
                           "input": input, "batch_size": 2})
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    if input == "pair":
        encoding = tokenizer(PROMPTS, COMPLETIONS, padding=True, return_tensors="pt")
    else:
        texts = COMPLETIONS if input == "completion" else [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
        encoding = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoding).logits
    torch.testing.assert_close(reward.score(PROMPTS, COMPLETIONS), logits[:, 1], rtol=1e-5, atol=1e-5)
    assert reward.label_index == 1 and not reward.model.training

    probability = build_reward({"kind": "classifier", "name_or_path": str(classifier_dir), "label": "hate",
                                "input": input, "probability": True})
    torch.testing.assert_close(probability.score(PROMPTS, COMPLETIONS), logits.softmax(-1)[:, 0], rtol=1e-5,
                               atol=1e-5)


def test_classifier_runs_in_the_placement_and_cuts_long_inputs(classifier_dir):
    placement = Placement(device=torch.device("cpu"), dtype=torch.float64)
    reward = ClassifierReward(str(classifier_dir), "hate", input="concat", max_length=16, placement=placement)
    assert next(reward.model.parameters()).dtype == torch.float64
    long_prompt = "word " * 200
    scores = reward.score([long_prompt, PROMPTS[0]], ["the end", COMPLETIONS[0]])
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    # concat keeps the end of the text: the completion survives the cut
    assert reward.tokenizer.decode(reward.encode([long_prompt], ["the end"])["input_ids"][0]).endswith("the end [SEP]")


def test_classifier_unknown_label_lists_the_labels(classifier_dir):
    with pytest.raises(RewardConfigError, match=r"label='toxic'.*0: 'hate', 1: 'not hate'"):
        build_reward({"kind": "classifier", "name_or_path": str(classifier_dir), "label": "toxic"})


# --- discriminator ---------------------------------------------------------------------------------------------

def test_discriminator_reward_is_the_discriminators_score(discriminator_dir):
    from rlmf.modules.discriminator import Discriminator

    expected = Discriminator.load(discriminator_dir).score(PROMPTS, COMPLETIONS)
    reward = build_reward({"kind": "discriminator", "path": str(discriminator_dir)})
    torch.testing.assert_close(reward.score(PROMPTS, COMPLETIONS, batch_size=2), expected)
    # path null: the run's trained discriminator, given as context
    from_context = build_reward({"kind": "discriminator"}, discriminator_path=discriminator_dir)
    torch.testing.assert_close(from_context.score(PROMPTS, COMPLETIONS), expected)
    with pytest.raises(RewardConfigError, match="needs path"):
        build_reward({"kind": "discriminator"})
    with pytest.raises(RewardConfigError, match="discriminator.json"):
        build_reward({"kind": "discriminator", "path": str(discriminator_dir.parent)})


# --- judge: pointwise ------------------------------------------------------------------------------------------

def test_first_number():
    assert first_number("Score: 7/10") == 7.0
    assert first_number(" 9.5 stars") == 9.5
    assert first_number("-2") == -2.0
    assert first_number("eleven") is None and first_number("") is None


def test_pointwise_judge_parses_the_first_number_and_counts_invalid_rows():
    answers = {"a": "7", "b": "Score: 3/10", "c": "eleven", "d": "42", "e": " 9.5 stars", "f": ""}
    judge = stub_judge(answer=lambda text: answers[text.split("Reply:\n")[1][0]])
    result = judge.score_with_validity(["P"] * 6, list("abcdef"))
    assert result.valid.tolist() == [True, True, False, False, True, False]
    assert result.scores[result.valid].tolist() == [7.0, 3.0, 9.5]
    assert torch.isnan(result.scores[~result.valid]).all()
    assert result.metrics["rewards/judge/invalid"] == 3.0 and judge.rows_invalid == 3
    assert judge.last_answers == list(answers.values())
    assert judge.seen[0] == POINTWISE_TEMPLATE.format(prompt="P", completion="a", min_score=1.0, max_score=10.0)
    assert "from 1 to 10" in judge.seen[0]


def test_pointwise_judge_custom_template_and_range():
    judge = stub_judge(answer=lambda text: text.split("=")[1], template="{prompt}: {completion}={completion}",
                       min_score=0, max_score=1)
    assert judge.score(["x", "y", "z"], ["0.25", "1", "2"]).tolist()[:2] == [0.25, 1.0]
    assert judge.rows_invalid == 1


def test_judge_runs_end_to_end_with_a_real_tiny_model(tiny_checkpoint):
    judge = build_reward({"kind": "judge", "name_or_path": str(tiny_checkpoint("llama")), "max_new_tokens": 4,
                          "max_prompt_length": 64, "batch_size": 4, "template": "Rate {completion} for {prompt}:"})
    assert not judge.use_chat_template  # the tiny tokenizer has none
    rng_state = torch.get_rng_state()
    result = judge.score_with_validity(PROMPTS * 2, COMPLETIONS * 2)
    assert torch.equal(torch.get_rng_state(), rng_state), "greedy judging must not touch the global RNG"
    assert len(judge.last_answers) == 6 and all(isinstance(a, str) for a in judge.last_answers)
    parsed = [judge.parse_score(a) for a in judge.last_answers]
    assert result.valid.tolist() == [v is not None for v in parsed]
    assert result.metrics["rewards/judge/invalid"] == sum(v is None for v in parsed) == judge.rows_invalid
    assert torch.equal(torch.isnan(result.scores), ~result.valid)
    # greedy: the same answers again
    assert torch.equal(judge.score_with_validity(PROMPTS * 2, COMPLETIONS * 2).valid, result.valid)


# --- judge: pairwise -------------------------------------------------------------------------------------------

def test_pairwise_order_is_randomised_and_mapped_back():
    judge = stub_judge("pairwise", answer=lambda text: "1", seed=3)  # always prefers whatever is shown first
    n = 400
    details = judge.compare_with_details(["p"] * n, ["a"] * n, ["b"] * n)
    # position 1 shows a unless swapped: the mapped-back preference is exactly "not swapped"
    assert torch.equal(details.preference, (~details.swapped).float())
    assert 0.4 < details.preference.mean().item() < 0.6
    for text, swapped in zip(judge.seen, details.swapped.tolist()):
        assert text == PAIRWISE_TEMPLATE.format(prompt="p", first="b" if swapped else "a",
                                                second="a" if swapped else "b")
    # reproducible for a seed, different for another
    assert torch.equal(stub_judge("pairwise", lambda t: "1", seed=3).compare_with_details(
        ["p"] * n, ["a"] * n, ["b"] * n).swapped, details.swapped)
    assert not torch.equal(stub_judge("pairwise", lambda t: "1", seed=4).compare_with_details(
        ["p"] * n, ["a"] * n, ["b"] * n).swapped, details.swapped)


def test_pairwise_compare_follows_the_content_and_marks_bad_answers_nan():
    def longer(text):  # template "{prompt}|{first}|{second}": prefers the longer reply, shrugs at ties
        _, first, second = text.split("|")
        return "tie" if len(first) == len(second) else ("1" if len(first) > len(second) else "Reply 2")

    judge = stub_judge("pairwise", answer=longer, template="{prompt}|{first}|{second}")
    preference = judge.compare(["p"] * 40, ["long answer"] * 20 + ["x"] * 20, ["short"] * 20 + ["yy"] * 20)
    assert preference.tolist() == [1.0] * 20 + [0.0] * 20
    assert torch.isnan(judge.compare(["p"], ["same"], ["same"])).all()
    assert (judge.comparisons, judge.invalid_comparisons) == (41, 1)


def test_pairwise_reward_is_the_round_robin_win_rate_within_each_prompt():
    def longer(text):
        _, first, second = text.split("|")
        return "?" if len(first) == len(second) else ("1" if len(first) > len(second) else "2")

    judge = stub_judge("pairwise", answer=longer, template="{prompt}|{first}|{second}")
    prompts = ["p", "q", "p", "p", "r", "s", "s"]
    completions = ["aaa", "alone", "a", "aa", "alone too", "same", "same"]
    result = judge.score_with_validity(prompts, completions)
    assert result.scores[[0, 2, 3]].tolist() == [1.0, 0.0, 0.5]  # group p: 3 rows, 3 comparisons each way
    assert result.valid.tolist() == [True, False, True, True, False, False, False]  # alone / only an invalid comparison
    assert result.metrics["rewards/judge/comparisons"] == 4.0
    assert result.metrics["rewards/judge/invalid_comparisons"] == 1.0
    assert 0.0 <= result.metrics["rewards/judge/first_position_rate"] <= 1.0


def test_compare_needs_pairwise_mode():
    with pytest.raises(RuntimeError, match="mode=pairwise"):
        stub_judge(answer=lambda t: "1").compare(["p"], ["a"], ["b"])


# --- function --------------------------------------------------------------------------------------------------

def test_persona_email_gold_is_the_simulators_reply_probability(world):
    rows = world.demonstrations["train"][:6] + world.demonstrations["validation"][:2]
    prompts, emails = [p for p, _ in rows], [e for _, e in rows]
    expected = [world.simulator.reply_probability(world.brief_for(p).prospect, e) for p, e in rows]
    reward = build_reward({"kind": "function", "function": "rlmf.rewards.functions:persona_email_gold"}, world=world)
    torch.testing.assert_close(reward.score(prompts, emails), torch.tensor(expected, dtype=torch.float32))
    # without a world: the default-size world of the configured seed (cached)
    default = default_world(2)
    assert default is default_world(2)
    rows = default.demonstrations["train"][:3]
    by_seed = build_reward({"kind": "function", "function": "rlmf.rewards.functions:persona_email_gold",
                            "kwargs": {"seed": 2}})
    torch.testing.assert_close(by_seed.score([p for p, _ in rows], [e for _, e in rows]),
                               torch.tensor(persona_email_gold([p for p, _ in rows], [e for _, e in rows], world=default)))
    with pytest.raises(KeyError, match="not a brief of the world passed"):
        reward.score(["not a brief"], ["Hi"])


def test_function_context_goes_only_where_the_signature_takes_it():
    seen = {}

    def plain(prompts, completions):
        return [len(c) for c in completions]

    def wants_world(prompts, completions, *, world, scale=1.0):
        seen["world"] = world
        return [scale * len(c) for c in completions]

    assert build_reward({"kind": "function", "function": plain}, world="W").score(["p"], ["abc"]).tolist() == [3.0]
    reward = build_reward({"kind": "function", "function": wants_world, "kwargs": {"scale": 2}}, world="W")
    assert reward.score(["p"], ["abc"]).tolist() == [6.0] and seen["world"] == "W"
    with pytest.raises(RewardConfigError, match="cannot be called"):
        build_reward({"kind": "function", "function": wants_world})  # no world in the context
    with pytest.raises(RewardConfigError, match="cannot be called"):
        build_reward({"kind": "function", "function": plain, "kwargs": {"nope": 1}})


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("rlmf.rewards.functions:no_such_function", "has no 'no_such_function'"),
    ("rlmf.rewards.functions", "must name a callable as 'module:function'"),
    ("rlmf.rewards.functions:KINDS_NOT_HERE", "has no"),
])
def test_function_that_cannot_be_imported_is_a_clear_error(spec, message):
    with pytest.raises(RewardConfigError, match=message):
        build_reward({"kind": "function", "function": spec})


# --- ensemble --------------------------------------------------------------------------------------------------

def gold_and_scorer(world, **ensemble):
    rows = world.demonstrations["train"][:4]
    prompts, emails = [p for p, _ in rows], [e for _, e in rows]
    gold = torch.tensor(persona_email_gold(prompts, emails, world=world), dtype=torch.float32)
    scorer = StubScorer([2.0, -1.0, 0.5, 3.0])
    config = {"kind": "ensemble", "members": [
        {"kind": "function", "function": "rlmf.rewards.functions:persona_email_gold", "name": "gold"},
        scorer], **ensemble}
    return build_reward(config, world=world), prompts, emails, gold, scorer.values


def test_ensemble_sum_mean_and_weights(world):
    reward, prompts, emails, gold, disc = gold_and_scorer(world)
    torch.testing.assert_close(reward.score(prompts, emails), gold + disc)
    reward, *_ = gold_and_scorer(world, weights=[2.0, 0.5], combine="sum")
    torch.testing.assert_close(reward.score(prompts, emails), 2.0 * gold + 0.5 * disc)
    reward, *_ = gold_and_scorer(world, weights=[2.0, 0.5], combine="mean")
    torch.testing.assert_close(reward.score(prompts, emails), (2.0 * gold + 0.5 * disc) / 2.5)


def test_ensemble_zscore_and_member_metrics(world):
    reward, prompts, emails, gold, disc = gold_and_scorer(world, normalize="zscore", weights=[1.0, 3.0],
                                                          name="mix")
    z = lambda x: (x - x.mean()) / x.std(unbiased=False)
    result = reward.score_with_validity(prompts, emails)
    torch.testing.assert_close(result.scores, z(gold) + 3.0 * z(disc))
    m = result.metrics
    assert m["rewards/gold/mean"] == pytest.approx(gold.mean().item())
    assert m["rewards/gold/std"] == pytest.approx(gold.std(unbiased=False).item())
    assert m["rewards/scorer/mean"] == pytest.approx(disc.mean().item())
    assert m["rewards/scorer/std"] == pytest.approx(disc.std(unbiased=False).item())
    assert m["rewards/mix/mean"] == pytest.approx(result.scores.mean().item(), abs=1e-6)
    assert [member.name for member in reward.members] == ["gold", "scorer"]
    assert reward.last_metrics == m


def test_ensemble_row_invalid_for_any_member_is_invalid(world):
    flaky = FunctionReward(lambda p, c: [1.0, None, 3.0, 4.0], name="flaky")
    constant = ScorerReward(StubScorer([5.0, 5.0, 5.0, 7.0]))
    reward = EnsembleReward([flaky, constant], normalize="zscore")
    result = reward.score_with_validity(["p"] * 4, ["c"] * 4)
    assert result.valid.tolist() == [True, False, True, True]
    assert torch.isnan(result.scores[1]) and torch.isfinite(result.scores[result.valid]).all()
    assert result.metrics["rewards/ensemble/invalid"] == 1.0 and result.metrics["rewards/flaky/invalid"] == 1.0
    # z-stats over the ensemble's valid rows 0, 2, 3
    expected = lambda x: (x - x.mean()) / x.std(unbiased=False)
    torch.testing.assert_close(result.scores[result.valid],
                               expected(torch.tensor([1.0, 3.0, 4.0])) + expected(torch.tensor([5.0, 5.0, 7.0])))


def test_ensemble_names_repeated_members_apart_and_nests():
    inner = {"kind": "ensemble", "name": "inner", "members": [{"kind": "function", "function": lambda p, c: [1.0]}]}
    reward = build_reward({"kind": "ensemble", "members": [
        {"kind": "function", "function": lambda p, c: [2.0]}, {"kind": "function", "function": lambda p, c: [3.0]},
        inner]})
    assert [m.name for m in reward.members] == ["function_0", "function_1", "inner"]
    result = reward.score_with_validity(["p"], ["c"])
    assert result.scores.tolist() == [6.0]
    assert {"rewards/function_0/mean", "rewards/function_1/mean", "rewards/inner/mean", "rewards/function/mean",
            "rewards/ensemble/mean"} <= set(result.metrics)


# --- config validation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ({"kind": "classifier", "name_or_path": "x"}, r"reward: classifier reward needs label"),
    ({"kind": "classifier", "label": "ok"}, "needs name_or_path"),
    ({"kind": "classifier", "name_or_path": "x", "label": "ok", "input": "both"}, "input='both' is not one of"),
    ({"kind": "judge", "name_or_path": "x", "template": "Rate {completion}"}, r"missing \{prompt\}.*allowed.*"
                                                                             r"\{prompt\}, \{completion\}"),
    ({"kind": "judge", "name_or_path": "x", "mode": "pairwise", "template": "{prompt} {first} {completion}"},
     r"missing \{second\}; unknown \{completion\}"),
    ({"kind": "judge", "name_or_path": "x", "template": "{prompt} {completion} {"}, "not a valid str.format"),
    ({"kind": "judge", "name_or_path": "x", "mode": "listwise"}, "mode='listwise' is not one of pointwise"),
    ({"kind": "judge", "name_or_path": "x", "min_score": 5, "max_score": 5}, "must be below"),
    ({"kind": "judge", "name_or_path": "x", "max_new_tokens": 0}, "max_new_tokens=0 must be"),
    ({"kind": "judge", "name_or_path": "x", "torch_dtype": "float8"}, "torch_dtype='float8' is not one of"),
    ({"kind": "oracle"}, r"reward.kind='oracle' is not a reward kind; choose one of: discriminator, classifier, "
                         "judge, function, ensemble"),
    ({"function": "m:f"}, "kind=None is not a reward kind"),
    ({"kind": "function", "function": "rlmf.rewards.functions:persona_email_gold", "weights": [1]},
     "weights is not a key of a function reward; its keys: kind, name, function, kwargs"),
    ({"kind": "function"}, "needs function"),
    ({"kind": "ensemble", "members": []}, "needs at least one member"),
    ({"kind": "ensemble"}, "needs at least one member"),
    ({"kind": "ensemble", "members": [{"kind": "function", "function": "rlmf.rewards.functions:persona_email_gold"}],
      "weights": [1.0, 2.0]}, "weights has 2 values for 1 members"),
    ({"kind": "ensemble", "members": [{"kind": "function", "function": "rlmf.rewards.functions:persona_email_gold"}],
      "combine": "max"}, "combine='max' is not one of sum, mean"),
    ({"kind": "ensemble", "members": [{"kind": "function", "function": "rlmf.rewards.functions:persona_email_gold"}],
      "normalize": "rank"}, "normalize='rank' is not one of none, zscore"),
    ({"kind": "ensemble", "members": [{"kind": "function", "function": "rlmf.rewards.functions:persona_email_gold"}],
      "combine": "mean", "weights": [0.0]}, "sum of weights"),
    ({"kind": "ensemble", "members": [{"kind": "function", "function": "rlmf.rewards.functions:persona_email_gold"},
                                      {"kind": "classifier", "name_or_path": "x"}]},
     r"reward.members\[1\]: classifier reward needs label"),
    ("classifier", "must be a mapping with a kind"),
])
def test_invalid_configs_fail_with_what_is_allowed(config, message):
    with pytest.raises(RewardConfigError, match=message):
        build_reward(config)


def test_validation_loads_nothing_before_failing(monkeypatch):
    """A bad member anywhere fails before any model of the tree is loaded."""
    import rlmf.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(rlmf.models, "load_generator", no_loading)
    config = {"kind": "ensemble", "members": [{"kind": "judge", "name_or_path": "/nowhere"},
                                              {"kind": "ensemble", "members": []}]}
    with pytest.raises(RewardConfigError, match=r"members\[1\]: ensemble reward needs at least one member"):
        build_reward(config)


def test_dictconfig_and_missing_values():
    config = OmegaConf.create({"kind": "classifier", "name_or_path": "x", "label": "???"})
    with pytest.raises(RewardConfigError, match="needs label"):
        build_reward(config)
    spec = validate_reward_config(OmegaConf.create({"kind": "judge", "name_or_path": "x"}))
    assert spec == {**defaults("judge"), "name_or_path": "x"}


def test_schemas_are_the_constructors_options():
    """Every schema key reaches the reward (the yaml defaults are the code's)."""
    import inspect

    from rlmf.rewards.models import ClassifierReward as Classifier

    for kind, cls, skip in [("classifier", Classifier, {"kind"}), ("judge", JudgeReward, {"kind"})]:
        parameters = inspect.signature(cls.__init__).parameters
        assert set(defaults(kind)) - skip <= set(parameters), kind
        for key, value in defaults(kind).items():
            if key in parameters and parameters[key].default is not inspect.Parameter.empty:
                assert parameters[key].default == value, (kind, key)
    assert KINDS == ("discriminator", "classifier", "judge", "function", "ensemble")


@pytest.mark.skipif(not (REPO / "conf" / "reward").is_dir(), reason="conf/reward not added to the repo yet")
def test_every_reward_option_composes_and_validates(compose, discriminator_dir, tmp_path):
    options = sorted(p.stem for p in (REPO / "conf" / "reward").glob("*.yaml"))
    required = {"classifier": "name_or_path", "judge": "name_or_path", "judge_pairwise": "name_or_path"}
    for option in options:
        cfg = compose(f"reward={option}")
        if option in required:  # the model to ask must be named: a clear error before any work until it is
            with pytest.raises(RewardConfigError, match=required[option]):
                validate_reward_config(cfg.reward, static=True)
            continue
        validate_reward_config(cfg.reward, static=True)
        validate_reward_config(cfg.reward, discriminator_path=discriminator_dir, world=None)


def test_static_validation_needs_no_run():
    """At composition time there is no trained discriminator and no world yet: static checks skip only those."""
    validate_reward_config({"kind": "discriminator"}, static=True)
    validate_reward_config({"kind": "function", "function": "rlmf.rewards.functions:persona_email_gold",
                            "kwargs": {"seed": 1}}, static=True)
    with pytest.raises(RewardConfigError, match="cannot import"):
        validate_reward_config({"kind": "function", "function": "no_such_module_xyz:f"}, static=True)
    with pytest.raises(RewardConfigError, match="needs label"):
        validate_reward_config({"kind": "classifier", "name_or_path": "x"}, static=True)
