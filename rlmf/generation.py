"""Sampling from a generator exactly as the policy defines it, and batched text-in text-out generation.

A checkpoint's ``generation_config`` (an instruct model's ``temperature=0.7``, ``top_p=0.9``,
``repetition_penalty=1.1``, ...) is meant for chat, not for estimating anything about the policy: samples drawn
through it are not samples of ``pi(y|x)``, which biases online losses (HyPO's KL gradient) and the evaluation KL.
Every generate call here states the whole sampling rule (temperature, top-k 0, top-p 1, no repetition penalty, no
forced or suppressed tokens) on a fresh ``GenerationConfig``, so nothing from the checkpoint leaks in except its
stop tokens, which are all kept (:func:`stop_token_ids`).

Two samplers draw from that rule (``generator.sampler``, :data:`SAMPLERS`): ``model.generate`` itself (``hf``) and
our decode loop (``rlmf``, :mod:`rlmf.sampling`), which shares each prompt's prefill across its completions, drops
finished rows and draws one uniform per row. Every call site samples through :func:`sample_tokens`.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import GenerationConfig

from rlmf.data.collate import IGNORE_INDEX, PromptCollator
from rlmf.data.formats import PromptOnly
from rlmf.data.tokenization import tokenize_prompts
from rlmf.sampling import decode, refusal

log = logging.getLogger(__name__)

# generator.sampler: transformers' ``model.generate`` (hf), or our decode loop (rlmf; :mod:`rlmf.sampling`): the
# same distribution, greedy completions token for token, other samples for a seed.
SAMPLERS = ("hf", "rlmf")


def stop_token_ids(model: nn.Module, tokenizer=None) -> List[int]:
    """Every token that ends a completion: the checkpoint's ``generation_config.eos_token_id`` (an int or a list,
    e.g. Llama-3's ``<|end_of_text|>`` and ``<|eot_id|>``) and the tokenizer's eos, in that order, without repeats."""
    found: List[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for token in ([value] if isinstance(value, int) else list(value or [])):
            if token not in found:
                found.append(int(token))
    return found


def policy_generation_config(*, do_sample: bool, temperature: float, max_new_tokens: int, stop_ids: Sequence[int],
                             pad_token_id: Optional[int], num_return_sequences: int = 1) -> GenerationConfig:
    """A generation config that samples from ``softmax(logits / temperature)`` and nothing else (or greedy)."""
    # Sampling filters are stated only when sampling: transformers warns about them on a greedy call.
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0, typical_p=1.0, min_p=0.0,
                    epsilon_cutoff=0.0, eta_cutoff=0.0) if do_sample else dict(do_sample=False)
    return GenerationConfig(
        **sampling, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences, num_beams=1,
        repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, encoder_repetition_penalty=1.0,
        renormalize_logits=False,
        eos_token_id=list(stop_ids), pad_token_id=pad_token_id, bos_token_id=None, forced_bos_token_id=None,
        forced_eos_token_id=None, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
        sequence_bias=None, exponential_decay_length_penalty=None, guidance_scale=None, watermarking_config=None)


@torch.no_grad()
def sample_tokens(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                  do_sample: bool, temperature: float, stop_ids: Sequence[int], pad_token_id: int,
                  num_return_sequences: int = 1, sampler: str = "hf") -> Tuple[torch.Tensor, torch.Tensor]:
    """Completions of left-padded prompts ``[B, P]``: ``(tokens, keep)``, each ``[B * n, L]`` (the ``n`` of a prompt
    adjacent), by ``sampler`` (:data:`SAMPLERS`; ``rlmf`` runs ``generate`` instead, with a logged reason, for a
    model :func:`rlmf.sampling.refusal` turns down).

    ``keep`` marks each completion's tokens up to and including its first stop token; what follows is padding.
    The model is left in the mode it was in.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: one of {', '.join(SAMPLERS)}")
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, stop_ids=stop_ids,
                    pad_token_id=pad_token_id, num_return_sequences=num_return_sequences)
    was_training = model.training
    model.eval()
    try:
        if sampler == "rlmf" and _can_decode(model):
            tokens = decode(model, input_ids, attention_mask, **settings)
        else:
            tokens = _generate(model, input_ids, attention_mask, **settings)
    finally:
        model.train(was_training)
    is_stop = torch.isin(tokens, torch.tensor(list(stop_ids), device=tokens.device))
    keep = (is_stop.long().cumsum(-1) - is_stop.long()) == 0
    return tokens, keep


