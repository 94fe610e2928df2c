"""The paper ablations (conf/experiment/<name>.yaml): every job of every grid composes and validates, and the
machinery they rely on: the stage cache's keys, the data conditions (KTO's dropped desirable rows, APO's chosen
rank) and the evaluation's standard error. Composition only: no training here (docs/results.md has real runs)."""

import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlmf.errors import ConfigError

from rlmf.validate import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
ABLATIONS = ("dpo_beta", "hypo_vs_dpo", "kto_imbalance", "apo_anchor", "overoptimization", "rlhf_rlaif_dpo",
             "lora_vs_full", "algorithms")


def sweep_jobs(compose, experiment):
    """The grid ``rlmf-train -m experiment=<name>`` runs, as lists of overrides (the sweeper's cartesian product)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = compose(f"experiment={experiment}", return_hydra_config=True).hydra.sweeper.params
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return list(params), BasicSweeper.split_arguments(overrides, None)[0]


def test_every_ablation_has_a_config():
    assert {p.stem for p in (CONF / "experiment").glob("*.yaml")} >= set(ABLATIONS)


def test_ablations_run_two_jobs_at_a_time_unless_told_otherwise(compose):
    """The one command of each ablation runs in parallel (its measured time assumes it); the command line wins."""
    launcher = compose("experiment=algorithms", return_hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2
    basic = compose("experiment=algorithms", "hydra/launcher=basic", return_hydra_config=True).hydra.launcher
    assert basic._target_.endswith("BasicLauncher")
    assert compose("algo=dpo", return_hydra_config=True).hydra.launcher._target_.endswith("BasicLauncher")


@pytest.mark.parametrize("experiment", ABLATIONS)
def test_every_job_of_the_grid_composes_and_validates(compose, experiment):
    keys, jobs = sweep_jobs(compose, experiment)
    assert keys[-1] == "seed", "seed varies fastest, so parallel workers start on different seeds' shared stages"
    assert len({o for job in jobs for o in job if o.startswith("seed=")}) >= 3, "at least 3 seeds"
    for job in (j for j in jobs if j[-1] == jobs[0][-1]):  # one seed: the others differ only in seed
        cfg = compose(f"experiment={experiment}", *job)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        validate(cfg)
        assert cfg.stage.cache_dir == "shared_stages"
        assert cfg.task.eval_prompts >= 48


def test_arms_set_what_they_say(compose):
    cfg = compose("experiment=dpo_beta", "+arm/dpo_beta=dpo_0.3")
    assert (cfg.algo.name, cfg.algo.loss.beta) == ("dpo", 0.3)
    assert compose("experiment=dpo_beta", "+arm/dpo_beta=grpo").algo.name == "grpo"
    hypo = compose("experiment=hypo_vs_dpo", "+arm/hypo_vs_dpo=hypo_kl0.1")
    assert (hypo.algo.name, hypo.algo.loss.kl_weight, hypo.algo.online_samples) == ("hypo", 0.1, 2)
    lora = compose("experiment=lora_vs_full", "+arm/lora_vs_full=lora_r16")
    assert (lora.algo.reference, lora.algo.lora_rank, lora.algo.optim.lr) == ("lora", 16, 1e-3)
    assert compose("experiment=rlhf_rlaif_dpo", "+arm/rlhf_rlaif_dpo=dpo_direct").feedback.pairs == "ab"
    judge = compose("experiment=rlhf_rlaif_dpo", "+arm/rlhf_rlaif_dpo=rlaif", "reward.name_or_path=/some/judge")
    assert (judge.algo.name, judge.reward.kind) == ("grpo", "judge")
    assert compose("experiment=apo_anchor", "feedback.chosen_rank=3").reward.kind == "function"


@pytest.mark.parametrize("drop,weight", [(0.0, 1.0), (0.5, 2.0), (0.9, 10.0)])
def test_kto_desirable_weight_balances_the_dropped_fraction(compose, drop, weight):
    """lambda_D n_D / (lambda_U n_U) = 1 with n_D = (1 - drop) n_U (Ethayarajh et al. 2024's lower bound)."""
    cfg = compose("experiment=kto_imbalance", "+arm/kto_imbalance=kto", f"feedback.drop_desirable={drop}")
    assert cfg.algo.loss.desirable_weight == pytest.approx(weight)
    assert cfg.algo.loss.desirable_weight * (1 - drop) / cfg.algo.loss.undesirable_weight == pytest.approx(1.0)


def test_bad_feedback_settings_fail_with_what_is_allowed(compose):
    with pytest.raises(ConfigError, match=r"feedback.chosen_rank=4 must lie in \[1, k - 1\]"):
        validate(compose("feedback.chosen_rank=4"))
    with pytest.raises(ConfigError, match=r"feedback.drop_desirable=1.0 must lie in \[0, 1\)"):
        validate(compose("feedback.drop_desirable=1.0"))
    with pytest.raises(ConfigError, match="stage.cache_dir=x shares stages between single-process jobs"):
        validate(compose("stage.cache_dir=x", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"))


# --- the stage cache's keys ----------------------------------------------------------------------------------------

def test_stage_keys_change_exactly_with_what_the_stage_reads(compose):
    from rlmf.stage_cache import stage_key

    base = compose("experiment=dpo_beta")
    def keys(cfg):
        return {s: stage_key(cfg, s) for s in ("sft", "feedback", "discriminator", "align_feedback")}

    same = keys(base)
    # what only the align stage or the evaluation reads shares every earlier step
    for overrides in (["algo.loss.beta=0.3"], ["algo=kto"], ["algo.optim.max_steps=7"],
                      ["task.eval_samples_per_prompt=9"], ["feedback.drop_desirable=0.5"], ["evaluate.best_of_n=[1,4]"],
                      ["trainer.progress_bar=true"], ["logger=csv"]):
        assert keys(compose("experiment=dpo_beta", *overrides)) == same, overrides
    # the seed changes everything; a task size changes the stages that read it and every one after
    assert all(a != b for a, b in zip(same.values(), keys(compose("experiment=dpo_beta", "seed=1")).values()))
    feedback = keys(compose("experiment=dpo_beta", "task.feedback_prompts=100"))
    assert feedback["sft"] == same["sft"] and feedback["feedback"] != same["feedback"]
    assert feedback["align_feedback"] != same["align_feedback"]
    disc = keys(compose("experiment=dpo_beta", "discriminator.lr=1e-4"))
    assert (disc["sft"], disc["feedback"]) == (same["sft"], same["feedback"])
    assert disc["discriminator"] != same["discriminator"]
    rank = keys(compose("experiment=dpo_beta", "feedback.chosen_rank=3"))
    assert rank["discriminator"] == same["discriminator"] and rank["align_feedback"] != same["align_feedback"]


def test_shared_stage_directories_live_in_the_sweep(compose, tmp_path):
    from rlmf.run import Run

    run = Run(cfg=compose("experiment=dpo_beta"), run_dir=tmp_path / "sweep" / "3")
    shared = run.stage_dir("sft")
    assert shared.parent == tmp_path / "sweep" / "shared_stages" and shared.name.startswith("sft-")
    assert run.stage_dir("align") == tmp_path / "sweep" / "3" / "align"  # what the arms vary is never shared
    assert run.shared_feedback_dir().parent == shared.parent
    unshared = Run(cfg=compose(), run_dir=tmp_path / "run")
    assert unshared.stage_dir("sft") == tmp_path / "run" / "sft" and unshared.shared_feedback_dir() is None


def test_stage_lock_is_exclusive_between_processes(tmp_path):
    """A second process cannot take a shared stage's lock while the first holds it."""
    import fcntl
    import multiprocessing

    from rlmf.stage_cache import stage_lock

    def try_lock(path, result):
        with open(path, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                result.value = 1
            except BlockingIOError:
                result.value = 0

    directory = tmp_path / "shared" / "sft-abc"
    context = multiprocessing.get_context("fork")
    for held, expected in ((True, 0), (False, 1)):
        result = context.Value("i", -1)
        lock = stage_lock(directory) if held else __import__("contextlib").nullcontext()
        with lock:
            p = context.Process(target=try_lock, args=(str(directory) + ".lock", result))
            p.start()
            p.join(10)
        assert result.value == expected


# --- data conditions and the evaluation's standard error ---------------------------------------------------------

def test_chosen_rank_picks_the_rth_best_over_the_worst():
    from rlmf.feedback.ranking import best_worst_feedback

    completions = ["a", "b", "c", "d", "e", "f", "g", "h"]
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5, 1.0, 2.0, 3.0, 4.0])
    valid = torch.ones(8, dtype=torch.bool)
    best = best_worst_feedback(["p", "q"], completions, scores, valid, 4)[0]
    assert [(x.chosen, x.rejected) for x in best] == [("b", "c"), ("h", "e")]
    second_worst = best_worst_feedback(["p", "q"], completions, scores, valid, 4, chosen_rank=3)[0]
    assert [(x.chosen, x.rejected) for x in second_worst] == [("a", "c"), ("f", "e")]
    valid[1] = False  # 3 valid samples left for p: rank 3 would be the worst itself, so p gives nothing
    assert [x.prompt for x in best_worst_feedback(["p", "q"], completions, scores, valid, 4, chosen_rank=3)[0]] == ["q"]


def test_drop_desirable_removes_that_fraction_and_the_pairs_they_chose():
    from rlmf.data.formats import FeedbackExample, PreferencePair
    from rlmf.feedback.ranking import drop_desirable

    pairs = [PreferencePair(f"p{i}", f"good{i}", f"bad{i}") for i in range(20)]
    thumbs = [x for p in pairs for x in (FeedbackExample(p.prompt, p.chosen, True),
                                         FeedbackExample(p.prompt, p.rejected, False))]
    kept_pairs, kept_thumbs, dropped = drop_desirable(pairs, thumbs, 0.9, random.Random(0))
    assert dropped == 18 and len(kept_pairs) == 2
    assert sum(t.desirable for t in kept_thumbs) == 2 and sum(not t.desirable for t in kept_thumbs) == 20
    assert {p.chosen for p in kept_pairs} == {t.completion for t in kept_thumbs if t.desirable}
    assert drop_desirable(pairs, thumbs, 0.0, random.Random(0)) == (pairs, thumbs, 0)


def test_standard_error_is_over_prompts():
    from rlmf.stages.evaluate import standard_error

    groups = [[0.1, 0.3], [0.5, 0.5], [0.2, 0.0], [0.9, 0.7]]
    means = [0.2, 0.5, 0.1, 0.8]
    assert standard_error(groups) == pytest.approx(statistics.stdev(means) / math.sqrt(4))
    assert math.isnan(standard_error([[0.4, 0.2]]))


def test_jobs_of_a_sweep_share_finished_stages(compose, tmp_path):
    """Two jobs of one seed, differing only in the loss: the second reuses the first's SFT, feedback, discriminator
    and round of machine feedback from the sweep's shared_stages/ (linked into its own directory), and agrees with
    the first on everything those produced. A job of another seed computes its own."""
    from rlmf.train import run_job

    sweep = tmp_path / "sweep"
    common = ("experiment=quick", "stage.cache_dir=shared_stages", "stage.stages=[sft,feedback,discriminator,align]")
    first = run_job(compose(*common, "algo.loss.beta=0.1"), sweep / "0")
    done = {s: (sweep / "0" / s / "done.json").stat().st_mtime_ns for s in ("sft", "feedback", "discriminator")}
    second = run_job(compose(*common, "algo.loss.beta=0.5"), sweep / "1")
    for stage in ("sft", "feedback", "discriminator"):
        link = sweep / "1" / stage
        assert link.is_symlink() and link.resolve() == (sweep / "0" / stage).resolve()
        assert link.resolve().parent == sweep / "shared_stages"
        assert (link / "done.json").stat().st_mtime_ns == done[stage], f"{stage} was computed again"
    assert len(list((sweep / "shared_stages").glob("align_feedback-*/feedback.json"))) == 1
    shared = [k for k in first if k.startswith(("sft/", "feedback/", "discriminator/", "align/chosen", "align/pairs"))]
    assert shared and json.dumps({k: first[k] for k in shared}) == json.dumps({k: second[k] for k in shared})  # NaN
    run_job(compose(*common, "seed=1", "stage.stages=[sft]"), sweep / "2")
    assert len(list((sweep / "shared_stages").glob("sft-*/done.json"))) == 2


def test_chosen_rank_skips_a_chosen_tied_with_the_worst():
    from rlmf.feedback.ranking import best_worst_feedback

    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert best_worst_feedback(["p"], ["a", "b", "c", "d"], scores, torch.ones(4, dtype=torch.bool), 4, 3)[0] == []
