"""Benchmark one DPO training step on CPU (or a GPU): plain eager PyTorch, our Generator and TRL 1.16's DPOTrainer,
side by side.

One step, on every side, is one optimiser step on ``--batch-size`` preference pairs (8 by default): the policy's
summed completion log-probs of the chosen and rejected rows (one ``[2B, T]`` forward, chosen rows first, right-
padded), the frozen reference model's under no grad, the DPO loss ``-logsigmoid(beta * margin)`` (``--beta`` 0.1),
backward, gradient-norm clipping at 1.0 and one AdamW step (constant learning rate, no weight decay).

- ``eager``: a plain PyTorch loop over the very batches :class:`rlmf.data.PairCollator` makes for ours:
  ``model(input_ids, attention_mask).logits`` over the full vocabulary for every position, ``log_softmax`` (float32),
  ``gather`` at the labels, prompt and padding masked out, summed per row; the same for the reference under
  ``no_grad``; ``torch.optim.AdamW``. Only the log-prob computation differs from ours.
- ``ours``: :class:`rlmf.modules.generator.Generator` (``loss_name="dpo"``, ``reference_mode="frozen"``, a frozen
  copy of the policy as reference, ``warmup_ratio=0``) under a Lightning ``Trainer`` (``gradient_clip_val=1.0``,
  32-bit) over an :class:`rlmf.data.alignment.AlignmentDataModule` of :func:`rlmf.data.tokenize_pairs` features,
  built as the align stage builds them (:func:`rlmf.modules.build.build_aligned_generator`) from
  ``rlmf.data.load_pairs``. Its log-probs run the decoder, then the LM head only on the completion positions
  through the fused ``logprobs_from_hidden`` (no ``[tokens, vocab]`` logits).
  ``ours`` runs the decoder (policy and reference) on packed rows, the default ``generator.packing=shared_prompt``
  (:mod:`rlmf.packing`): each pair's prompt once, then its chosen and its rejected completion, no padding, under a
  mask that keeps the rows apart; ``ours_padded`` on the padded ``[2B, T]`` rows (``packing=none``), as before.
- ``trl``: ``trl.DPOTrainer`` with ``DPOConfig(use_cpu=True, per_device_train_batch_size=B, max_length=...,
  truncation_mode="keep_start", loss_type=["sigmoid"], beta=..., precompute_ref_log_probs=False,
  gradient_checkpointing=False, bf16=False, optim="adamw_torch", lr_scheduler_type="constant", max_grad_norm=1.0,
  train_sampling_strategy="sequential")``; the model is given as the checkpoint path, so TRL loads the policy and
  builds its own frozen reference from the same files. TRL's defaults that differ (``gradient_checkpointing=True``,
  ``bf16=True``, the fused AdamW) are set to match the other two. TRL 1.16 has no ``max_prompt_length``: it cuts
  the whole sequence to ``max_length`` keeping its start; the data is generated so that nothing is cut on any side.
  Note that TRL 1.16 does not materialise full logits either: it patches the model with a chunked LM head
  (``trl.trainer.utils.add_fused_lm_head``) which, on CPU, scores every position (prompt and padding included) in
  vocabulary chunks of 32k and also computes the policy's entropy, mean logit and top-1 agreement for its metrics.

The data: a local HH-like preference file (``chosen`` / ``rejected`` full ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
transcripts sharing the prompt, the Anthropic HH-RLHF layout), generated deterministically from ``--seed``: English
function words and seeded pseudo-words drawn with Zipf frequencies, multi-turn prompts, then each text cut at a word
boundary to a sampled token length, so that prompts average about 77 tokens (bos included, at most
``--max-prompt-length``), chosen completions about 37 and rejected about 47 (eos included), and prompt + completion
fits ``--max-length``: like HH at these limits, and nothing is truncated on any side. A byte-level BPE tokenizer is
trained on the text (:func:`rlmf.models.train_tokenizer`, asked for ``--vocab`` entries; a synthetic corpus gives
fewer); the model's embedding / LM head is built with ``--vocab`` rows anyway (30000; 128256 with ``--shape large``),
which is what sets the head's cost. Model and tokenizer are saved once with ``save_pretrained``; every side loads
that checkpoint and reads the same JSONL.

The same batches on every side: ours shuffles through its seeded :class:`rlmf.data.loading.EpochBatchSampler`; the
driver computes that order and gives the pairs to the eager loop and to TRL (sequential sampler) in it. Before timing,
the TRL worker checks that its tokenised data set is token-for-token ours (``<s>`` + prompt; TRL appends the eos as
text, which maps to the eos id), and after the runs the driver checks that every side saw the same real-token counts
step by step.

Each implementation runs in a fresh subprocess with ``--threads`` torch threads (1 by default, so a machine shared
with other jobs distorts less; ``--threads 0`` keeps torch's default). Step time: from the start of the step (batch
already collated) to the end of the optimiser step: Lightning's ``on_train_batch_start`` / ``_end`` (ours), the
``TrainerCallback``'s ``on_step_begin`` / ``on_step_end`` (TRL), the loop itself (eager). The first ``--warmup``
steps are dropped and the median of the rest is reported, with the process's CPU time per step beside it.
Tokens/s is the real (non-padding) tokens of the chosen and rejected rows (``attention_mask.sum()`` of the ``[2B, T]``
batch: the prompt counts once per row) of the timed steps over their summed step time, the same for all three. Peak
memory is the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs`` when training starts, so it
covers the training steps: both models, activations, gradients, AdamW state), absolute (libraries included) and above
the resident set at that reset. The absolute peak is the comparable one: the weights ``from_pretrained`` memory-maps
become resident only when first touched, which for ours and eager happens before training (the reference is a
``deepcopy`` of the policy) but for TRL, whose reference is loaded from the files, inside the first step, so TRL's
"above base" figure also counts its weights. Results are printed (a Markdown table, then the ratios beside the
issue's targets, which are never asserted) and written to ``experiments/results/bench_step_<device>_<shape>.csv``
(``_bf16`` added under ``--precision bf16-mixed``).

    python experiments/bench_step.py --quick                  # a tiny model, a few steps: well under 2 minutes
    python experiments/bench_step.py                          # 4 layers, hidden 256, 30k vocabulary; 2 + 6 steps
    python experiments/bench_step.py --shape large --warmup 1 --steps 2     # 8 layers, hidden 1024, 128k vocabulary
    python experiments/bench_step.py --impls ours,eager --steps 10         # a subset
    python experiments/bench_step.py --threads 0               # torch's own thread count
    python experiments/bench_step.py --device cuda --shape large --precision bf16-mixed --impls eager,ours_padded,ours

On a GPU (``--device cuda``) every side runs there; each step mark waits for the GPU (``torch.cuda.synchronize``),
and the memory compared is the peak of ``torch.cuda.max_memory_allocated`` over training. The CPU targets do not
apply there. TRL is timed only where it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from process_stats import StepTimer, lightning_step_timer, meminfo, run_worker, transformers_step_timer, write_csv

RESULTS = Path(__file__).resolve().parent / "results"
IMPLEMENTATIONS = ("eager", "ours_padded", "ours", "trl")
LABELS = {"eager": "plain eager PyTorch (full logits, log_softmax, gather)",
          "ours_padded": "RLMF `Generator`, padded rows (`generator.packing=none`)",
          "ours": "RLMF `Generator`, shared prompts, no padding (default `packing=shared_prompt`)",
          "trl": "TRL 1.16 `DPOTrainer`"}
# The decoder layout of each of our sides (rlmf.packing.PACKINGS).
PACKING = {"ours_padded": "none", "ours": "shared_prompt"}
RESULT_MARK = "BENCH_STEP_RESULT "
SHAPES = {
    "small": dict(hidden_size=256, layers=4, heads=4, vocab=30000, steps=6, warmup=2),
    "large": dict(hidden_size=1024, layers=8, heads=16, vocab=128256, steps=6, warmup=2),
}
QUICK = dict(hidden_size=64, layers=2, heads=2, vocab=8192, steps=3, warmup=1)
# The targets, on CPU (printed beside the measured ratios, never asserted).
TARGETS = {
    "small": {"ours_vs_eager_throughput": (">=", 2.5), "ours_vs_trl_throughput": (">=", 6.0),
              "ours_over_trl_peak": ("<=", 0.25)},
    "large": {"ours_vs_eager_throughput": (">=", 2.0), "ours_over_eager_peak": ("<=", 0.3)},
}
# Mean token lengths of Anthropic HH-RLHF at max_length 256 / max_prompt_length ~160 (bos and eos included).
HH_MEANS = {"prompt": 77, "chosen": 37, "rejected": 47}


# ------------------------------------------------------------------------------------------ the HH-like data

FUNCTION_WORDS = (
    "the to and of a I you it that is in for what do be can have this not with are on my your how about if they "
    "but me would or so some an as at there like just we was know think no one get all make want should more help "
    "any can't don't it's also other good people because could their them from by will when which very why where "
    "really many things time way here need who sure yes does then these well much even most only than been into "
    "something out up has our those did go say use try find work him her his she he were had its well same first "
    "always never often maybe probably usually different important best better great right thing lot kind feel"
).split()


def _pseudo_words(rng: random.Random, count: int) -> list:
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br",
              "ch", "cl", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "sl", "sp", "st", "str", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "ou", "oo", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "ng", "nd", "st", "ck", "rt", "nt", "ss", "x"]
    words, seen = [], set(FUNCTION_WORDS)
    while len(words) < count:
        syllables = rng.choices((1, 2, 3, 4), weights=(3, 5, 3, 1))[0]
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables))
        if 2 <= len(word) <= 14 and word not in seen:
            seen.add(word)
            words.append(word)
    return words


class _Words:
    """Zipf-distributed words: the function words first, then ``count`` seeded pseudo-words."""

    def __init__(self, rng: random.Random, count: int = 20000):
        self.rng = rng
        self.vocab = list(FUNCTION_WORDS) + _pseudo_words(rng, count)
        self.cum = list(_accumulate(1.0 / (rank + 2.7) ** 1.07 for rank in range(len(self.vocab))))

    def sentence(self, enders: str) -> list:
        """A sentence as text units: ``" Word"``, ``" word"``, ``","``, ..., then one of ``enders``."""
        n = self.rng.randint(5, 18)
        words = self.rng.choices(self.vocab, cum_weights=self.cum, k=n)
        units = []
        for i, w in enumerate(words):
            units.append(" " + (w[0].upper() + w[1:] if i == 0 else w))
            if 0 < i < n - 2 and self.rng.random() < 0.07:
                units.append(",")
        units.append(self.rng.choice(enders))
        return units

    def utterance(self, sentences: int, enders: str) -> list:
        return [u for _ in range(sentences) for u in self.sentence(enders)]


def _accumulate(values):
    total = 0.0
    for v in values:
        total += v
        yield total


def _gamma_length(rng: random.Random, mean: float, shape: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(rng.gammavariate(shape, mean / shape)))))


def _raw_pairs(count: int, seed: int) -> list:
    """Unfitted pairs: prompt units (turn markers and words, ending before the final ``"\\n\\nAssistant:"``), chosen and
    rejected units, and the sampled token-length targets (bos / eos included)."""
    rng = random.Random(seed)
    words = _Words(rng)
    out = []
    for _ in range(count):
        targets = {"prompt": _gamma_length(rng, 84, 2.0, 12, 10**6),
                   "chosen": _gamma_length(rng, 37, 1.6, 3, 10**6),
                   "rejected": _gamma_length(rng, 48, 1.6, 3, 10**6)}
        turns = max(1, min(4, 1 + int(rng.expovariate(1.0) * targets["prompt"] / 90)))
        prompt = []
        for t in range(turns):
            if t:
                prompt += ["\n\nAssistant:"] + words.utterance(rng.randint(1, 4), ".!")
            prompt += ["\n\nHuman:"] + words.utterance(rng.randint(1, 3), "?.?")
        # Long enough to be cut down to any target: extra sentences past the sampled length.
        while len(prompt) < 2 * targets["prompt"] + 20:
            prompt += words.sentence("?.")
        chosen = words.utterance(max(2, targets["chosen"] // 6), ".!.")
        rejected = words.utterance(max(2, targets["rejected"] // 6), ".!.")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "targets": targets})
    return out


def _longest_prefix(units: list, fits) -> int:
    """The most leading units whose joined text ``fits`` (token counts grow with the prefix); at least 1."""
    low, high = 1, len(units)
    while low < high:
        mid = (low + high + 1) // 2
        if fits("".join(units[:mid])):
            low = mid
        else:
            high = mid - 1
    return low


def _fit_pairs(raw: list, tokenizer, max_length: int, max_prompt_length: int) -> list:
    """HH transcripts cut at word boundaries to their token targets: ``[bos] prompt`` <= ``max_prompt_length`` and
    ``[bos] prompt completion [eos]`` <= ``max_length``, so no side truncates anything."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rows = []
    for r in raw:
        t = r["targets"]
        prompt_budget = min(t["prompt"], max_prompt_length) - 1  # the bos
        k = _longest_prefix(r["prompt"], lambda text: count(text + "\n\nAssistant:") <= prompt_budget)
        while k > 2 and r["prompt"][k - 1].startswith("\n\n"):  # never end on a turn marker
            k -= 1
        prompt = "".join(r["prompt"][:k]) + "\n\nAssistant:"
        room = max_length - 1 - count(prompt) - 1  # bos, eos
        completions = {}
        for name in ("chosen", "rejected"):
            budget = max(1, min(t[name] - 1, room))
            k = _longest_prefix(r[name], lambda text: count(text) <= budget)
            completions[name] = "".join(r[name][:k])
        if completions["chosen"] == completions["rejected"]:
            continue
        rows.append({"chosen": prompt + completions["chosen"], "rejected": prompt + completions["rejected"]})
    return rows


