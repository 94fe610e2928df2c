"""Benchmark one GRPO training step on CPU: our OnlineGenerator against TRL 1.16's GRPOTrainer, time and peak memory.

One step, on both sides, is one rollout and one optimiser step: ``--prompts-per-step`` prompts each get
``--num-generations`` sampled completions of at most ``--max-completion-length`` tokens (temperature 1, no top-k /
top-p), a rule-based reward scores them (the completion's length in characters / 100, the same function on both
sides, so no reward model is timed), group-relative advantages, the reference model's log-probs for the k3 KL
(``--beta``, 0.04 by default), then forward + backward of the GRPO loss (per-completion token mean, clip 0.2),
gradient-norm clipping at 1.0 and one AdamW step.

- ``ours``: :class:`rlmf.modules.online.OnlineGenerator` (``loss_name="grpo"``, ``num_iterations=1``, the whole
  rollout as one minibatch) under a Lightning ``Trainer`` over a ``RowsDataModule`` of the prompt rows, built as
  the align stage builds it (:func:`rlmf.modules.build.build_online_generator`); a frozen copy of the policy is the
  reference; its rollouts sample with ``--sampler`` (``generator.sampler``: ``rlmf``, our decode loop, by default;
  ``hf``, ``model.generate``). ``ours`` scores on packed rows (the default ``generator.packing=shared_prompt``: the
  ``G`` completions of a prompt share one copy of it, no padding), ``ours_padded`` on the padded
  ``[prompts * G, P + L]`` rollout rows.
- ``trl``: ``trl.GRPOTrainer`` with ``GRPOConfig(use_cpu=True, per_device_train_batch_size=prompts * G,
  gradient_accumulation_steps=1, num_generations=G, loss_type="grpo", beta=..., gradient_checkpointing=False,
  bf16=False)``: in TRL 1.16 the per-device batch counts completions, and with one accumulation step one generation
  batch of ``prompts * G`` completions is sampled and trained on per optimiser step. TRL's own defaults differ
  (``gradient_checkpointing=True``, ``bf16=True``, ``loss_type="dapo"``, ``beta=0``): they are set to match ours.

Both load the very same checkpoint: a tiny Llama (:func:`rlmf.models.build_tiny_generator`) with a BPE tokenizer
trained on the persona-email corpus, saved once with ``save_pretrained`` into a temporary directory. Both see the
same prompts (the persona-email training briefs), tokenised to the same ids (``<s>`` + prompt; TRL's prompt column
carries the ``<s>`` as text, which the tokenizer maps to the bos id; checked before the runs).

With exactly one optimiser step per rollout neither side runs a separate no-grad forward for the sampling policy's
log-probs: they are the update's own, detached (the ratio is 1 by construction; ``OnlineGenerator.
single_on_policy_update``); with several updates per rollout both would need that forward.

Each implementation runs in a fresh subprocess with ``--threads`` torch threads: 1 by default, because on a 2-core
machine shared with other jobs two OpenMP threads that spin-wait for each other made a tiny model's ``generate``
over 100x slower (``--threads 0`` keeps torch's default). Step time: Lightning's ``on_train_batch_start`` /
``_end`` (ours), the ``TrainerCallback``'s ``on_step_begin`` / ``on_step_end`` (TRL); the first ``--warmup`` steps
are dropped and the median of the rest is reported, with the process's CPU time (user + system, all threads) per
step beside it. Sampling is also timed alone, inside the same steps: every call of the function each side samples a
rollout through (ours: :func:`rlmf.generation.sample_tokens` as ``rlmf.modules.rollouts`` calls it; TRL:
``GRPOTrainer._generate_single_turn``, its ``model.generate`` path), with the tokens it generated (each completion
up to and including its stop token); the table gives its seconds per timed step, generated tokens/s and share of
the step.
Tokens/s is prompt + completion tokens (unpadded, the stop token included) of the timed steps over their summed
step time. Peak memory is the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs`` when
training starts, so it covers the training steps only), both absolute (libraries and both models included) and
above the resident set at that reset. Results are printed and written to ``experiments/results/bench_grpo_cpu.csv``
(``bench_grpo_cpu_quick.csv`` with ``--quick``).

    python experiments/bench_grpo.py --quick                     # under a minute on 2 cores
    python experiments/bench_grpo.py                             # 4.5M-parameter Llama, ~2-3 minutes on 2 cores
    python experiments/bench_grpo.py --hidden-size 512 --layers 8 --num-generations 4 --max-completion-length 64
    python experiments/bench_grpo.py --threads 0 --beta 0        # torch's thread count; no KL on either side
    python experiments/bench_grpo.py --impls ours --steps 20     # one side only
    python experiments/bench_grpo.py --quick --sampler hf        # our rollouts through model.generate
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from process_stats import StepTimer, lightning_step_timer, run_worker, transformers_step_timer, write_csv

RESULTS = Path(__file__).resolve().parent / "results"
IMPLEMENTATIONS = ("ours_padded", "ours", "trl")
# The decoder layout of each of our sides (rlmf.packing.PACKINGS): ours is the default, the G completions of a prompt
# sharing it; ours_padded runs the padded rows.
PACKING = {"ours_padded": "none", "ours": "shared_prompt"}
RESULT_MARK = "BENCH_GRPO_RESULT "
DEFAULTS = dict(hidden_size=256, layers=4, heads=4, vocab=1000, num_generations=8, prompts_per_step=4,
                max_completion_length=128, steps=10, warmup=2)
QUICK = dict(hidden_size=64, layers=1, heads=2, vocab=512, num_generations=4, prompts_per_step=2,
             max_completion_length=32, steps=6, warmup=2)


def length_score(completion: str) -> float:
    """The benchmark's reward: the completion's length in characters / 100 (cheap, deterministic, never invalid)."""
    return len(completion) / 100.0


# ------------------------------------------------------------------------------------------ memory and CPU time




class StepLog(StepTimer):
    """What a worker records per step, and the peak memory of its training, whichever trainer drives it."""

    def __init__(self):
        super().__init__()
        self.prompt_tokens, self.completion_tokens = [], []
        self.generations = []  # (step index, seconds, generated tokens) of each sampling call

    def timing_generation(self, generate, count_tokens):
        """``generate`` wrapped to record each call's wall time and the tokens it generated (``count_tokens`` of
        its result), under the index of the step it ran in."""
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = generate(*args, **kwargs)
            self.generations.append((len(self.times), time.perf_counter() - start, count_tokens(result)))
            return result

        return timed

    def generation_summary(self, warmup: int, steps: int, step_seconds: float) -> dict:
        """Sampling alone over the timed steps: seconds per step, generated tokens/s, share of the step time."""
        timed = [(seconds, tokens) for step, seconds, tokens in self.generations if step >= warmup]
        if not timed:
            raise RuntimeError("no sampling call was recorded during the timed steps")
        seconds, tokens = sum(t for t, _ in timed), sum(n for _, n in timed)
        return {"generation_s_per_step": seconds / steps, "generated_tokens_per_s": tokens / seconds,
                "generation_share": seconds / step_seconds}

    def summary(self, warmup: int, max_completion_tokens: int) -> dict:
        if len(self.times) <= warmup:
            raise RuntimeError(f"only {len(self.times)} steps ran; need more than --warmup={warmup}")
        if not (len(self.prompt_tokens) == len(self.completion_tokens) == len(self.times)):
            raise RuntimeError(f"token counts for {len(self.prompt_tokens)} / {len(self.completion_tokens)} steps, "
                               f"times for {len(self.times)}")
        times, cpu = self.times[warmup:], self.cpu_times[warmup:]
        prompt, completion = self.prompt_tokens[warmup:], self.completion_tokens[warmup:]
        return {
            "steps_timed": len(times),
            "s_per_step": statistics.median(times),
            "s_per_step_min": min(times),
            "s_per_step_max": max(times),
            "cpu_s_per_step": statistics.median(cpu),
            "prompt_tokens_per_step": sum(prompt) / len(prompt),
            "completion_tokens_per_step": sum(completion) / len(completion),
            "completion_fill": sum(completion) / len(completion) / max_completion_tokens,
            "tokens_per_s": (sum(prompt) + sum(completion)) / sum(times),
            "peak_rss_mb": self.peak_rss / 2**20,
            "base_rss_mb": self.base_rss / 2**20,
            "train_peak_mb": (self.peak_rss - self.base_rss) / 2**20,
            "all_step_times": [round(t, 4) for t in self.times],
            **self.generation_summary(warmup, len(times), sum(times)),
        }


# ------------------------------------------------------------------------------------------ the two workers


def _worker(spec: dict) -> dict:
    """Runs in its own process: train ``warmup + steps`` GRPO steps with one implementation, timing each."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    with open(spec["prompts_file"]) as f:
        prompts = json.load(f)
    log = StepLog()
    run = _run_ours if spec["impl"] in PACKING else _run_trl
    extra = run(spec, prompts, log)
    most = spec["prompts_per_step"] * spec["num_generations"] * spec["max_completion_length"]
    out = log.summary(spec["warmup"], most)
    out.update(extra, threads=torch.get_num_threads())
    return out


