"""Benchmark the fused log-prob ops against naive PyTorch (and Liger-Kernel on CUDA): time and peak memory.

Forward + backward of ``-logprobs.sum()`` for

- ``hidden``: ``logprobs_from_hidden(hidden [N, H], weight [V, H], labels)`` vs naive ``log_softmax(hidden @ W.T)``
  gathered at the labels, and vs Liger's fused linear cross-entropy (``reduction="sum"``, CUDA only);
- ``logits``: ``logprobs_from_logits(logits [N, V], labels)`` vs naive ``log_softmax(logits.float()).gather``;
  on CUDA also the forward's achieved bandwidth (logits bytes read per second) against the card's peak.

Every (implementation, shape) runs in a fresh subprocess. Peak memory is what the run adds on top of its inputs,
gradients included: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the run; on CPU the
process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs``) minus its resident set before the run.
The first run is measured for memory; the time is the median of ``--repeats`` further runs. Results are printed and
written to ``experiments/results/bench_logprobs_<device>.csv``.

    python experiments/bench_logprobs.py --quick
    python experiments/bench_logprobs.py --device cpu --shapes 2048x256x131072,8192x256x131072 --repeats 2
    python experiments/bench_logprobs.py --device cuda            # full grid, bf16, includes Triton and Liger

Targets checked at the end: CPU, ``logprobs_from_hidden`` at V = 128k uses <= 0.15x naive's peak memory and is no
slower; GPU, the logits forward reaches >= 85% of peak HBM bandwidth, and the hidden op beats Liger in time and
memory and uses <= 0.1x naive's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from process_stats import cpu_seconds, meminfo, peak_rss, reset_peak_rss, write_csv

GRID_N = (2048, 8192)
GRID_H = (256, 2048)
GRID_V = (32768, 131072)
QUICK_SHAPES = ((256, 64, 4096), (512, 128, 8192))
TARGET_MEMORY_RATIO = 0.15  # CPU: ours / naive peak memory at V = 128k
TARGET_BANDWIDTH = 0.85  # GPU: fraction of peak HBM bandwidth for the logits forward
TARGET_GPU_MEMORY_RATIO = 0.1  # GPU: the hidden op's peak memory / naive's
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------ one measurement


def _worker(spec: dict) -> dict:
    """Runs in its own process: build the inputs, measure one implementation on one shape."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    n, h, v = spec["n"], spec["h"], spec["v"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    if spec["op"] == "hidden":
        hidden = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device=device, dtype=dtype).requires_grad_()
        inputs = (hidden, weight)
        step = _hidden_step(spec["impl"], hidden, weight, labels)
    else:
        logits = (torch.randn(n, v, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_()
        inputs = (logits,)
        step = _logits_step(spec["impl"], logits, labels)

    def run():
        for t in inputs:
            t.grad = None
        step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        for t in inputs:
            t.grad = None
        base = reset_peak_rss()
        run()
        peak = peak_rss() - base
    grads_bytes = sum(t.grad.numel() * t.grad.element_size() for t in inputs)
    times, cpu_times = [], []
    for _ in range(spec["repeats"]):
        sync()
        start, cpu_start = time.perf_counter(), cpu_seconds()
        run()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(cpu_seconds() - cpu_start)
    out = {
        "time_ms": 1e3 * statistics.median(times),
        "cpu_ms": 1e3 * statistics.median(cpu_times),
        "peak_mb": peak / 2**20,
        "grads_mb": grads_bytes / 2**20,
    }
    if spec["op"] == "logits" and device.type == "cuda":
        out["forward_ms"] = 1e3 * _forward_time(spec["impl"], inputs[0], labels, spec["repeats"], sync)
    return out




def _hidden_step(impl, hidden, weight, labels):
    import torch

    if impl == "naive":

        def step():  # the logits die once log_softmax has its float32 copy (for float32, the same tensor)
            logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
            (-logp.sum()).backward()

    elif impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def step():
            liger_fused_linear_cross_entropy(hidden, weight, labels, reduction="sum").backward()

    else:
        from rlmf.kernels import logprobs_from_hidden

        backend = impl.split("-", 1)[1]

        def step():
            (-logprobs_from_hidden(hidden, weight, labels, backend=backend).sum()).backward()

    return step


def _logits_step(impl, logits, labels):
    import torch

    if impl == "naive":

        def step():
            logp = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
            (-logp.sum()).backward()

    else:
        from rlmf.kernels import logprobs_from_logits

        backend = impl.split("-", 1)[1]

        def step():
            (-logprobs_from_logits(logits, labels, backend=backend).sum()).backward()

    return step


def _forward_time(impl, logits, labels, repeats, sync):
    """Median forward-only time (no autograd) for the bandwidth figure."""
    import torch

    from rlmf.kernels import logprobs_from_logits

    def forward():
        with torch.no_grad():
            if impl == "naive":
                torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None])
            else:
                logprobs_from_logits(logits, labels, backend=impl.split("-", 1)[1])

    forward()
    times = []
    for _ in range(max(repeats, 5)):
        sync()
        start = time.perf_counter()
        forward()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------- the driver