def build_data(directory: Path, args) -> dict:
    """Write the HH-like JSONL, train the tokenizer, save the checkpoint; return what the workers and table need."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlmf.data import PairCollator, load_pairs, tokenize_pairs, write_jsonl
    from rlmf.data.loading import EpochBatchSampler
    from rlmf.models import save_generator, train_tokenizer

    needed = (args.warmup + args.steps) * args.batch_size
    raw = _raw_pairs(max(1024, needed), args.seed)
    corpus = ["".join(r["prompt"] + r["chosen"]) for r in raw] + ["".join(r["rejected"]) for r in raw]
    tokenizer = train_tokenizer(corpus, vocab_size=args.vocab)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = _fit_pairs(raw, tokenizer, args.max_length, args.max_prompt_length)
    data_file = directory / "hh_like.jsonl"
    write_jsonl(data_file, rows)

    # As stage_align reads a preference file: load_pairs, tokenize_pairs; the first `needed` pairs are trained on.
    pairs, _ = load_pairs(data_file)
    features, drops = tokenize_pairs(pairs, tokenizer, args.max_length, args.max_prompt_length)
    if drops.dropped or drops.prompt_truncated or drops.completion_truncated:
        raise RuntimeError(f"the generated pairs were cut or dropped by tokenize_pairs: {drops}")
    if len(pairs) < needed:
        raise RuntimeError(f"{len(pairs)} pairs generated, {needed} needed")
    lengths = {"prompt": [len(f["prompt_ids"]) for f in features],
               "chosen": [len(f["chosen_ids"]) for f in features],
               "rejected": [len(f["rejected_ids"]) for f in features]}

    # The order ours trains in (RowsDataModule's sampler at epoch 0), for the eager loop and TRL.
    train = features[:needed]
    sampler = EpochBatchSampler(len(train), args.batch_size, args.seed, shuffle=True,
                                drop_last=len(train) > args.batch_size)
    batches = sampler.epoch_batches(0)[: args.warmup + args.steps]
    order = [i for batch in batches for i in batch]
    collate = PairCollator(tokenizer.pad_token_id)
    tokens_per_step = [int(collate([train[i] for i in b])["attention_mask"].sum()) for b in batches]
    widths = [int(collate([train[i] for i in b])["input_ids"].shape[1]) for b in batches]
    with open(directory / "order.json", "w") as f:
        json.dump({"order": order, "features": [train[i] for i in order]}, f)

    config = LlamaConfig(  # build_tiny_generator's model, with the embedding sized --vocab rather than len(tokenizer)
        vocab_size=args.vocab, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.max_length + 8, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
    save_generator(model, tokenizer, directory / "checkpoint")
    return {"data_file": str(data_file), "pairs": len(pairs), "tokenizer_vocab": len(tokenizer),
            "params": sum(p.numel() for p in model.parameters()),
            "mean_lengths": {k: sum(v) / len(v) for k, v in lengths.items()},
            "max_lengths": {k: max(v) for k, v in lengths.items()},
            "tokens_per_step": tokens_per_step, "widths": widths, "boundary_mismatch": drops.boundary_mismatch}


# ------------------------------------------------------------------------------------------ memory and CPU time




class StepLog(StepTimer):
    """What a worker records per step, and the peak memory of its training, whichever loop drives it."""

    def __init__(self, device: str = "cpu", profiler=None):
        super().__init__(device)
        self.tokens = []
        self.profiler = profiler  # a torch.profiler.profile on a schedule that skips the warm-up steps, or None

    def step_end(self):
        super().step_end()
        if self.profiler is not None:
            self.profiler.step()

    def summary(self, warmup: int) -> dict:
        if len(self.times) <= warmup:
            raise RuntimeError(f"only {len(self.times)} steps ran; need more than --warmup={warmup}")
        if len(self.tokens) != len(self.times):
            raise RuntimeError(f"token counts for {len(self.tokens)} steps, times for {len(self.times)}")
        times, cpu, tokens = self.times[warmup:], self.cpu_times[warmup:], self.tokens[warmup:]
        return {
            "steps_timed": len(times),
            "s_per_step": statistics.median(times),
            "s_per_step_min": min(times),
            "s_per_step_max": max(times),
            "cpu_s_per_step": statistics.median(cpu),
            "tokens_per_step": sum(tokens) / len(tokens),
            "tokens_per_s": sum(tokens) / sum(times),
            "peak_rss_mb": self.peak_rss / 2**20,
            "base_rss_mb": self.base_rss / 2**20,
            "train_peak_mb": (self.peak_rss - self.base_rss) / 2**20,
            "all_step_times": [round(t, 4) for t in self.times],
            "all_step_tokens": self.tokens,
            **({"peak_gpu_mb": self.peak_gpu / 2**20, "gpu_train_peak_mb": (self.peak_gpu - self.base_gpu) / 2**20}
               if self.cuda else {}),
        }


# ------------------------------------------------------------------------------------------ the three workers


def _worker(spec: dict) -> dict:
    """Runs in its own process: ``warmup + steps`` DPO steps with one implementation, timing each."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    profiler = _profiler(spec) if spec.get("profile") else None
    log = StepLog(spec["device"], profiler)
    run = {"eager": _run_eager, "ours_padded": _run_ours, "ours": _run_ours, "trl": _run_trl}[spec["impl"]]
    if profiler is not None:
        profiler.start()
    extra = run(spec, log)
    if profiler is not None:
        profiler.stop()
    out = log.summary(spec["warmup"])
    out.update(extra, threads=torch.get_num_threads())
    return out