_REFUSALS_LOGGED = set()


def _can_decode(model: nn.Module) -> bool:
    """Whether :func:`rlmf.sampling.decode` runs ``model``; the reason it cannot is logged once per model class."""
    reason = refusal(model)
    if reason is not None and type(model) not in _REFUSALS_LOGGED:
        _REFUSALS_LOGGED.add(type(model))
        log.warning("generator.sampler=rlmf: %s, so model.generate samples instead", reason)
    return reason is None


def _generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **settings) -> torch.Tensor:
    """``model.generate``'s completion tokens ``[B * n, L]`` at :func:`policy_generation_config`. The checkpoint's
    own ``generation_config`` is set aside for the call (transformers fills every field left unset from it), then
    restored."""
    config = policy_generation_config(**settings)
    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        model.generation_config = saved
    return sequences[:, input_ids.shape[1]:]


def completion_rows(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor,
                    pad_token_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampled completions of :func:`sample_tokens` (``[B * n, L]`` with ``keep``) after their left-padded
    prompts ``[B, P]`` (each repeated ``n`` times): ``input_ids``, ``attention_mask`` and ``labels``
    ``[B * n, P + L]``, labels -100 outside the kept completion tokens, padding after each stop token."""
    repeats = tokens.shape[0] // prompt_ids.shape[0]
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(repeats, 0), prompt_mask.repeat_interleave(repeats, 0)
    input_ids = torch.cat([prompt_ids, tokens.masked_fill(~keep, pad_token_id)], 1)
    attention_mask = torch.cat([prompt_mask, keep.to(prompt_mask.dtype)], 1)
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), tokens.masked_fill(~keep, IGNORE_INDEX)], 1)
    return input_ids, attention_mask, labels


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[Union[str, PromptOnly]], *, max_new_tokens: int, do_sample: bool,
             temperature: float = 1.0, batch_size: int = 32, seed: int = 0, max_prompt_length: int = 512,
             num_return_sequences: int = 1, return_token_ids: bool = False, progress: Optional[str] = None,
             sampler: str = "hf") -> Union[List[str], Tuple[List[str], List[Tuple[List[int], List[int]]]]]:
    """Completions for ``prompts`` (``num_return_sequences`` per prompt, grouped by prompt).

    A prompt is text, or a :class:`~rlmf.data.formats.PromptOnly` whose chat messages render through the
    tokenizer's chat template when it has one.

    Prompts are left-padded (the prompt's end is kept when it is too long) and sent to the model's device;
    sampling is from ``softmax(logits / temperature)`` with nothing else applied (:func:`sample_tokens`, by
    ``sampler``: :data:`SAMPLERS`);
    generation stops at any of the checkpoint's stop tokens or after ``max_new_tokens``; the returned text excludes
    the prompt and special tokens. Sampling is seeded. With ``return_token_ids`` also the exact
    ``(prompt_ids, completion_ids)`` sampled (completion up to and including its stop token), for scoring the very
    tokens drawn rather than a re-tokenisation of their text. ``progress`` names a Rich progress bar.
    """
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(model, tokenizer)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    collate = PromptCollator(tokenizer.pad_token_id)
    outputs: List[str] = []
    token_ids: List[Tuple[List[int], List[int]]] = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from rich.progress import track

        starts = track(starts, description=progress, transient=True)
    for start in starts:
        rows = [p if isinstance(p, PromptOnly) else PromptOnly(p) for p in prompts[start: start + batch_size]]
        features = tokenize_prompts(rows, tokenizer, max_prompt_length)
        batch = collate(features)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        tokens, keep = sample_tokens(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device), max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature, stop_ids=stop_ids, pad_token_id=tokenizer.pad_token_id,
            num_return_sequences=num_return_sequences, sampler=sampler)
        kept = [row[: int(n)] for row, n in zip(tokens.tolist(), keep.sum(-1).tolist())]
        outputs += tokenizer.batch_decode(kept, skip_special_tokens=True)
        if return_token_ids:
            token_ids += [(features[i // num_return_sequences]["prompt_ids"], ids) for i, ids in enumerate(kept)]
    return (outputs, token_ids) if return_token_ids else outputs
