"""The main job end to end at tiny sizes: run directory contents, stage hand-off and resume, multirun."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlmf.train import run_job


def test_quick_job_writes_config_checkpoints_summary_and_plot(compose, tmp_path):
    cfg = compose("experiment=quick", "stage=sft")
    summary = run_job(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "config_resolved.yaml").exists()
    assert (run / "sft" / "generator" / "config.json").exists()
    assert (run / "sft" / "checkpoints" / "last.ckpt").exists()
    saved = json.loads((run / "summary.json").read_text())
    assert saved == summary
    assert saved["sft/val_loss_after"] < saved["sft/val_loss_before"]

    # A second job hands the SFT checkpoint on: only evaluation runs, on the first job's generators.
    cfg = compose("experiment=quick", "stage=evaluate", f"stage.from_run={run}")
    evaluated = run_job(cfg, tmp_path / "eval")
    assert {"gold/reply_rate/initial", "gold/reply_rate/sft"} <= set(evaluated)
    assert all(0.0 <= evaluated[k] <= 1.0 for k in evaluated if k.startswith("gold/"))
    assert (tmp_path / "eval" / "reply_rate_by_stage.png").stat().st_size > 1000
    assert not (tmp_path / "eval" / "sft").exists(), "a finished stage must be reused, not re-run"

    # generator=hf takes any causal LM by name or local path: here the first job's SFT output.
    # Same lengths as the first job (generator=hf brings the longer ones a pretrained model needs).
    g = compose("experiment=quick").generator
    cfg = compose("experiment=quick", "stage=sft", "generator=hf", f"generator.name_or_path={run}/sft/generator",
                  f"generator.max_length={g.max_length}", f"generator.max_prompt_length={g.max_prompt_length}")
    hf = run_job(cfg, tmp_path / "hf")
    assert hf["sft/val_loss_before"] == pytest.approx(saved["sft/val_loss_after"], rel=1e-4)


def test_rerun_in_the_same_directory_resumes(compose, tmp_path):
    cfg = compose("experiment=quick", "stage=sft")
    run_job(cfg, tmp_path / "run")
    weights = tmp_path / "run" / "sft" / "generator" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    run_job(cfg, tmp_path / "run")
    assert weights.stat().st_mtime_ns == stamp, "a finished stage was trained again"


def test_multirun_gives_each_job_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "rlmf.train", "-m", "experiment=quick", "stage=sft", "trainer.max_steps=2,4",
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = sorted(json.loads((sweep / str(i) / "summary.json").read_text())["sft/steps"] for i in (0, 1))
    assert steps == [2, 4]
    assert (sweep / "0" / "config_resolved.yaml").exists() and (sweep / "1" / "config_resolved.yaml").exists()

    script = Path(__file__).resolve().parents[1] / "experiments" / "report.py"
    table = subprocess.run([sys.executable, str(script), str(sweep), "--no-wandb"], capture_output=True,
                           text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "| max_steps=2 | 1 |" in table.stdout and "| max_steps=4 | 1 |" in table.stdout  # one seed each
    assert (sweep / "report.csv").exists() and (sweep / "report.png").stat().st_size > 1000


def test_full_pipeline_at_tiny_sizes(compose, tmp_path):
    summary = run_job(compose("experiment=quick"), tmp_path / "run")
    for key in ("feedback/pairs", "discriminator/accuracy", "align/pairs", "gold/reply_rate/initial",
                "gold/reply_rate/sft", "gold/reply_rate/aligned", "discriminator/reward/aligned", "kl/aligned"):
        assert key in summary, key
    assert summary["kl/sft"] == 0.0, "the SFT model is its own reference"
    assert (tmp_path / "run" / "align" / "generator" / "model.safetensors").exists()
    assert (tmp_path / "run" / "discriminator" / "model" / "discriminator.json").exists()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _preference_rows(n):
    rows = []
    for i in range(n):
        prompt = f"Write a note to customer {i} about order {i % 7}."
        rows.append({"prompt": prompt, "chosen": f"Thanks for order {i % 7}, it ships today.",
                     "rejected": f"order {i % 7} whatever"})
    return rows


def test_bring_your_own_jsonl(compose, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _preference_rows(24))
    eval_ = _write_jsonl(tmp_path / "eval.jsonl", _preference_rows(6))
    cfg = compose("experiment=tiny_models", "task=preference_files", f"task.train={train}", f"task.eval={eval_}",
                  "task.eval_prompts=4")
    summary = run_job(cfg, tmp_path / "run")
    assert "feedback/pairs" not in summary, "the files are the feedback; no simulator runs"
    assert not any(k.startswith("gold/") for k in summary)
    assert 0.0 <= summary["discriminator/accuracy"] <= 1.0
    assert summary["sft/train_examples"] == 24
    assert "discriminator/reward/aligned" in summary and "kl/aligned" in summary
    # What changed, on the held-out pairs and prompts (rlmf.evaluation), for every generator the run has.
    for name in ("initial", "sft", "aligned"):
        assert 0.0 <= summary[f"heldout/preference_accuracy/{name}"] <= 1.0
        assert summary[f"heldout/logps_per_token/chosen/{name}"] < 0
        assert summary[f"length/{name}"] > 0
    assert 0.0 <= summary["heldout/rewards/accuracies/aligned"] <= 1.0 and "heldout/rewards/margins/aligned" in summary
    assert "heldout/rewards/accuracies/sft" not in summary, "the starting generator is its own reference"
    assert 0.0 <= summary["winrate/aligned"] <= 1.0 and summary["winrate_ci95/aligned"] >= 0
    assert "winrate/sft" not in summary
    samples = json.loads((tmp_path / "run" / "evaluate" / "samples.json").read_text())
    assert len(samples["samples"]["aligned"]) == len(samples["rewards"]["aligned"]) == 4


def test_an_independent_judge_grades_every_seed_the_same(compose, tmp_path):
    """evaluate.judge_rows: a judge trained once per sweep on rows the policy and its reward model never see
    (task.rows), shared by jobs of different seeds, and scoring the held-out samples instead of the proxy."""
    from rlmf.errors import ConfigError
    from rlmf.validate import validate

    train = _write_jsonl(tmp_path / "pairs.jsonl", _preference_rows(40))
    common = ("experiment=tiny_models", "task=preference_files", f"task.train={train}", "task.rows=[0,20]",
              "evaluate.judge_rows=[20,40]", "evaluate.judge_max_epochs=3", "task.eval_prompts=2",
              "stage.cache_dir=shared", "stage.stages=[sft,discriminator,align,evaluate]")
    summaries = [run_job(compose(*common, f"seed={seed}"), tmp_path / "sweep" / str(seed)) for seed in (0, 1)]
    assert all(s["sft/train_examples"] == 18 for s in summaries)  # rows 0..19, less the held-out tenth
    assert summaries[0]["judge/train_rows"] == summaries[1]["judge/train_rows"] == 20
    assert summaries[0]["judge/accuracy"] == summaries[1]["judge/accuracy"]
    assert summaries[0]["judge/steps"] == 3 * (20 // 8)  # judge_max_epochs passes of whole batches of 8
    assert summaries[0]["judge/heldout_pairs"] == 20  # all of task.rows (train and eval pairs), none of its own
    judges = list((tmp_path / "sweep" / "shared").glob("judge-*/model"))
    assert len(judges) == 1, "one judge for the sweep, whatever the seed"
    for summary in summaries:
        assert "winrate/aligned" in summary and "discriminator/reward/aligned" in summary
    with pytest.raises(ConfigError, match="evaluate.judge_rows=\\[5, 2\\] must be"):
        validate(compose(*common, "evaluate.judge_rows=[5,2]"))
    for rows in ("task.rows=[0,25]", "task.rows=null"):  # the judge must not grade on rows the policy trains on
        with pytest.raises(ConfigError, match="evaluate.judge_rows=\\[20, 40\\] overlaps task.rows"):
            validate(compose(*common, rows))
    with pytest.raises(ConfigError, match="evaluate.judge_max_epochs=0 must be at least 1"):
        validate(compose(*common, "evaluate.judge_max_epochs=0"))


def test_bad_row_stops_before_training_and_names_file_line_field(compose, tmp_path):
    rows = _preference_rows(5)
    rows[2] = {"prompt": "x", "chosen": 3, "rejected": "y"}
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = compose("experiment=tiny_models", "task=preference_files", f"task.train={train}", "stage=sft")
    from rlmf.data import DataError

    with pytest.raises(DataError, match=r"train.jsonl:3: field 'chosen'"):
        run_job(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "sft").exists(), "nothing may be trained from bad data"
    skipping = compose("experiment=tiny_models", "task=preference_files", f"task.train={train}", "stage=sft",
                       "task.on_bad_row=skip")
    assert run_job(skipping, tmp_path / "skip")["sft/train_examples"] == 3  # 4 good rows, 1 held out for eval


def test_wandb_offline_run_logs_config_metrics_and_samples(compose, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose("experiment=quick", "logger=wandb", f"logger.save_dir={tmp_path}", "stage.stages=[sft,evaluate]")
    run_job(cfg, tmp_path / "run")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline W&B run per job, syncable later"
    record = next(runs[0].glob("*.wandb")).read_bytes()  # the offline run's protobuf log, what `wandb sync` sends
    assert b"logprob_backend" in record, "the resolved config is the W&B config"
    assert b"gold/reply_rate/sft" in record and b"sft/train/loss" in record
    assert list(runs[0].rglob("*.table.json")), "sample emails are logged as a W&B table"


def test_stage_table_lists_each_generator():
    from rlmf.reporting import stage_table

    rows = stage_table({"gold/reply_rate/sft": 0.25, "gold/reply_rate/aligned": 0.5, "kl/aligned": 1.5})
    assert rows == [["sft", "0.250", "-", "-", "-"], ["aligned", "0.500", "-", "-", "1.500"]]


def test_evaluation_of_a_shared_generator_is_cached(compose, tmp_path):
    base = tmp_path / "base"
    run_job(compose("experiment=quick", "stage=sft"), base)
    first = run_job(compose("experiment=quick", "stage=evaluate", f"stage.from_run={base}"), tmp_path / "a")
    caches = sorted((base / "sft").glob("eval-*.json"))
    assert [c.name.split("-")[1] for c in caches] == ["initial", "sft"]
    stamps = [c.stat().st_mtime_ns for c in caches]
    second = run_job(compose("experiment=quick", "stage=evaluate", f"stage.from_run={base}"), tmp_path / "b")
    assert second == first and [c.stat().st_mtime_ns for c in caches] == stamps
    # A different evaluation setting is a different cache entry, not a stale hit.
    run_job(compose("experiment=quick", "stage=evaluate", f"stage.from_run={base}", "generator.max_new_tokens=8"),
            tmp_path / "c")
    assert len(list((base / "sft").glob("eval-*.json"))) == 4


def test_a_start_outside_any_run_is_evaluated_once_per_sweep_and_nothing_is_written_beside_it(compose, tmp_path):
    """A hub, local or .gguf start (generator=hf) is evaluated once for the jobs of a sweep, in its shared stages
    (stage.cache_dir), never in the folder of a model the run did not write."""
    import shutil

    run_job(compose("experiment=quick", "stage=sft"), tmp_path / "base")
    models = tmp_path / "models"
    shutil.copytree(tmp_path / "base" / "sft" / "generator", models / "mine")
    g = compose("experiment=quick").generator
    job = ("experiment=quick", "stage=evaluate", "generator=hf", f"generator.name_or_path={models / 'mine'}",
           f"generator.max_length={g.max_length}", f"generator.max_prompt_length={g.max_prompt_length}",
           "stage.cache_dir=shared")
    first = run_job(compose(*job), tmp_path / "sweep" / "0")
    caches = list((tmp_path / "sweep" / "shared").glob("eval-initial-*.json"))
    assert len(caches) == 1 and "gold/reply_rate/initial" in first
    stamp = caches[0].stat().st_mtime_ns
    assert run_job(compose(*job), tmp_path / "sweep" / "1") == first and caches[0].stat().st_mtime_ns == stamp
    assert sorted(p.name for p in models.iterdir()) == ["mine"], "nothing written beside the user's model"


def test_beta_sweep_reuses_cached_reference_logps(compose, tmp_path):
    base = tmp_path / "base"
    run_job(compose("experiment=quick", "stage.stages=[sft,feedback,discriminator]"), base)
    common = ["experiment=quick", "stage.stages=[align]", f"stage.from_run={base}", "algo.reference=precomputed",
              f"algo.reference_cache_dir={tmp_path / 'cache'}"]
    first = run_job(compose(*common, "algo.loss.beta=0.1"), tmp_path / "beta0.1")
    second = run_job(compose(*common, "algo.loss.beta=0.5"), tmp_path / "beta0.5")
    assert first["align/reference_cache_hit"] == 0.0 and second["align/reference_cache_hit"] == 1.0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    lora = run_job(compose("experiment=quick", "stage.stages=[align]", f"stage.from_run={base}",
                           "algo.reference=lora"), tmp_path / "lora")
    assert lora["align/steps"] == 4
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "lora" / "align" / "generator" / "model.safetensors")
    assert saved and not [k for k in saved if "lora" in k], "the adapter is merged into a plain model"


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_rows_go_through_the_checkpoint_chat_template(compose, tmp_path, tiny_checkpoint, monkeypatch):
    """With a tokenizer that has a chat template, chat rows are rendered by it for SFT, alignment and the
    evaluation prompts; no HH "\\n\\nHuman:" text reaches the model."""
    import shutil

    from transformers import AutoTokenizer

    import rlmf.data.tokenization

    model_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_checkpoint("llama"), model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": [{"role": "user", "content": f"Write to customer {i}."}],
             "chosen": [{"role": "assistant", "content": f"Thanks, order {i % 5} ships today."}],
             "rejected": [{"role": "assistant", "content": "whatever"}]} for i in range(20)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    rendered = []
    encode = rlmf.data.tokenization._encode

    def spy(tok, texts):
        rendered.extend(texts)
        return encode(tok, texts)

    monkeypatch.setattr(rlmf.data.tokenization, "_encode", spy)
    cfg = compose("experiment=tiny_models", "task=preference_files", f"task.train={train}", "task.eval_prompts=2",
                  "generator=hf", f"generator.name_or_path={model_dir}", "stage.stages=[sft,align,evaluate]",
                  "generator.sft.max_steps=2")
    summary = run_job(cfg, tmp_path / "run")
    assert "kl/aligned" in summary
    assert any(t.startswith("<|im_start|>user\nWrite to customer") and t.endswith("<|im_start|>assistant\n")
               for t in rendered), "prompts rendered with the template"
    assert any(t.startswith("Thanks, order") and "<|im_end|>" in t for t in rendered), "completions too"
    assert not any("Human:" in t for t in rendered), "no HH rendering with a chat template"


def test_the_round_ranks_samples_with_any_reward(compose, tmp_path):
    """reward= picks what ranks the RLMF round's samples: here an ensemble of the trained discriminator and the
    persona-email oracle (a function reward); each member's statistics reach the summary."""
    base = tmp_path / "base"
    run_job(compose("experiment=quick", "stage.stages=[sft,feedback,discriminator]"), base)
    summary = run_job(compose("experiment=quick", "stage.stages=[align]", f"stage.from_run={base}",
                              "reward=ensemble"), tmp_path / "ensemble")
    assert summary["align/pairs"] > 0 and summary["align/unscored_samples"] == 0
    assert {"align/rewards/discriminator/mean", "align/rewards/gold/mean"} <= set(summary)