def _run_ours(spec: dict, prompts, log: StepLog) -> dict:
    import lightning as L
    import torch

    from rlmf.data.collate import OnlinePromptCollator
    from rlmf.data.formats import PromptOnly
    from rlmf.data.loading import RowsDataModule
    from rlmf.data.tokenization import tokenize_prompts
    from rlmf.config import compose_config
    from rlmf.models import load_generator
    from rlmf.modules import rollouts
    from rlmf.modules.build import build_online_generator
    from rlmf.modules.online import needs_reference
    from rlmf.reference import frozen_copy

    L.seed_everything(spec["seed"], verbose=False)
    model, tokenizer = load_generator(spec["checkpoint"])
    g = spec["num_generations"]

    def reward(prompt_texts, completions):
        scores = torch.tensor([length_score(c) for c in completions], dtype=torch.float32)
        return scores, torch.ones(len(completions), dtype=torch.bool)

    # GRPO's registered objective takes reference log-probs whatever beta is, so ours keeps a reference even at
    # beta 0 (TRL drops it there); --beta 0 therefore times one more no-grad forward on our side.
    reference = frozen_copy(model) if needs_reference("grpo", 0.0) or spec["beta"] else None
    cfg = compose_config("algo=grpo", f"algo.loss.beta={spec['beta']}", f"algo.online.num_generations={g}",
                         f"algo.online.max_new_tokens={spec['max_completion_length']}", f"algo.optim.lr={spec['lr']}",
                         "algo.optim.warmup_ratio=0", "algo.online.log_completions_every=0",
                         "generator.temperature=1.0", f"generator.sampler={spec['sampler']}",
                         "trainer.gradient_clip_val=1.0", f"generator.packing={PACKING[spec['impl']]}")
    module = build_online_generator(cfg, model, tokenizer, reward, reference)  # as the align stage builds it
    features = tokenize_prompts([PromptOnly(p) for p in prompts], tokenizer, None)
    rows = [{**f, "prompt": p} for f, p in zip(features, prompts)]
    data = RowsDataModule(rows, [], OnlinePromptCollator(tokenizer.pad_token_id), spec["prompts_per_step"],
                          seed=spec["seed"])

    def count_prompt_tokens(trainer, batch):
        log.prompt_tokens.append(int(batch["prompt_mask"].sum()) * g)

    def count_completion_tokens(trainer, batch):
        # OnlineGenerator logs the rollout's mean completion length (stop token included) under TRL's name.
        mean_length = float(trainer.callback_metrics["align/train/completions/mean_length"])
        log.completion_tokens.append(mean_length * batch["prompt_ids"].shape[0] * g)

    timer = lightning_step_timer(log, count_prompt_tokens, count_completion_tokens)
    # The rollout samples through rlmf.generation.sample_tokens, as rollouts.py imported it: (tokens, keep).
    rollouts.sample_tokens = log.timing_generation(rollouts.sample_tokens, lambda result: int(result[1].sum()))

    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(max_steps=spec["warmup"] + spec["steps"], accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer], default_root_dir=root)
        trainer.fit(module, datamodule=data)
    return {"attn": model.config._attn_implementation, "reference": reference is not None}