def _implementations(op: str):
    return ["naive", "ours-torch", "ours-triton"] + (["liger"] if op == "hidden" else [])


CUDA_ONLY = ("ours-triton", "liger")


def _naive_bytes(op, n, h, v, itemsize):
    """Rough peak of the naive implementation: float32 [N, V] tensors alive at once, plus gradients."""
    if op == "hidden":
        return 3 * n * v * 4 + (n + v) * h * itemsize
    return 3 * n * v * 4 + n * v * itemsize


def _available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    return meminfo("MemAvailable")


def _measure(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _device_label(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return "cuda-" + re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")


def _parse_shapes(text: str):
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3:
            raise SystemExit(f"--shapes: {item!r} is not NxHxV (e.g. 2048x256x131072)")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def _print_table(rows, title):
    headers = ["op", "N", "H", "V", "impl", "time ms", "x naive", "cpu ms", "x naive", "peak MB", "x naive",
               "grads MB", "peak-grads x naive", "note"]
    lines = [
        [
            r["op"], r["n"], "-" if r["op"] == "logits" else r["h"], r["v"], r["impl"],
            _fmt(r.get("time_ms")), _fmt(r.get("time_ratio"), 2), _fmt(r.get("cpu_ms")),
            _fmt(r.get("cpu_ratio"), 2), _fmt(r.get("peak_mb")),
            _fmt(r.get("mem_ratio"), 3), _fmt(r.get("grads_mb")), _fmt(r.get("extra_mem_ratio"), 3), r.get("note", ""),
        ]
        for r in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for head in headers:
            table.add_column(head, justify="left" if head in ("op", "impl", "note") else "right")
        for line in lines:
            table.add_row(*(str(x) for x in line))
        Console(width=200).print(table)
    except ImportError:
        print(title)
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *lines)]
        for line in [headers] + lines:
            print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))


