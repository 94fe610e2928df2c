"""The registry's contract: names, signatures, outputs, configs and docs agree for every registered loss."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlmf.losses import (
    LOSSES,
    LossResult,
    get_loss,
    loss_hyperparameters,
    loss_inputs,
    takes_entropies,
    takes_weights,
)

REPO = Path(__file__).resolve().parents[2]
ALGO_DIR = REPO / "conf" / "algo"
EXPECTED = {
    # name: (data format, needs reference, loss-specific metrics)
    "sft": ("sft", False, {"nll"}),
    "dpo": ("paired", True, set()),
    "cdpo": ("paired", True, set()),
    "robust": ("paired", True, set()),
    "hinge": ("paired", True, set()),
    "ipo": ("paired", True, set()),
    "nca_pair": ("paired", True, set()),
    "exo_pair": ("paired", True, set()),
    "bco_pair": ("paired", True, {"rewards/delta"}),
    "sppo_hard": ("paired", True, set()),
    "aot": ("paired", True, set()),
    "aot_unpaired": ("paired", True, set()),
    "discopop": ("paired", True, set()),
    "f_dpo": ("paired", True, set()),
    "ld_dpo": ("paired", True, set()),
    "wpo": ("paired", True, {"wpo/pair_weight"}),
    "sft_chosen": ("paired", False, {"nll"}),
    # MPO's parts by default; every metric under its part's name
    "mixture": ("paired", True, {"dpo/loss", "dpo/rewards/margins", "bco_pair/loss", "bco_pair/rewards/delta",
                                 "sft_chosen/loss", "sft_chosen/nll"}),
    "orpo": ("paired", False, {"log_odds_ratio", "nll"}),
    "simpo": ("paired", False, set()),
    "cpo": ("paired", False, {"nll"}),
    "kto": ("unpaired", True, {"kl"}),
    "apo_zero": ("paired", True, set()),
    "apo_down": ("paired", True, set()),
    "apo_zero_unpaired": ("unpaired", True, set()),
    "hypo": ("paired_online", True, {"kl"}),
    "grpo": ("online", True, {"kl", "clip_ratio/region_mean"}),
    "rloo": ("online", False, {"clip_ratio/region_mean"}),
    "ppo": ("online", False, {"loss/policy", "loss/value", "policy/clipfrac", "val/explained_variance"}),
    "online_dpo": ("online", True, {"rewards/chosen", "rewards/rejected", "rewards/margins", "pairs"}),
    "gspo": ("online", False, {"clip_ratio/region_mean", "clip_ratio/low_min"}),
    "cispo": ("online", False, {"cispo_clip_ratio"}),
    "reinforce_pp": ("online", False, {"clip_ratio/region_mean"}),
    "reinforce_pp_baseline": ("online", False, {"clip_ratio/region_mean"}),
    "remax": ("online", False, {"clip_ratio/region_mean"}),
}
REWARD_METRICS = {
    "sft": set(),
    "paired": {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"},
    "paired_online": {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"},
    "unpaired": {"rewards/chosen", "rewards/rejected", "rewards/margins"},
    "online": set(),
}
ALL_LOSSES = sorted(LOSSES)
# Losses whose own metrics are not the implicit rewards of their data format: SFT on paired data has none, and a
# mixture logs each part's under the part's name.
NO_REWARD_METRICS = {"sft_chosen", "mixture"}
# A loss made of other losses: it takes its parts' inputs by name (**inputs) and its parts as a mapping.
COMPOSITE = {"mixture"}
# conf/algo files that are another loss with settings beyond algo.loss (TR-DPO: DPO with a refreshed reference).
PRESETS = {"tr_dpo": ("dpo", {"reference_sync_steps", "reference_mixup_alpha"})}


def test_registered_names():
    assert set(LOSSES) == set(EXPECTED)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(KeyError) as err:
        get_loss("nope")
    message = str(err.value)
    assert "unknown loss 'nope'" in message
    for name in EXPECTED:
        assert name in message


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_registration_flags(name):
    data, reference, _ = EXPECTED[name]
    fn = get_loss(name)
    assert fn.loss_name == name
    assert fn.data_format == data
    assert fn.requires_reference is reference
    # The flag the trainer uses to skip the reference model must agree with what the loss actually asks for.
    assert any(i.startswith("reference_") for i in loss_inputs(name)) is reference


@pytest.mark.parametrize("name", [n for n in ALL_LOSSES if n not in COMPOSITE])
def test_signature_tensors_required_hyperparameters_defaulted(name):
    parameters = inspect.signature(get_loss(name)).parameters.values()
    kinds = {p.kind for p in parameters}
    assert kinds <= {inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY}
    for p in parameters:
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name in ("weights", "entropies"):
            assert p.default is None, f"{name}: {p.name} must be optional (None: unweighted, no entropy option)"
        elif p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            assert p.default is inspect.Parameter.empty, f"{name}: input {p.name} must not have a default"
        else:
            # numbers, a named variant (loss_type) or None for "filled in by the trainer"; never a bool flag
            assert isinstance(p.default, (int, float, str, type(None))) and not isinstance(p.default, bool), (
                name, p.name)
    inputs = loss_inputs(name)
    data = EXPECTED[name][0]
    if data in ("paired", "paired_online") and name == "sft_chosen":
        assert inputs == ("policy_chosen_logps", "chosen_lengths")
    elif data in ("paired", "paired_online"):  # summed log-probs, or per-token ones [B, T] (LD-DPO)
        assert inputs[:2] in (("policy_chosen_logps", "policy_rejected_logps"),
                              ("policy_chosen_token_logps", "policy_rejected_token_logps"))
    else:
        assert inputs[0] == "policy_logps"
    if data == "unpaired":
        assert "desirable" in inputs
    # every offline loss takes optional per-example weights, after its inputs; the online objectives do not
    assert takes_weights(name) is (data != "online")
    if takes_weights(name):
        names = list(inspect.signature(get_loss(name)).parameters)
        assert names[len(inputs)] == "weights" and "weights" not in inputs
    assert takes_entropies(name) <= (data == "online"), "per-token entropies are an online objective's option"
    # an online loss names the estimator that builds its targets, and only an online loss does
    assert (get_loss(name).targets is not None) is (data == "online")
    for key, allowed in get_loss(name).choices.items():
        assert loss_hyperparameters(name)[key] in allowed, f"{name}: the default {key} is not one of its choices"


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_docstring_gives_formula_paper_defaults_and_shapes(name):
    doc = inspect.getdoc(get_loss(name))
    assert re.search(r"^\s+loss(_i)? = ", doc, re.MULTILINE), f"{name}: docstring gives no 'loss = ...' formula"
    assert re.search(r"\b(19|20)\d\d\b", doc), f"{name}: docstring cites no paper year"
    assert "[B" in doc, f"{name}: docstring gives no tensor shapes"
    for key, default in loss_hyperparameters(name).items():
        assert key in doc, f"{name}: docstring does not mention hyperparameter {key}"
        assert str(default) in doc, f"{name}: docstring does not give the default {key}={default}"


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_result_contract(name, make_inputs):
    inputs = make_inputs(name, batch_size=5, seed=3)
    for value in inputs.values():
        if value.is_floating_point():
            value.requires_grad_()
    before = {k: v.detach().clone() for k, v in inputs.items()}
    result = get_loss(name)(**inputs)
    assert isinstance(result, LossResult)
    assert result.loss.dim() == 0 and result.loss.requires_grad
    data, _, specific = EXPECTED[name]
    assert (set() if name in NO_REWARD_METRICS else REWARD_METRICS[data]) | specific <= set(result.metrics)
    for metric, value in result.metrics.items():
        assert value.dim() == 0 and not value.requires_grad, metric
    # Pure: inputs untouched, and a second call gives the same numbers.
    for key, value in inputs.items():
        assert torch.equal(value.detach(), before[key]), f"{name} modified its input {key}"
    again = get_loss(name)(**inputs)
    assert torch.equal(again.loss, result.loss)


def test_losses_do_not_import_trl():
    for path in sorted((REPO / "rlmf" / "losses").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not any(m == "trl" or m.startswith("trl.") for m in modules), f"{path.name} imports trl"


# ------------------------------------------------------------------------------------------ conf/algo/*.yaml


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_algo_config_mirrors_the_function(name):
    path = ALGO_DIR / f"{name}.yaml"
    assert path.exists(), f"no {path.relative_to(REPO)} for registered loss {name!r}"
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and re.search(r"\b20\d\d\b", first_line), "first line must name the paper"
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert cfg["name"] == name
    allowed_keys = {"name", "reference", "loss"} | ({"online_samples"} if name == "hypo" else set())
    if get_loss(name).data_format == "online":
        allowed_keys |= {"online"}  # rollout and advantage settings (AlgoConfig.online)
    assert set(cfg) == allowed_keys
    assert cfg["loss"] == loss_hyperparameters(name), "loss: must list exactly the keyword-only defaults"
    if get_loss(name).requires_reference:
        assert cfg["reference"] in ("frozen", "precomputed", "lora")
    else:
        assert cfg["reference"] == "none"
    if name == "hypo":
        assert cfg["online_samples"] == 4
        assert cfg["reference"] != "precomputed"  # fresh samples need a live reference model


def test_no_algo_config_without_a_loss():
    assert {p.stem for p in ALGO_DIR.glob("*.yaml")} == set(LOSSES) | set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_algo_presets_are_a_loss_with_its_defaults_and_their_own_settings(preset):
    path = ALGO_DIR / f"{preset}.yaml"
    assert re.search(r"\b20\d\d\b", path.read_text().splitlines()[0]), "first line must name the paper"
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    name, settings = PRESETS[preset]
    assert cfg["name"] == name and cfg["loss"] == loss_hyperparameters(name)
    assert set(cfg) == {"name", "reference", "loss"} | settings


def test_the_mixture_takes_its_parts_inputs_and_its_default_is_mpo():
    parameters = inspect.signature(get_loss("mixture")).parameters
    assert [p.kind for p in parameters.values()] == [inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD]
    assert parameters["weights"].default is None and takes_weights("mixture")
    assert loss_hyperparameters("mixture")["parts"] == {"dpo": {"weight": 0.8, "beta": 0.1},
                                                       "bco_pair": {"weight": 0.2, "beta": 0.1},
                                                       "sft_chosen": {"weight": 1.0}}
    assert loss_inputs("mixture") == ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                                      "reference_rejected_logps", "chosen_lengths")
    reference_free = {"parts": {"simpo": {"weight": 1.0}, "sft_chosen": {"weight": 0.5}}}
    assert loss_inputs("mixture", reference_free) == ("policy_chosen_logps", "policy_rejected_logps",
                                                      "chosen_lengths", "rejected_lengths")


# -------------------------------------------------------------------------------------------- docs/losses.md


def test_docs_table_lists_every_loss_with_its_defaults():
    text = (REPO / "docs" / "losses.md").read_text()
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*`([a-z_]+)`\s*\|", line)
        if match:
            rows[match.group(1)] = line
    assert set(rows) == set(LOSSES)
    for name, row in rows.items():
        for key, default in loss_hyperparameters(name).items():
            assert f"{key}={default}" in row, f"docs/losses.md row for {name} lacks {key}={default}"
        for input_name in loss_inputs(name):
            assert input_name in row, f"docs/losses.md row for {name} lacks input {input_name}"


OFFLINE = [n for n in ALL_LOSSES if EXPECTED[n][0] != "online"]


@pytest.mark.parametrize("name", OFFLINE)
def test_weights_of_one_change_nothing_and_weights_are_a_weighted_mean(name, make_inputs):
    """Weights 1 give the unweighted loss exactly; integer weights equal repeating examples (duplicating row i
    w_i times), which is what a weighted mean means; a zero weight removes an example's gradient."""
    inputs = make_inputs(name, batch_size=4, seed=5)
    loss = get_loss(name)
    plain = loss(**inputs)
    ones = loss(**inputs, weights=torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(ones.loss, plain.loss, rtol=1e-12, atol=1e-12)
    if name == "hypo":  # its online KL term is per prompt, over samples that do not repeat with the pairs
        return
    counts = torch.tensor([2, 1, 0, 3])
    weighted = loss(**inputs, weights=counts.to(torch.float64))
    repeated = {k: (v.repeat_interleave(counts, dim=0) if k not in ("policy_kl_logps", "reference_kl_logps") else v)
                for k, v in inputs.items()}
    torch.testing.assert_close(weighted.loss, loss(**repeated).loss, rtol=1e-10, atol=1e-10)
    first = next(k for k, v in inputs.items() if v.is_floating_point())
    x = inputs[first].detach().clone().requires_grad_()
    loss(**{**inputs, first: x}, weights=counts.to(torch.float64)).loss.backward()
    assert x.grad[2].abs().sum() == 0 and x.grad[0].abs().sum() > 0


def test_bad_weights_are_refused(make_inputs):
    inputs = make_inputs("dpo", batch_size=3, seed=1)
    with pytest.raises(ValueError, match=r"weights must have shape \[B\] = \[3\]"):
        get_loss("dpo")(**inputs, weights=torch.ones(2))
    with pytest.raises(ValueError, match="finite and >= 0"):
        get_loss("dpo")(**inputs, weights=torch.tensor([1.0, -1.0, 1.0]))
