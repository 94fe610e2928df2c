"""Checks of our decode loop shared by the CPU suite (tests/test_generation.py) and the GPU one
(tests/gpu/test_gpu_sampling.py): the same assertions, on whatever device the model is on."""

import torch

from rlmf.data.collate import PromptCollator
from rlmf.data.formats import PromptOnly
from rlmf.data.tokenization import tokenize_prompts
from rlmf.sampling import kv_cache

TEXTS = ["Dear Ms. Alvarez, thank you for", "Please find attached", "We would love to schedule a short call next"]


def left_padded(tokenizer, texts, device="cpu"):
    """``(input_ids, attention_mask)`` of ``texts`` left-padded, tokenised as :func:`generate` tokenises them."""
    batch = PromptCollator(tokenizer.pad_token_id)(tokenize_prompts([PromptOnly(t) for t in texts], tokenizer, 64))
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def assert_step_is_the_forward_bit_for_bit(model, step, tokenizer, device="cpu"):
    """Six one-token steps on two caches, ``model(..., logits_to_keep=1)`` on one and ``step`` on the other, under
    left padding (three prompts) and without a mask (one): the logits must be equal to the last bit at every step."""
    for ids, mask in (left_padded(tokenizer, TEXTS, device), left_padded(tokenizer, TEXTS[:1], device)):
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as the decode loop sets them
        mask = None if bool(mask.all()) else mask
        caches = [kv_cache(model, ids.shape[1] + 8) for _ in range(2)]
        with torch.no_grad():
            logits = [model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1].float() for cache in caches]
            position = positions[:, -1:].expand(ids.shape[0], 1)
            for _ in range(6):
                assert logits[1].device == ids.device
                assert torch.equal(logits[0], logits[1])
                next_ids = logits[0].argmax(-1)[:, None]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1) if mask is not None else None
                position = position + 1
                logits = [model(input_ids=next_ids, attention_mask=mask, position_ids=position, cache=caches[0],
                                use_cache=True, logits_to_keep=1).logits[:, -1].float(),
                          step(next_ids, mask, position, caches[1])]
            assert torch.equal(logits[0], logits[1])