def _run_trl(spec: dict, prompts, log: StepLog) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["checkpoint"])
    g, per_step = spec["num_generations"], spec["prompts_per_step"]
    # Our collator puts bos before each prompt; TRL tokenises the prompt text as is, so the text carries it.
    dataset = Dataset.from_dict({"prompt": [tokenizer.bos_token + p for p in prompts]})

    def length_reward(prompts, completions, **kwargs):
        return [length_score(c) for c in completions]

    seen = {"tokens": 0}

    def count_tokens(logs):
        # logging_steps=1: one log per optimiser step. num_tokens is TRL's running count of prompt + completion
        # tokens (unpadded); completions/mean_length includes the stop token, like ours.
        if "completions/mean_length" in logs:
            completion = logs["completions/mean_length"] * per_step * g
            log.completion_tokens.append(completion)
            log.prompt_tokens.append(logs["num_tokens"] - seen["tokens"] - completion)
            seen["tokens"] = logs["num_tokens"]

    timer = transformers_step_timer(log, count_tokens)

    with tempfile.TemporaryDirectory() as root:
        config = GRPOConfig(
            output_dir=root, use_cpu=True, seed=spec["seed"], max_steps=spec["warmup"] + spec["steps"],
            per_device_train_batch_size=per_step * g, gradient_accumulation_steps=1, num_generations=g,
            max_completion_length=spec["max_completion_length"], temperature=1.0, top_k=0, top_p=1.0,
            beta=spec["beta"], loss_type="grpo", scale_rewards="group", epsilon=0.2, num_iterations=1,
            learning_rate=spec["lr"], lr_scheduler_type="constant", max_grad_norm=1.0,
            gradient_checkpointing=False, bf16=False, fp16=False, model_init_kwargs={"dtype": torch.float32},
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=spec["checkpoint"], reward_funcs=length_reward, args=config,
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        # TRL 1.16 samples a generation batch in _generate_single_turn: (completion ids per completion, each up to
        # and including its stop token; log-probs).
        trainer._generate_single_turn = log.timing_generation(
            trainer._generate_single_turn, lambda result: sum(len(ids) for ids in result[0]))
        trainer.train()
        attn = trainer.model.config._attn_implementation
    return {"attn": attn, "reference": trainer.ref_model is not None}


# ----------------------------------------------------------------------------------------------- the driver


def _build_checkpoint(directory: Path, args) -> dict:
    """Save the tiny model and its tokenizer under ``directory`` and the prompts beside them."""
    from rlmf.data.formats import PromptOnly
    from rlmf.data.tokenization import tokenize_prompts
    from rlmf.models import build_tiny_generator, save_generator, train_tokenizer
    from rlmf.tasks.persona_email import build_world, corpus_texts

    world = build_world(seed=0)
    tokenizer = train_tokenizer(corpus_texts(world), vocab_size=args.vocab)
    prompts = [b.prompt for b in world.train]
    longest = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]) + 1
    model = build_tiny_generator(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers,
                                 num_heads=args.heads, intermediate_size=4 * args.hidden_size,
                                 max_position_embeddings=longest + args.max_completion_length + 8, seed=0)
    ours = [f["prompt_ids"] for f in tokenize_prompts([PromptOnly(p) for p in prompts], tokenizer, None)]
    theirs = tokenizer(text=[tokenizer.bos_token + p for p in prompts])["input_ids"]  # as GRPOTrainer tokenises
    if ours != theirs:
        raise RuntimeError("the two sides would tokenise the prompts differently")
    save_generator(model, tokenizer, directory / "checkpoint")
    with open(directory / "prompts.json", "w") as f:
        json.dump(prompts, f)
    return {"vocab": len(tokenizer), "params": sum(p.numel() for p in model.parameters()), "prompts": len(prompts),
            "longest_prompt": longest}