def _fmt(x, digits=1):
    return "n/a" if x is None else f"{x:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--shapes", default=None, help="comma-separated NxHxV (default: the full grid)")
    parser.add_argument("--ops", default="hidden,logits", help="hidden, logits or both")
    parser.add_argument("--quick", action="store_true", help="two small shapes, one repeat: a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the workers (0: default)")
    parser.add_argument("--peak-bandwidth", type=float, default=3.35, help="TB/s of the GPU (H100 SXM: 3.35)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--out", default=None, help="CSV path (default: results/bench_logprobs_<device>.csv)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    if args.quick:
        shapes, repeats = list(QUICK_SHAPES), 1
    else:
        grid = [(n, h, v) for n in GRID_N for h in GRID_H for v in GRID_V]
        shapes = _parse_shapes(args.shapes) if args.shapes else grid
        repeats = args.repeats
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    label = _device_label(device)
    threads = args.threads or torch.get_num_threads()
    print(f"device={label} dtype={dtype} threads={threads} repeats={repeats}")

    rows = []
    for op in ops:
        # The logits op has no H: one measurement per (N, V).
        op_shapes = shapes if op == "hidden" else sorted({(n, 0, v) for n, _, v in shapes})
        for n, h, v in op_shapes:
            naive = None
            for impl in _implementations(op):
                row = {"device": label, "dtype": dtype, "threads": threads, "op": op, "n": n, "h": h, "v": v,
                       "impl": impl}
                need = _naive_bytes(op, n, h, v, itemsize) if impl == "naive" else 0
                if device != "cuda" and impl in CUDA_ONLY:
                    row["note"] = "n/a: CUDA only"
                elif need > 0.8 * _available_bytes(device):
                    row["note"] = f"skipped: needs ~{need / 2**30:.1f} GiB"
                else:
                    spec = dict(op=op, impl=impl, n=n, h=h, v=v, device=device, dtype=dtype,
                                repeats=repeats, threads=args.threads)
                    row.update(_measure(spec, args.timeout))
                    if "error" in row:
                        row["note"] = row.pop("error")
                if impl == "naive" and "time_ms" in row:
                    naive = row
                if naive and "time_ms" in row:
                    row["time_ratio"] = row["time_ms"] / naive["time_ms"]
                    row["cpu_ratio"] = row["cpu_ms"] / naive["cpu_ms"]
                    row["mem_ratio"] = row["peak_mb"] / naive["peak_mb"]
                    # what the op adds beyond the gradients it must return (those are the same for everyone)
                    extra, naive_extra = row["peak_mb"] - row["grads_mb"], naive["peak_mb"] - naive["grads_mb"]
                    row["extra_mem_ratio"] = extra / naive_extra
                if "forward_ms" in row:
                    bandwidth = n * v * itemsize / (row["forward_ms"] / 1e3) / 1e12
                    row["forward_tb_s"] = bandwidth
                    row["bandwidth_fraction"] = bandwidth / args.peak_bandwidth
                    row["note"] = f"fwd {bandwidth:.2f} TB/s = {100 * row['bandwidth_fraction']:.0f}% of peak"
                rows.append(row)
                measured = f"{row['time_ms']:.1f} ms, peak {row['peak_mb']:.0f} MB" if "time_ms" in row else None
                print(f"  {op:6s} N={n} H={h} V={v} {impl:12s} {measured or row.get('note', '')}", flush=True)

    _print_table(rows, f"fwd+bwd of -logprobs.sum(), {label}, {dtype}")
    out = Path(args.out) if args.out else RESULTS / f"bench_logprobs_{label}.csv"
    fields = ["device", "dtype", "threads", "op", "n", "h", "v", "impl", "time_ms", "cpu_ms", "peak_mb", "grads_mb",
              "time_ratio", "cpu_ratio", "mem_ratio", "extra_mem_ratio", "forward_ms", "forward_tb_s",
              "bandwidth_fraction", "note"]
    write_csv(out, rows, fields)
    print(f"wrote {out}")
    _print_targets(rows, device)


def _print_targets(rows, device):
    print("targets:")
    found = False
    for r in rows:
        if "time_ratio" not in r:
            continue
        if device == "cpu" and r["op"] == "hidden" and r["impl"] == "ours-torch" and r["v"] >= 131072:
            found = True
            ok_mem = r["mem_ratio"] <= TARGET_MEMORY_RATIO
            ok_time = r["time_ratio"] <= 1.0
            print(f"  hidden N={r['n']} H={r['h']} V={r['v']}: memory {r['mem_ratio']:.3f}x naive "
                  f"(<= {TARGET_MEMORY_RATIO}: {'met' if ok_mem else 'MISSED'}; peak minus gradients "
                  f"{r['extra_mem_ratio']:.3f}x), time {r['time_ratio']:.2f}x naive "
                  f"(<= 1: {'met' if ok_time else 'MISSED'}; CPU time {r['cpu_ratio']:.2f}x)")
        if device == "cuda" and r["op"] == "logits" and r["impl"] == "ours-triton" and "bandwidth_fraction" in r:
            found = True
            ok = r["bandwidth_fraction"] >= TARGET_BANDWIDTH
            print(f"  logits N={r['n']} V={r['v']}: {100 * r['bandwidth_fraction']:.0f}% of peak bandwidth "
                  f"(>= {100 * TARGET_BANDWIDTH:.0f}%: {'met' if ok else 'MISSED'})")
    if device == "cuda":
        for r in rows:
            if r["op"] != "hidden" or r["impl"] != "ours-triton" or "time_ms" not in r:
                continue
            liger = next((x for x in rows if x["op"] == "hidden" and x["impl"] == "liger" and "time_ms" in x
                          and (x["n"], x["h"], x["v"]) == (r["n"], r["h"], r["v"])), None)
            if liger:
                found = True
                faster, smaller = r["time_ms"] < liger["time_ms"], r["peak_mb"] < liger["peak_mb"]
                print(f"  hidden N={r['n']} H={r['h']} V={r['v']} vs Liger: "
                      f"time {r['time_ms'] / liger['time_ms']:.2f}x ({'met' if faster else 'MISSED'}), "
                      f"memory {r['peak_mb'] / liger['peak_mb']:.2f}x ({'met' if smaller else 'MISSED'})")
            if "mem_ratio" in r:
                found = True
                ok = r["mem_ratio"] <= TARGET_GPU_MEMORY_RATIO
                print(f"  hidden N={r['n']} H={r['h']} V={r['v']}: memory {r['mem_ratio']:.3f}x naive "
                      f"(<= {TARGET_GPU_MEMORY_RATIO}: {'met' if ok else 'MISSED'})")
    if not found:
        print("  (no measured shape is covered by a target)")


if __name__ == "__main__":
    main()
