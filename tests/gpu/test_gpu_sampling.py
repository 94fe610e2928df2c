"""Our decode loop (``generator.sampler=rlmf``) on CUDA: the CPU suite's exactness checks, on the GPU's kernels.

- The written-out Llama step (:func:`rlmf.llama_step.llama_step`) calls the model's own submodules and transformers'
  own functions in the forward's order, so on CUDA too its logits must be the forward's bit for bit (the same
  kernels on the same tensors), SDPA and eager, left-padded and not.
- Greedy completions equal ``model.generate``'s token for token on CUDA, with the prompt's cache shared across two
  completions per prompt and rows leaving the batch as they stop.
- :func:`rlmf.sampling.draw` on CUDA tensors (``cumsum`` in float64, ``searchsorted``, ``torch.rand`` on the device)
  follows the softmax it is given: a chi-square test over 40k draws from a known distribution.

CPU counterparts: tests/test_generation.py.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import MASKED_ATTENTION
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlmf.data.collate import PromptCollator
from rlmf.data.formats import PromptOnly
from rlmf.data.tokenization import tokenize_prompts
from rlmf.generation import sample_tokens
from rlmf.llama_step import inlined_step_refusal, llama_step
from rlmf.sampling import draw, kv_cache

TEXTS = ["Dear Ms. Alvarez, thank you for", "Please find attached", "We would love to schedule a short call next"]


def _left_padded(tokenizer, texts, device):
    batch = PromptCollator(tokenizer.pad_token_id)(tokenize_prompts([PromptOnly(t) for t in texts], tokenizer, 64))
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def _load(directory, attention, device):
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=attention).to(device).eval()
    return model, AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("attention", MASKED_ATTENTION["llama"])
def test_written_out_llama_step_is_the_forward_bit_for_bit_on_cuda(tiny_checkpoint, device, attention):
    model, tokenizer = _load(tiny_checkpoint("llama"), attention, device)
    step = llama_step(model)
    assert step is not None, inlined_step_refusal(model)
    for ids, mask in (_left_padded(tokenizer, TEXTS, device), _left_padded(tokenizer, TEXTS[:1], device)):
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        mask = None if bool(mask.all()) else mask
        caches = [kv_cache(model, ids.shape[1] + 8) for _ in range(2)]
        with torch.no_grad():
            logits = [model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1].float() for cache in caches]
            position = positions[:, -1:].expand(ids.shape[0], 1)
            for _ in range(6):
                assert logits[1].device.type == "cuda"
                assert torch.equal(logits[0], logits[1])
                next_ids = logits[0].argmax(-1)[:, None]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1) if mask is not None else None
                position = position + 1
                logits = [model(input_ids=next_ids, attention_mask=mask, position_ids=position, cache=caches[0],
                                use_cache=True, logits_to_keep=1).logits[:, -1].float(),
                          step(next_ids, mask, position, caches[1])]
            assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("attention", MASKED_ATTENTION["llama"])
def test_rlmf_greedy_is_model_generate_on_cuda(tiny_checkpoint, device, attention):
    model, tokenizer = _load(tiny_checkpoint("llama"), attention, device)
    ids, mask = _left_padded(tokenizer, TEXTS, device)
    settings = dict(do_sample=False, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id)
    free = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=[], **settings)[:, ids.shape[1]:]
    stops = [tokenizer.eos_token_id, int(free[0, 5])]
    expected = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=stops, **settings)[:, ids.shape[1]:]
    tokens, keep = sample_tokens(model, ids, mask, temperature=1.0, stop_ids=stops, num_return_sequences=2,
                                 sampler="rlmf", **settings)
    assert tokens.device.type == "cuda"
    assert torch.equal(tokens, expected.repeat_interleave(2, 0))


def test_draw_follows_the_softmax_on_cuda(device):
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03, 0.0], dtype=torch.float64)
    logits = torch.log(probs).float().to(device).expand(40_000, -1).contiguous() * 0.8  # drawn at T = 0.8
    torch.manual_seed(0)
    tokens = draw(logits, temperature=0.8)
    assert tokens.device.type == "cuda" and int(tokens.max()) < 5  # a token of probability 0 is never drawn
    observed = torch.bincount(tokens.cpu(), minlength=6)[:5].double()
    expected = probs[:5] * observed.sum()
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
