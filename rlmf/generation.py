"""Batched sampling and greedy decoding from a generator, text in and text out."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from rlmf.data.collate import PromptCollator, tokenize_prompts
from rlmf.data.formats import PromptOnly


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool,
             temperature: float = 1.0, batch_size: int = 32, seed: int = 0, max_prompt_length: int = 512,
             num_return_sequences: int = 1, return_token_ids: bool = False, progress: Optional[str] = None
             ) -> Union[List[str], Tuple[List[str], List[Tuple[List[int], List[int]]]]]:
    """Completions for ``prompts`` (``num_return_sequences`` per prompt, grouped by prompt).

    Prompts are left-padded (the prompt's end is kept when it is too long); generation stops at EOS or after
    ``max_new_tokens``; the returned text excludes the prompt and special tokens. Sampling is seeded. With
    ``return_token_ids`` also the exact ``(prompt_ids, completion_ids)`` sampled (completion up to and including
    EOS), for scoring the very tokens drawn rather than a re-tokenisation of their text. ``progress`` names a Rich
    progress bar over the batches.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    collate = PromptCollator(tokenizer.pad_token_id)
    outputs: List[str] = []
    token_ids: List[Tuple[List[int], List[int]]] = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from rich.progress import track

        starts = track(starts, description=progress, transient=True)
    for start in starts:
        features = tokenize_prompts([PromptOnly(p) for p in prompts[start: start + batch_size]], tokenizer,
                                    max_prompt_length)
        batch = collate(features)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        width = input_ids.shape[1]
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(
            do_sample=False)
        sequences = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
            num_return_sequences=num_return_sequences, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, **kwargs)
        generated = sequences[:, width:].tolist()
        outputs += tokenizer.batch_decode(generated, skip_special_tokens=True)
        if return_token_ids:
            for row, ids in enumerate(generated):
                if tokenizer.eos_token_id in ids:
                    ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
                token_ids.append((features[row // num_return_sequences]["prompt_ids"], ids))
    model.train(was_training)
    return (outputs, token_ids) if return_token_ids else outputs
