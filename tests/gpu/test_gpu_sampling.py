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
from decode_checks import TEXTS, assert_step_is_the_forward_bit_for_bit, left_padded
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlmf.generation import sample_tokens
from rlmf.llama_step import inlined_step_refusal, llama_step
from rlmf.sampling import draw


def _load(directory, attention, device):
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=attention).to(device).eval()
    return model, AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("attention", MASKED_ATTENTION["llama"])
def test_written_out_llama_step_is_the_forward_bit_for_bit_on_cuda(tiny_checkpoint, device, attention):
    model, tokenizer = _load(tiny_checkpoint("llama"), attention, device)
    step = llama_step(model)
    assert step is not None, inlined_step_refusal(model)
    assert_step_is_the_forward_bit_for_bit(model, step, tokenizer, device)


@pytest.mark.parametrize("attention", MASKED_ATTENTION["llama"])
def test_rlmf_greedy_is_model_generate_on_cuda(tiny_checkpoint, device, attention):
    model, tokenizer = _load(tiny_checkpoint("llama"), attention, device)
    ids, mask = left_padded(tokenizer, TEXTS, device)
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