def _profiler(spec: dict):
    """torch.profiler over the timed steps only (the warm-up steps, which compile and grow the allocator, are
    skipped; the last warm-up step warms the profiler up)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec["device"] == "cuda" else [])
    warmup = min(1, spec["warmup"])
    return profile(activities=activities, on_trace_ready=lambda done: _write_profile(done, spec),
                   schedule=schedule(wait=spec["warmup"] - warmup, warmup=warmup, active=spec["steps"], repeat=1))


def _write_profile(profiler, spec: dict) -> None:
    """``<profile dir>/<impl>.txt``: the operators by their own CPU time, and by their own GPU time on a GPU."""
    averages = profiler.key_averages()
    sorts = ["self_cpu_time_total"] + (["self_device_time_total"] if spec["device"] == "cuda" else [])
    path = Path(spec["profile"]) / f"{spec['impl']}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{spec['impl']}: {spec['steps']} timed steps after {spec['warmup']} warm-up, {spec['device']}, "
                f"{spec['precision']}\n")
        for key in sorts:
            f.write(f"\nsorted by {key}\n{averages.table(sort_by=key, row_limit=30, max_name_column_width=70)}\n")


def _ordered_features(spec: dict) -> list:
    with open(spec["order_file"]) as f:
        return json.load(f)["features"]


def _run_eager(spec: dict, log: StepLog) -> dict:
    import torch
    import torch.nn.functional as F

    from rlmf.data import PairCollator
    from rlmf.models import load_generator
    from rlmf.reference import frozen_copy

    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    model, tokenizer = load_generator(spec["checkpoint"])
    model.to(device)
    reference = frozen_copy(model)
    model.train()
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=spec["precision"] == "bf16-mixed")
    features = _ordered_features(spec)
    collate = PairCollator(tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    b, beta = spec["batch_size"], spec["beta"]

    def summed_logps(net, batch):
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(-1)

    log.train_start()
    for step in range(spec["warmup"] + spec["steps"]):
        batch = collate(features[step * b: (step + 1) * b])
        log.tokens.append(int(batch["attention_mask"].sum()))
        log.step_start()
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            policy = summed_logps(model, batch)
            with torch.no_grad():
                ref = summed_logps(reference, batch)
        margin = (policy[:b] - ref[:b]) - (policy[b:] - ref[b:])
        loss = -F.logsigmoid(beta * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.step_end()
    log.train_end()
    return {"attn": model.config._attn_implementation}


def _run_ours(spec: dict, log: StepLog) -> dict:
    import lightning as L

    from rlmf.data import load_pairs, tokenize_pairs
    from rlmf.data.alignment import AlignmentDataModule
    from rlmf.config import compose_config
    from rlmf.logprobs import packing_problem
    from rlmf.models import load_generator
    from rlmf.modules.build import build_aligned_generator
    from rlmf.reference import prepare_reference

    L.seed_everything(spec["seed"], verbose=False)
    model, tokenizer = load_generator(spec["checkpoint"])
    pairs, _ = load_pairs(spec["data_file"])
    needed = (spec["warmup"] + spec["steps"]) * spec["batch_size"]
    features, _ = tokenize_pairs(pairs[:needed], tokenizer, spec["max_length"], spec["max_prompt_length"])
    with open(spec["order_file"]) as f:
        expected = json.load(f)
    if [features[i] for i in expected["order"]] != expected["features"]:
        raise RuntimeError("ours tokenised the pairs differently from the driver")
    policy, reference = prepare_reference("frozen", model)
    cfg = compose_config("algo=dpo", f"algo.loss.beta={spec['beta']}", f"algo.optim.lr={spec['lr']}",
                         "algo.optim.weight_decay=0", "algo.optim.warmup_ratio=0",
                         f"generator.packing={PACKING[spec['impl']]}")
    module = build_aligned_generator(cfg, policy, tokenizer, reference, "frozen")  # as the align stage builds it
    if spec["impl"] == "ours" and packing_problem(policy) is not None:
        raise RuntimeError(f"packing fell back to padded rows: {packing_problem(policy)}")
    data = AlignmentDataModule(features, [], "paired", tokenizer.pad_token_id, spec["max_length"],
                               spec["batch_size"], seed=spec["seed"])

    timer = lightning_step_timer(log, lambda trainer, batch: log.tokens.append(int(batch["attention_mask"].sum())))

    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(max_steps=spec["warmup"] + spec["steps"],
                            accelerator="gpu" if spec["device"] == "cuda" else "cpu", devices=1,
                            precision=spec["precision"], gradient_clip_val=1.0, logger=False,
                            enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, log_every_n_steps=1, callbacks=[timer], default_root_dir=root,
                            use_distributed_sampler=False)
        trainer.fit(module, datamodule=data)
    return {"attn": model.config._attn_implementation}


def _run_trl(spec: dict, log: StepLog) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from rlmf.data import load_pairs

    tokenizer = AutoTokenizer.from_pretrained(spec["checkpoint"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs, _ = load_pairs(spec["data_file"])
    with open(spec["order_file"]) as f:
        expected = json.load(f)
    ordered = [pairs[i] for i in expected["order"]]
    # Our tokenisation puts the bos id before each prompt; TRL tokenises the prompt text as is, so the text carries it.
    dataset = Dataset.from_dict({"prompt": [tokenizer.bos_token + p.prompt for p in ordered],
                                 "chosen": [p.chosen for p in ordered],
                                 "rejected": [p.rejected for p in ordered]})

    seen = {"tokens": 0}

    def count_tokens(logs):
        # logging_steps=1: one log per optimiser step; num_tokens is TRL's running attention_mask.sum().
        if "num_tokens" in logs:
            log.tokens.append(int(logs["num_tokens"] - seen["tokens"]))
            seen["tokens"] = logs["num_tokens"]

    timer = transformers_step_timer(log, count_tokens)

    with tempfile.TemporaryDirectory() as root:
        config = DPOConfig(
            output_dir=root, use_cpu=spec["device"] == "cpu", seed=spec["seed"],
            max_steps=spec["warmup"] + spec["steps"],
            per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
            max_length=spec["max_length"], truncation_mode="keep_start", pad_to_multiple_of=None,
            loss_type=["sigmoid"], beta=spec["beta"], precompute_ref_log_probs=False, disable_dropout=True,
            learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch", gradient_checkpointing=False,
            bf16=spec["precision"] == "bf16-mixed", fp16=False,
            model_init_kwargs={"dtype": torch.float32}, train_sampling_strategy="sequential",
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
        trainer = DPOTrainer(model=spec["checkpoint"], args=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        prepared = trainer.train_dataset
        theirs = [{k: prepared[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                  for i in range(len(prepared))]
        if theirs != expected["features"]:
            bad = next(i for i, (a, b) in enumerate(zip(theirs, expected["features"])) if a != b) \
                if len(theirs) == len(expected["features"]) else "count"
            raise RuntimeError(f"TRL tokenised the pairs differently from ours (first differing row: {bad})")
        trainer.train()
        attn = trainer.model.config._attn_implementation
        has_reference = trainer.ref_model is not None
    return {"attn": attn, "reference": has_reference}


# ----------------------------------------------------------------------------------------------- the driver


def _measure(spec: dict, timeout: float) -> dict:
    return run_worker(os.path.abspath(__file__), spec, RESULT_MARK, timeout)


def _eager_bytes(args, params: int, width: int) -> int:
    """Rough peak of the eager side: policy, reference, gradients and two AdamW moments, plus four float32
    ``[2B, T, V]`` tensors (logits, their log_softmax and the two gradients) alive at once."""
    return 5 * 4 * params + 4 * (2 * args.batch_size) * width * args.vocab * 4


def _print_table(rows, title, labels=LABELS):
    """The timing table: one row per side (``labels`` names them), its failure note where it did not run."""
    gpu = any("peak_gpu_mb" in r for r in rows)
    headers = ["implementation", "s/step (median)", "tokens/s", "peak RSS (MB)", "train peak above base (MB)",
               *(["peak GPU (MB)"] if gpu else []), "CPU s/step", "tokens/step", "note"]
    print(f"\n{title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for r in rows:
        if "s_per_step" not in r:
            cells = [labels[r["impl"]]] + ["n/a"] * (len(headers) - 2) + [r.get("note", "")]
        else:
            cells = [labels[r["impl"]], f"{r['s_per_step']:.3f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['peak_rss_mb']:.0f}", f"{r['train_peak_mb']:.0f}",
                     *([f"{r['peak_gpu_mb']:.0f}"] if gpu else []), f"{r['cpu_s_per_step']:.2f}",
                     f"{r['tokens_per_step']:.0f}", r.get("note", "")]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def _ratio_lines(by: dict, shape: str, applies: bool, memory: str = "peak_rss_mb") -> dict:
    """Throughput and peak-memory ratios of ours against each other side; ``memory``: the peak compared (the host's
    ``peak_rss_mb``, or ``peak_gpu_mb`` on a GPU, where the host's RSS holds only libraries and staging)."""
    ratios = {}
    train = "gpu_train_peak_mb" if memory == "peak_gpu_mb" else "train_peak_mb"
    peak = "peak GPU memory" if memory == "peak_gpu_mb" else "peak RSS"
    ours = by.get("ours")
    if ours is None:
        return ratios
    if "ours_padded" in by:
        ratios["ours_vs_padded_throughput"] = ours["tokens_per_s"] / by["ours_padded"]["tokens_per_s"]
        ratios["ours_over_padded_peak"] = ours[memory] / by["ours_padded"][memory]
    if "eager" in by:
        ratios["ours_vs_eager_throughput"] = ours["tokens_per_s"] / by["eager"]["tokens_per_s"]
        ratios["ours_over_eager_peak"] = ours[memory] / by["eager"][memory]
        ratios["ours_over_eager_train_peak"] = ours[train] / by["eager"][train]
    if "trl" in by:
        ratios["ours_vs_trl_throughput"] = ours["tokens_per_s"] / by["trl"]["tokens_per_s"]
        ratios["ours_over_trl_peak"] = ours[memory] / by["trl"][memory]
        ratios["ours_over_trl_train_peak"] = ours[train] / by["trl"][train]
    targets = TARGETS.get(shape, {})
    names = {
        "ours_vs_padded_throughput": ("ours tokens/s / ours-padded tokens/s", None),
        "ours_over_padded_peak": (f"ours {peak} / ours-padded {peak}", None),
        "ours_vs_eager_throughput": ("ours tokens/s / eager tokens/s", None),
        "ours_vs_trl_throughput": ("ours tokens/s / TRL tokens/s", None),
        "ours_over_trl_peak": (f"ours {peak} / TRL {peak}", "ours_over_trl_train_peak"),
        "ours_over_eager_peak": (f"ours {peak} / eager {peak}", "ours_over_eager_train_peak"),
    }
    where = f"the issue's {shape}-shape CPU target" if applies else f"{shape}-shape target, not this run's shape"
    print()
    for key, (text, train_key) in names.items():
        if key not in ratios:
            continue
        line = f"{text} = {ratios[key]:.2f}"
        if train_key and train_key in ratios:
            line += f" (training peak above base: {ratios[train_key]:.2f})"
        if key in targets:
            op, value = targets[key]
            line += f"   [target {op} {value} ({where})"
            if applies:
                met = ratios[key] >= value if op == ">=" else ratios[key] <= value
                line += f": {'met' if met else 'MISSED'}"
            line += "]"
        print(line)
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="small",
                        help="small: 4 layers, hidden 256, 30k vocabulary; large: 8 layers, hidden 1024, 128k")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model (2 layers, hidden 64, 8k vocabulary) and 1 + 3 steps: a smoke run "
                             "(explicit options still win)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 6; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; --quick 1)")
    parser.add_argument("--hidden-size", type=int, default=None, help="the MLP is 4x wider")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None,
                        help="rows of the embedding / LM head (the tokenizer is trained up to this size)")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=160)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads in the workers (default 1; 0: torch's default, one per core)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: every side on the GPU, each step timed to its last kernel, peak GPU memory "
                             "(torch.cuda.max_memory_allocated) beside the host's peak RSS")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true",
                        help="Lightning's precision for ours; autocast to bfloat16 for eager, bf16=True for TRL")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS),
                        help="eager, ours_padded, ours, trl (comma-separated)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per implementation")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also write torch.profiler tables of the timed steps to DIR/<impl>.txt (the profiler's "
                             "own overhead is in those steps' times)")
    parser.add_argument("--out", default=None,
                        help="CSV path (default: results/bench_step_<device>_<shape>.csv, _quick with --quick)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(RESULT_MARK + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return

    for key, value in {**SHAPES[args.shape], **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    unknown = sorted(set(impls) - set(IMPLEMENTATIONS))
    if unknown:
        raise SystemExit(f"--impls: {unknown} not among {IMPLEMENTATIONS}")
    custom = any(getattr(args, k) != v for k, v in SHAPES[args.shape].items() if k not in ("steps", "warmup"))
    applies = not args.quick and not custom and args.batch_size == 8 and args.max_length == 256

    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.precision == "bf16-mixed" and args.device == "cpu":
        raise SystemExit("--precision bf16-mixed: CPU runs are timed in 32-true only")
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        if "trl" in impls:
            raise SystemExit("--impls trl: TRL is not installed here (drop it from --impls)")
        trl_version = "not installed"
    applies = applies and args.device == "cpu"
    where = "CPU" if args.device == "cpu" else torch.cuda.get_device_name(0)

    threads = args.threads or torch.get_num_threads()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        info = build_data(Path(tmp), args)
        means, longest = info["mean_lengths"], info["max_lengths"]
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}; "
              f"{where}, {args.precision}; threads={threads}; load {os.getloadavg()[0]:.2f} "
              f"{os.getloadavg()[1]:.2f} on {os.cpu_count()} CPUs")
        print(f"model: Llama, hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads, vocab "
              f"{args.vocab} (tokenizer {info['tokenizer_vocab']}), {info['params'] / 1e6:.1f}M parameters")
        print(f"data: {info['pairs']} HH-like pairs; mean tokens prompt {means['prompt']:.1f} / chosen "
              f"{means['chosen']:.1f} / rejected {means['rejected']:.1f} (HH at these limits: "
              f"{HH_MEANS['prompt']} / {HH_MEANS['chosen']} / {HH_MEANS['rejected']}); longest {longest['prompt']} / "
              f"{longest['chosen']} / {longest['rejected']}; nothing truncated; prompt/completion boundary differs "
              f"from joint tokenisation in {info['boundary_mismatch']} rows")
        print(f"step: {args.batch_size} pairs, max_length {args.max_length}, beta {args.beta}; {args.warmup} warm-up "
              f"+ {args.steps} timed steps per implementation; padded widths {info['widths']}; real tokens per step "
              f"{info['tokens_per_step']}", flush=True)
        for impl in impls:
            row = {"impl": impl, "shape": "quick" if args.quick else args.shape, "hidden_size": args.hidden_size,
                   "layers": args.layers, "heads": args.heads, "vocab": args.vocab,
                   "tokenizer_vocab": info["tokenizer_vocab"], "params": info["params"],
                   "batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps,
                   "warmup": args.warmup, "threads": threads, "device": args.device, "precision": args.precision}
            need = _eager_bytes(args, info["params"], max(info["widths"])) \
                if impl == "eager" and args.device == "cpu" else 0
            if need > 0.8 * meminfo("MemAvailable"):
                row["note"] = f"skipped: needs ~{need / 2**30:.1f} GiB"
                print(f"  {impl}: {row['note']}", flush=True)
                rows.append(row)
                continue
            spec = dict(impl=impl, checkpoint=str(Path(tmp) / "checkpoint"), data_file=info["data_file"],
                        order_file=str(Path(tmp) / "order.json"), batch_size=args.batch_size,
                        max_length=args.max_length, max_prompt_length=args.max_prompt_length, steps=args.steps,
                        warmup=args.warmup, beta=args.beta, lr=args.lr, seed=args.seed, threads=args.threads,
                        device=args.device, precision=args.precision,
                        profile=str(Path(args.profile).resolve()) if args.profile else None)
            row.update(_measure(spec, args.timeout))
            if "error" in row:
                row["note"] = row.pop("error")
                print(f"  {impl}: FAILED: {row['note']}\n{row.pop('stderr_tail', '')}", flush=True)
            else:
                same = row.pop("all_step_tokens") == info["tokens_per_step"]
                row["same_batches"] = same
                row["note"] = f"attn {row.pop('attn')}" + ("" if same else "; DIFFERENT batches")
                if row.pop("reference", True) is False:
                    row["note"] += "; no reference model"
                print(f"  {impl}: {row['s_per_step']:.3f} s/step (median of {row['steps_timed']}), "
                      f"{row['tokens_per_s']:.0f} tokens/s, peak RSS {row['peak_rss_mb']:.0f} MB "
                      f"({row['train_peak_mb']:.0f} above base)"
                      + (f", peak GPU {row['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in row else "")
                      + f"; process {row['process_wall_s']:.0f} s; "
                      f"step times {row['all_step_times']}", flush=True)
            rows.append(row)

    shape_text = "quick (tiny)" if args.quick else args.shape + (" (custom)" if custom else "")
    on = (f"CPU ({threads} thread{'s' if threads > 1 else ''})" if args.device == "cpu"
          else f"{where}, {args.precision}")
    _print_table(rows, f"DPO step on {on}, shape {shape_text}: "
                       f"{args.batch_size} pairs, max length {args.max_length}, {info['params'] / 1e6:.1f}M-parameter "
                       f"Llama ({args.layers} layers, hidden {args.hidden_size}, vocab {args.vocab}); median of "
                       f"{args.steps} steps after {args.warmup} warm-up")
    by = {r["impl"]: r for r in rows if "s_per_step" in r}
    ratios = _ratio_lines(by, args.shape, applies, "peak_gpu_mb" if args.device == "cuda" else "peak_rss_mb")
    if not applies:
        print(f"(the issue's targets are for the default {args.shape} shape; this run differs, so they are shown "
              "for reference only)")
    if args.warmup == 0 or args.steps < 3:
        print(f"(only {args.steps} timed step(s) after {args.warmup} warm-up: the first step pays one-off costs "
              "(first touch of the weights and optimiser state, allocator growth), so treat the times as an estimate)")
    if "ours" in by:
        by["ours"].update(ratios)
    suffix = "" if args.precision == "32-true" else "_bf16"
    out = Path(args.out) if args.out else RESULTS / (
        f"bench_step_{args.device}_{'quick' if args.quick else args.shape}{suffix}.csv")
    fields = ["impl", "shape", "hidden_size", "layers", "heads", "vocab", "tokenizer_vocab", "params", "batch_size",
              "max_length", "steps", "warmup", "threads", "steps_timed", "s_per_step", "s_per_step_min",
              "s_per_step_max", "cpu_s_per_step", "tokens_per_step", "tokens_per_s", "peak_rss_mb", "base_rss_mb",
              "train_peak_mb", "peak_gpu_mb", "gpu_train_peak_mb", "device", "precision", "ours_vs_padded_throughput",
              "ours_over_padded_peak", "ours_vs_eager_throughput", "ours_vs_trl_throughput", "ours_over_trl_peak",
              "ours_over_trl_train_peak", "ours_over_eager_peak", "ours_over_eager_train_peak", "same_batches",
              "process_wall_s", "note"]
    write_csv(out, rows, fields)
    print(f"wrote {out}; total wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