def test_a_reward_missing_its_model_fails_before_any_work(compose, tmp_path):
    from rlmf.errors import ConfigError

    with pytest.raises(ConfigError, match="name_or_path"):
        run_job(compose("experiment=quick", "reward=classifier"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


ONLINE_JOBS = [  # each online algorithm once, and each kind of reward behind one of them
    ("grpo", "discriminator"), ("rloo", "ensemble"), ("ppo", "judge"), ("online_dpo", "discriminator")]


@pytest.mark.parametrize("algo,reward", ONLINE_JOBS)
def test_online_algorithms_run_the_main_job(compose, tmp_path, tiny_checkpoint, algo, reward):
    """algo=ppo|grpo|rloo|online_dpo: the align stage samples, the reward scores, the policy updates; rewarded by
    the trained discriminator, an ensemble of it and the rule-based gold function, or a local causal-LM judge."""
    overrides = ["experiment=quick", f"algo={algo}", f"reward={reward}", "logger=csv"]
    if reward == "judge":  # a tiny random LM: it runs and logs; its answers mostly do not parse
        overrides += [f"reward.name_or_path={tiny_checkpoint('llama')}", "reward.max_new_tokens=3",
                      "reward.max_prompt_length=64"]
    summary = run_job(compose(*overrides), tmp_path / "run")
    for key in ("gold/reply_rate/aligned", "kl/aligned", "align/steps", "align/train/reward",
                "align/train/objective/kl", "align/train/gold/reply_rate"):
        assert key in summary, key
    assert "align/pairs" not in summary, "online algorithms make no offline round of pairs"
    assert summary["align/rollouts"] == 4
    iterations = 2 if algo == "ppo" else 1  # conf/algo/ppo.yaml: two PPO epochs per rollout
    assert summary["align/steps"] == 4 * iterations  # max_steps rollouts x iterations x 1 minibatch
    generator = tmp_path / "run" / "align" / "generator"
    assert (generator / "model.safetensors").exists()
    assert not (tmp_path / "run" / "align" / "pairs.jsonl").exists()
    if algo == "ppo":  # the exported generator is the policy alone; the value head stays in the checkpoint
        from safetensors import safe_open
        with safe_open(str(generator / "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if "value" in k]
        import torch
        state = torch.load(tmp_path / "run" / "align" / "checkpoints" / "last.ckpt", weights_only=False)
        assert {"value_head.linear.weight", "kl_coef"} <= set(state["state_dict"])
    metrics = (tmp_path / "run" / "logs" / "align" / "metrics.csv").read_text().splitlines()[0].split(",")
    if reward == "ensemble":
        assert {"align/train/rewards/discriminator/mean", "align/train/rewards/gold/mean"} <= set(metrics)
    if reward == "judge":
        assert "align/train/rewards/judge/invalid" in metrics

def test_rounds_repeat_feedback_discriminator_and_align_from_the_previous_round(compose, tmp_path):
    """loop.rounds=2: round 2 lives in round2/, its feedback comes from round 1's aligned generator, its discriminator
    trains on both rounds' feedback (warm-started), its generator aligns from round 1's; evaluate covers both rounds
    and the run writes the per-round table and plot. A re-run in the directory reuses every round."""
    run = tmp_path / "run"
    cfg = compose("experiment=quick", "loop.rounds=2", "logger=csv")
    summary = run_job(cfg, run)
    for stage in ("feedback", "discriminator", "align"):
        assert (run / "round2" / stage / "done.json").exists(), stage
    assert (run / "logs" / "round2_align" / "metrics.csv").exists(), "round 2 logs apart from round 1"
    assert summary["round2/discriminator/train_rows"] == summary["feedback/pairs"] + summary["round2/feedback/pairs"]
    for key in ("gold/reply_rate/aligned", "gold/reply_rate/round2", "kl/round2", "round2/align/pairs",
                "round2/feedback/observed_reply_rate"):
        assert key in summary, key
    assert summary["kl/round2"] != summary["kl/aligned"]
    table = (run / "rounds.md").read_text()
    assert "| 0 (sft) |" in table and "| 2 |" in table and (run / "rounds.png").stat().st_size > 1000
    # the round-2 align stage started from round 1's aligned generator (same tokenizer and shapes, other weights)
    import hashlib
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(run / "round2" / "align" / "generator" / "model.safetensors") != \
        digest(run / "align" / "generator" / "model.safetensors")

    stamp = (run / "round2" / "align" / "generator" / "model.safetensors").stat().st_mtime_ns
    again = run_job(cfg, run)
    assert (run / "round2" / "align" / "generator" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again["gold/reply_rate/round2"] == summary["gold/reply_rate/round2"]


def test_rounds_need_a_feedback_source(compose, tmp_path):
    from rlmf.errors import ConfigError
    from rlmf.validate import validate

    with pytest.raises(ConfigError, match=r"loop.rounds=2 needs a task with a feedback source"):
        validate(compose("task=preference_files", "task.train=x.jsonl", "loop.rounds=2"))
    with pytest.raises(ConfigError, match=r"loop.discriminator='cold' is not valid; choose one of: warm, scratch"):
        validate(compose("loop.discriminator=cold"))
