"""Packed rows (rlmf.packing) on CUDA give the padded rows' log-probs and gradients, for every tiny architecture.

The CPU suite's check (tests/test_packing.py) on the GPU, where the attention kernels differ: SDPA picks its CUDA
backends (a boolean ``[R, 1, C, C]`` mask rules out flash attention, so it runs the memory-efficient or math kernel),
and the plain heads go through the compiled Triton kernel. The padded path is itself checked against each model's own
``forward`` on CUDA (tests/gpu/test_gpu_precision.py).

Tolerances: float32 (TF32 off, tests/gpu/conftest.py) per token 1e-4, gradients 1e-4 of the largest entry: the
packed and padded decoders sum the same products in different orders (different matmul shapes). bfloat16 weights:
the probe (``packing_problem``) must pass at its 16-bit tolerance, so a bf16 run on a GPU packs instead of falling
back to padded rows.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import ARCHITECTURES, MASKED_ATTENTION, pair_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlmf.logprobs import completion_logps, completion_token_logps, packing_problem
from rlmf.packing import pack


def load(directory, implementation, device, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=implementation)
    return model.to(device=device, dtype=dtype).eval(), AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("arch,implementation", [(a, i) for a in ARCHITECTURES for i in MASKED_ATTENTION[a]])
def test_packed_logps_and_gradients_equal_padded_on_cuda(tiny_checkpoint, device, arch, implementation):
    model, tokenizer = load(tiny_checkpoint(arch), implementation, device)
    assert packing_problem(model) is None
    for side in ("right", "left"):
        *rows, groups = pair_rows(tokenizer, side, device)
        assert pack(*rows, groups).shared_tokens > 0
        padded, mask = completion_token_logps(model, *rows)
        assert padded.device.type == "cuda"
        for packing in ("padding_free", "shared_prompt"):
            packed, packed_mask = completion_token_logps(model, *rows, packing=packing, groups=groups)
            assert packed.device.type == "cuda" and torch.equal(mask, packed_mask)
            torch.testing.assert_close(packed, padded, atol=1e-4, rtol=0, msg=f"{arch} {side} {packing}")

    *rows, groups = pair_rows(tokenizer, "right", device)
    grads = []
    for packing in ("none", "shared_prompt"):
        model.zero_grad()
        completion_logps(model, *rows, packing=packing, groups=groups)[0].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    scale = grads[0].abs().max().item()
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("arch,implementation", [(a, i) for a in ARCHITECTURES for i in MASKED_ATTENTION[a]])
def test_bf16_weights_pack_on_cuda(tiny_checkpoint, device, arch, implementation):
    """A bf16-true run packs: the probe passes, and packed log-probs stay within bf16 noise of padded ones."""
    model, tokenizer = load(tiny_checkpoint(arch), implementation, device, torch.bfloat16)
    assert packing_problem(model) is None
    *rows, groups = pair_rows(tokenizer, "right", device)
    padded, _ = completion_token_logps(model, *rows)
    packed, _ = completion_token_logps(model, *rows, packing="shared_prompt", groups=groups)
    scale = max(1.0, padded.abs().max().item())
    torch.testing.assert_close(packed.float(), padded.float(), atol=2 ** -4 * scale, rtol=0)


@pytest.mark.parametrize("packing", ["none", "shared_prompt"])
def test_our_forwards_never_pick_cudnn_attention(tiny_checkpoint, device, monkeypatch, packing):
    """Each call's shape is new (padded width, packed length), and cuDNN attention builds a graph per shape
    (rlmf.packing.varying_shape_attention): SDPA is called with cuDNN ruled out."""
    model, tokenizer = load(tiny_checkpoint("llama"), "sdpa", device)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    *rows, groups = pair_rows(tokenizer, "right", device)
    completion_logps(model, *rows, packing=packing, groups=groups)[0].sum().backward()
    assert seen and not any(seen), seen