def _measure(spec: dict, timeout: float) -> dict:
    return run_worker(os.path.abspath(__file__), spec, RESULT_MARK, timeout)


def _print_table(rows, title):
    headers = ["implementation", "s/step (median)", "completion tokens/step", "tokens/s", "sampling s/step",
               "sampling generated tokens/s", "sampling share of step", "peak RSS (MB)",
               "train peak above base (MB)", "CPU s/step", "note"]
    lines = []
    for r in rows:
        if "s_per_step" not in r:
            lines.append([r["impl"], *["n/a"] * (len(headers) - 2), r.get("note", "")])
            continue
        lines.append([r["impl"], f"{r['s_per_step']:.3f}",
                      f"{r['completion_tokens_per_step']:.0f} ({100 * r['completion_fill']:.0f}% of max)",
                      f"{r['tokens_per_s']:.0f}", f"{r['generation_s_per_step']:.3f}",
                      f"{r['generated_tokens_per_s']:.0f}", f"{100 * r['generation_share']:.0f}%",
                      f"{r['peak_rss_mb']:.0f}", f"{r['train_peak_mb']:.0f}",
                      f"{r['cpu_s_per_step']:.2f}", r.get("note", "")])
    print(f"\n{title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for line in lines:
        print("| " + " | ".join(str(x) for x in line) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and a few short steps: a smoke run (explicit options still win)")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps (default {DEFAULTS['steps']})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed first steps (default {DEFAULTS['warmup']})")
    parser.add_argument("--num-generations", type=int, default=None,
                        help=f"completions per prompt, G (default {DEFAULTS['num_generations']})")
    parser.add_argument("--prompts-per-step", type=int, default=None,
                        help=f"prompts per rollout (default {DEFAULTS['prompts_per_step']})")
    parser.add_argument("--max-completion-length", type=int, default=None,
                        help=f"sampled tokens per completion at most (default {DEFAULTS['max_completion_length']})")
    parser.add_argument("--hidden-size", type=int, default=None, help=f"default {DEFAULTS['hidden_size']}; "
                        "the MLP is 4x wider")
    parser.add_argument("--layers", type=int, default=None, help=f"default {DEFAULTS['layers']}")
    parser.add_argument("--heads", type=int, default=None, help=f"default {DEFAULTS['heads']}")
    parser.add_argument("--vocab", type=int, default=None,
                        help=f"BPE vocabulary asked for (default {DEFAULTS['vocab']}; the corpus caps it near 1.1k)")
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient on both sides (0: TRL drops its "
                        "reference model; ours keeps one)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads in the workers (default 1; 0: torch's default, one per core)")
    parser.add_argument("--sampler", default="rlmf", choices=("hf", "rlmf"),
                        help="generator.sampler of our sides' rollouts: rlmf (our decode loop, default) or hf "
                             "(model.generate, the main job's default)")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS),
                        help="ours_padded, ours, trl (comma-separated)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per implementation")
    parser.add_argument("--out", default=None,
                        help="CSV path (default: results/bench_grpo_cpu.csv; with --quick, bench_grpo_cpu_quick.csv)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(RESULT_MARK + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return

    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_generations < 2:
        raise SystemExit(f"--num-generations={args.num_generations}: GRPO needs at least 2")
    impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    unknown = sorted(set(impls) - set(IMPLEMENTATIONS))
    if unknown:
        raise SystemExit(f"--impls: {unknown} not among {IMPLEMENTATIONS}")

    import torch
    import transformers
    import trl

    threads = args.threads or torch.get_num_threads()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        info = _build_checkpoint(Path(tmp), args)
        setting = dict(hidden_size=args.hidden_size, layers=args.layers, heads=args.heads, vocab=info["vocab"],
                       params=info["params"], num_generations=args.num_generations,
                       prompts_per_step=args.prompts_per_step, max_completion_length=args.max_completion_length,
                       beta=args.beta, steps=args.steps, warmup=args.warmup, threads=threads)
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
              f"threads={threads}")
        print(f"model: Llama, hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads, vocab "
              f"{info['vocab']}, {info['params'] / 1e6:.2f}M parameters; {info['prompts']} prompts (longest "
              f"{info['longest_prompt']} tokens with bos)")
        print(f"step: {args.prompts_per_step} prompts x {args.num_generations} completions of <= "
              f"{args.max_completion_length} tokens, beta {args.beta}; {args.warmup} warm-up + {args.steps} timed "
              "steps per implementation", flush=True)
        for impl in impls:
            spec = dict(impl=impl, checkpoint=str(Path(tmp) / "checkpoint"),
                        prompts_file=str(Path(tmp) / "prompts.json"), num_generations=args.num_generations,
                        prompts_per_step=args.prompts_per_step, max_completion_length=args.max_completion_length,
                        steps=args.steps, warmup=args.warmup, beta=args.beta, lr=args.lr, seed=args.seed,
                        threads=args.threads, sampler=args.sampler)
            row = {"impl": impl, **setting, **_measure(spec, args.timeout)}
            if "error" in row:
                row["note"] = row.pop("error")
                print(f"  {impl}: FAILED: {row['note']}\n{row.pop('stderr_tail', '')}", flush=True)
            else:
                row["note"] = f"attn {row.pop('attn')}" + ("" if row.pop("reference") else ", no reference model")
                if impl in PACKING:
                    row["note"] += f", sampler {args.sampler}"
                print(f"  {impl}: {row['s_per_step']:.3f} s/step (median of {row['steps_timed']}), "
                      f"{row['completion_tokens_per_step']:.0f} completion tokens/step, peak RSS "
                      f"{row['peak_rss_mb']:.0f} MB; process {row['process_wall_s']:.0f} s; step times "
                      f"{row['all_step_times']}", flush=True)
            rows.append(row)

    _print_table(rows, f"GRPO step on CPU ({threads} threads): {args.prompts_per_step} prompts x "
                       f"{args.num_generations} completions x <= {args.max_completion_length} tokens, "
                       f"{info['params'] / 1e6:.2f}M-parameter Llama")
    by = {r["impl"]: r for r in rows if "s_per_step" in r}
    if "ours" in by and "ours_padded" in by:
        print(f"\nours-padded s/step / ours s/step = {by['ours_padded']['s_per_step'] / by['ours']['s_per_step']:.2f}")
    if "ours" in by and "trl" in by:
        ours, ref = by["ours"], by["trl"]
        ours["speedup_vs_trl"] = ref["s_per_step"] / ours["s_per_step"]
        ours["peak_ratio_vs_trl"] = ours["peak_rss_mb"] / ref["peak_rss_mb"]
        ours["train_peak_ratio_vs_trl"] = ours["train_peak_mb"] / ref["train_peak_mb"]
        print()
        print(f"TRL s/step / ours s/step = {ours['speedup_vs_trl']:.2f}")
        print(f"ours peak / TRL peak = {ours['peak_ratio_vs_trl']:.2f} (peak RSS); "
              f"{ours['train_peak_ratio_vs_trl']:.2f} (training peak above the RSS at train start)")
        print(f"TRL CPU s/step / ours CPU s/step = {ref['cpu_s_per_step'] / ours['cpu_s_per_step']:.2f}")
        ours["sampling_speedup_vs_trl"] = ours["generated_tokens_per_s"] / ref["generated_tokens_per_s"]
        print(f"sampling alone, generated tokens/s: ours / TRL = {ours['sampling_speedup_vs_trl']:.2f} "
              f"(ours {ours['generated_tokens_per_s']:.0f}, TRL {ref['generated_tokens_per_s']:.0f}; "
              f"{100 * ours['generation_share']:.0f}% and {100 * ref['generation_share']:.0f}% of the step)")
        most = args.prompts_per_step * args.num_generations * args.max_completion_length
        print(f"completion tokens/step: ours {ours['completion_tokens_per_step']:.0f}, "
              f"TRL {ref['completion_tokens_per_step']:.0f} (at most {most})")
    out = Path(args.out) if args.out else RESULTS / ("bench_grpo_cpu_quick.csv" if args.quick else "bench_grpo_cpu.csv")
    fields = ["impl", "hidden_size", "layers", "heads", "vocab", "params", "num_generations", "prompts_per_step",
              "max_completion_length", "beta", "steps", "warmup", "threads", "steps_timed", "s_per_step",
              "s_per_step_min", "s_per_step_max", "cpu_s_per_step", "prompt_tokens_per_step",
              "completion_tokens_per_step", "completion_fill", "tokens_per_s", "generation_s_per_step",
              "generated_tokens_per_s", "generation_share", "peak_rss_mb", "base_rss_mb", "train_peak_mb",
              "speedup_vs_trl", "sampling_speedup_vs_trl", "peak_ratio_vs_trl", "train_peak_ratio_vs_trl",
              "process_wall_s", "note"]
    write_csv(out, rows, fields)
    print(f"wrote {out}; total wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
