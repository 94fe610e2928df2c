"""Config composition: every group option composes against its schema, typos fail early and clearly."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from rlmf.config import STAGES
from rlmf.errors import ConfigError
from rlmf.validate import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("task", "generator", "discriminator", "algo", "trainer", "logger", "stage", "experiment")
# Options that need a value the user must supply before they compose into a runnable config.
REQUIRED = {
    ("generator", "hf"): ["generator.name_or_path=/some/model"],
    ("discriminator", "hf"): ["discriminator.name_or_path=/some/model"],
    ("task", "preference_files"): ["task.train=/some/train.jsonl"],
}


def group_options():
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield group, path.stem


@pytest.mark.parametrize("group,option", list(group_options()))
def test_every_group_option_composes_and_validates(compose, group, option):
    cfg = compose(f"{group}={option}", *REQUIRED.get((group, option), []))
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    validate(cfg)


def test_every_group_has_options():
    for group in GROUPS:
        assert list((CONF / group).glob("*.yaml")), f"conf/{group} is empty"


def test_defaults(compose):
    cfg = compose()
    assert cfg.task.name == "persona_email"
    assert cfg.generator.kind == "tiny"
    assert cfg.discriminator.backbone == "minilm"
    assert cfg.algo.name == "dpo"
    assert cfg.logger.kind == "wandb"
    assert list(cfg.stage.stages) == list(STAGES)


def test_typo_in_a_key_names_the_key(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose("trainer.max_stepz=3")
    assert "max_stepz" in str(err.value.__cause__ or err.value)


def test_wrong_type_names_the_key(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose("generator.sft.lr=fast")
    text = str(err.value) + str(err.value.__cause__)
    assert "generator.sft.lr" in text or "lr" in text and "fast" in text


def test_unknown_option_lists_the_choices(compose):
    with pytest.raises(MissingConfigException) as err:
        compose("algo=dpoo")
    assert "dpo" in str(err.value) and "Available options" in str(err.value)


def test_semantic_errors_name_the_key_and_the_choices(compose, monkeypatch):
    with pytest.raises(ConfigError, match=r"algo.loss.gamma is not a hyperparameter of loss 'dpo'.*beta"):
        validate(compose("+algo.loss.gamma=1.0"))
    with pytest.raises(ConfigError, match=r"stage.stages='fly'.*sft"):
        validate(compose("stage.stages=[sft,fly]"))
    with pytest.raises(ConfigError, match=r"generator.logprob_backend='cuda'.*auto"):
        validate(compose("generator.logprob_backend=cuda"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=r"logprob_backend=triton needs a CUDA device"):
        validate(compose("generator.logprob_backend=triton", "trainer.accelerator=cpu"))
    with pytest.raises(ConfigError, match=r"generator.packing='packed'.*none.*padding_free.*shared_prompt"):
        validate(compose("generator.packing=packed"))
    with pytest.raises(ConfigError, match=r"generator.sampler='vllm'.*hf.*rlmf"):
        validate(compose("generator.sampler=vllm"))
    with pytest.raises(ConfigError, match=r"algo.optim.max_tokens=0 must be at least 1"):
        validate(compose("algo.optim.max_tokens=0"))
    with pytest.raises(ConfigError, match=r"algo.optim.max_tokens=512: grpo batches prompts"):
        validate(compose("algo=grpo", "algo.optim.max_tokens=512"))


@pytest.mark.parametrize("algo", ["grpo", "rloo", "online_dpo", "gspo", "cispo", "reinforce_pp_baseline"])
def test_online_algorithms_need_a_group_of_two(compose, algo):
    validate(compose(f"algo={algo}"))
    with pytest.raises(ConfigError, match=r"algo.online.num_generations=1 must be at least 2"):
        validate(compose(f"algo={algo}", "algo.online.num_generations=1"))
    with pytest.raises(ConfigError, match=r"algo.online.scale_rewards='mean'.*group"):
        validate(compose(f"algo={algo}", "algo.online.scale_rewards=mean"))
    with pytest.raises(ConfigError, match=r"algo.reference=precomputed does not apply"):
        validate(compose(f"algo={algo}", "algo.reference=precomputed"))
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches=2 does not apply"):
        validate(compose(f"algo={algo}", "trainer.accumulate_grad_batches=2"))


@pytest.mark.parametrize("overrides,message", [
    (["algo=ppo", "algo.online.num_generations=0"], r"num_generations=0 must be at least 1"),
    (["algo=ppo", "algo.online.kl_target=-1"], r"kl_target=-1.0, kl_horizon=10000.0 and kl_coef=0.05 must all be > 0"),
    (["algo=grpo", "algo.online.kl_target=6"],
     r"kl_target applies where the KL is in the reward \(ppo, reinforce_pp, reinforce_pp_baseline, remax, rloo\)"),
    (["algo=ppo", "algo.online.lam=1.5"], r"algo.online.lam=1.5 must lie in \[0, 1\]"),
    (["algo=ppo", "algo.online.drop_uniform_groups=true"], r"drop_uniform_groups applies to the group objectives"),
    (["algo=grpo", "algo.loss.loss_type=sapo"],
     r"algo.loss.loss_type='sapo' is not valid; choose one of: grpo, dapo, dr_grpo, bnpo"),
    (["algo=gspo", "algo.online.multi_objective_aggregation=average"],
     r"multi_objective_aggregation='average' is not valid; choose one of: sum_then_normalize, normalize_then_sum"),
    (["algo=rloo", "algo.online.multi_objective_aggregation=normalize_then_sum"],
     r"normalize_then_sum applies to the group-normalised objectives \(cispo, grpo, gspo\)"),
    (["algo=grpo", "algo.online.multi_objective_aggregation=normalize_then_sum", "algo.online.scale_rewards=batch"],
     r"with scale_rewards=group .* not grpo with scale_rewards=batch"),
    (["algo=reinforce_pp_baseline", "algo.online.num_generations=1"], r"num_generations=1 must be at least 2"),
    (["algo=online_dpo", "algo.loss.loss_type=hinge"], r"loss_type='hinge' is not valid; choose one of: sigmoid, ipo"),
    (["algo=online_dpo", "algo.online.minibatch_size=3"], r"minibatch_size=3 must be a multiple of .*num_generations=2"),
    (["algo=ppo", "algo.online.log_completions_every=-1"], r"log_completions_every=-1 must be >= 0"),
])
def test_bad_online_settings_fail_with_what_is_allowed(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(*overrides))


def test_ppo_allows_one_generation_per_prompt(compose):
    validate(compose("algo=ppo", "algo.online.num_generations=1", "algo.online.kl_target=6"))
    for algo in ("reinforce_pp", "remax"):  # no group either: a global or a greedy baseline
        validate(compose(f"algo={algo}", "algo.online.num_generations=1", "algo.online.kl_target=6"))


def test_the_new_online_options_compose_and_validate(compose):
    validate(compose("algo=grpo", "algo.loss.loss_type=bnpo", "algo.loss.delta=4", "algo.loss.top_entropy_quantile=0.2",
                     "algo.loss.entropy_coef=0.001", "algo.online.mask_truncated_completions=true",
                     "algo.online.multi_objective_aggregation=normalize_then_sum"))
    cfg = compose("algo=gspo")
    assert cfg.algo.loss.eps_low == 3e-4 and cfg.algo.loss.eps_high == 4e-4 and cfg.algo.reference == "none"
    assert compose("algo=cispo").algo.loss.eps_max == 5.0
    assert compose("algo=remax").algo.online.num_generations == 1


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rlmf.train", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_groups():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    for group in GROUPS:
        assert f"{group}:" in out.stdout, f"--help does not list group {group}"
    assert "rlmf-train" in out.stdout


def test_cfg_job_prints_the_composed_config():
    out = _cli("--cfg", "job", "algo=ipo")
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert printed.algo.name == "ipo" and printed.generator.kind == "tiny"


def test_cli_typo_fails_before_any_work():
    out = _cli("trainer.max_stepz=3")
    assert out.returncode != 0
    assert "max_stepz" in out.stderr


@pytest.mark.parametrize("preset,target", [("local_parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_presets_compose(compose, preset, target):
    cfg = compose(f"hydra/launcher={preset}", return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if preset == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 240


# Defaults that fit the generator: the tiny model's, or a pretrained checkpoint's (conf/generator/hf.yaml)

HF = ("generator=hf", "generator.name_or_path=/some/model")


@pytest.mark.parametrize("algo,family", [("dpo", "preference"), ("kto", "preference"), ("simpo", "preference"),
                                         ("grpo", "online"), ("ppo", "online"), ("sft", "sft")])
def test_algo_optim_takes_the_generators_default_for_its_family(compose, algo, family):
    from rlmf.losses import loss_family

    assert loss_family(algo) == family
    tiny = compose(f"algo={algo}")
    assert (tiny.algo.optim.lr, tiny.algo.optim.batch_size) == (1e-4, 8)  # the tiny model's values, as before
    hf = compose(f"algo={algo}", *HF)
    hf_yaml = OmegaConf.load(CONF / "generator" / "hf.yaml").optim_by_family[family]
    assert (hf.algo.optim.lr, hf.algo.optim.batch_size) == (hf_yaml.lr, hf_yaml.batch_size)
    assert hf.algo.optim.lr <= 2e-5  # a pretrained model is not trained at the tiny model's 1e-4


def test_pretrained_defaults_lengths_and_overrides(compose):
    cfg = compose(*HF)
    assert (cfg.generator.max_length, cfg.generator.max_prompt_length) == (1024, 512)
    assert cfg.generator.sft.lr == 2e-5
    assert compose(*HF, "algo.optim.lr=3e-6").algo.optim.lr == 3e-6  # an explicit value wins
    tiny = compose()
    assert (tiny.generator.max_length, tiny.generator.max_prompt_length, tiny.generator.sft.lr) == (192, 96, 3e-3)


def test_task_transcripts_is_checked(compose):
    cfg = compose("task=preference_files", "task.train=/some/train.jsonl", "task.transcripts=text")
    with pytest.raises(ConfigError, match="task.transcripts='text' is not valid; choose one of: chat, raw"):
        validate(cfg)


@pytest.mark.parametrize("overrides, message", [
    (("algo=grpo", "algo.loss.delta=1.1"), r"grpo: delta=1.1 must be > 1 \+ eps_high"),
    (("algo=grpo", "algo.loss.top_entropy_quantile=1.5"), "top_entropy_quantile"),
    (("algo=gspo", "algo.loss.eps_low=1.5"), "gspo: eps_low"),
    (("algo=cispo", "algo.loss.eps_max=-1"), "cispo: eps_max=-1"),
    (("algo=rloo", "algo.loss.eps_high=-0.1"), "rloo: eps_high=-0.1"),
    (("algo=remax", "algo.loss.eps_low=-0.2"), "remax: eps_low"),
])
def test_online_loss_values_fail_before_any_work(compose, overrides, message):
    """A clip, weight cap or entropy setting the online objective would refuse at its first update is refused by
    validate, before the SFT stage runs."""
    with pytest.raises(ConfigError, match=message):
        validate(compose("experiment=quick", *overrides))
