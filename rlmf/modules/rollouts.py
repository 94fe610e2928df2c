"""Rollouts of the online algorithms: completions sampled from the policy, as labelled rows with their log-probs.

:func:`rollout` is the one place the online loop samples (:mod:`rlmf.modules.online`): the policy samples
``num_generations`` completions per left-padded prompt exactly as it defines them
(:func:`rlmf.generation.sample_tokens` by ``generator.sampler``: ``softmax(logits / temperature)`` and nothing else,
every stop token honoured), and the very tokens drawn are scored again at that temperature, without gradient, for the log-probs of
the sampling ("old") policy. For ReMax it also decodes each prompt's greedy completion, the baseline's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

from rlmf.data.collate import IGNORE_INDEX
from rlmf.generation import completion_rows, sample_tokens
from rlmf.logprobs import completion_token_logps, completion_token_logps_and_values


@dataclass
class Rollout:
    """``B * G`` rows (the ``G`` completions of a prompt adjacent), all on the policy's device.

    Attributes:
        input_ids, attention_mask, labels: ``[B * G, P + L]`` left-padded prompt then completion (up to and
            including its first stop token; padding after it), labels ``-100`` outside the completion.
        old_logps, mask: ``[B * G, P + L - 1]`` per-token log-probs of the labelled tokens under the sampling policy
            at the sampling temperature (no gradient) and the mask of those tokens (:func:`completion_token_logps`).
            ``old_logps`` is None when the rollout was not scored (``score=False``): a single on-policy update
            takes them from its own forward, where they are the same numbers.
        lengths: ``[B * G]`` completion token counts; ``clipped``: ``[B * G]`` bool, True where no stop token came
            before ``max_new_tokens``.
        texts: the completions decoded (special tokens skipped), for the reward.
        old_values: ``[B * G, P + L - 1]`` the value head's predictions at sampling time, from the same scoring
            forward (PPO only; None without a value head).
        greedy_texts: the greedy completion of each of the ``B`` prompts, decoded (ReMax's baseline; None unless
            asked for).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    old_logps: Optional[torch.Tensor]
    mask: torch.Tensor
    lengths: torch.Tensor
    clipped: torch.Tensor
    texts: List[str]
    old_values: Optional[torch.Tensor] = None
    greedy_texts: Optional[List[str]] = None


@torch.no_grad()
def rollout(model: nn.Module, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_generations: int,
            temperature: float, max_new_tokens: int, stop_ids: Sequence[int], pad_token_id: int,
            value_head: Optional[nn.Module] = None, score: bool = True, packing: str = "none",
            greedy: bool = False, sampler: str = "hf") -> Rollout:
    """``num_generations`` completions of each left-padded prompt ``[B, P]`` (on the model's device) from ``model``;
    with a ``value_head`` also its values of every completion state (:attr:`Rollout.old_values`). ``score=False``
    skips the no-grad scoring forward (``old_logps`` is then None). ``packing`` is the scoring forward's layout
    (:data:`rlmf.packing.PACKINGS`; the completions of a prompt share it). ``greedy`` also decodes each prompt's
    greedy completion (:attr:`Rollout.greedy_texts`), after the sampling: it draws no random numbers, so the
    samples are those of a rollout without it. ``sampler`` draws them (:data:`rlmf.generation.SAMPLERS`)."""
    tokens, keep = sample_tokens(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=temperature, stop_ids=stop_ids, pad_token_id=pad_token_id,
                                 num_return_sequences=num_generations, sampler=sampler)
    input_ids, attention_mask, labels = completion_rows(prompt_ids, prompt_mask, tokens, keep, pad_token_id)
    old_values = old_logps = None
    layout = {"packing": packing,
              "groups": torch.arange(input_ids.shape[0], device=input_ids.device) // num_generations}
    if not score:
        mask = labels[:, 1:] != IGNORE_INDEX
    elif value_head is None:
        old_logps, mask = completion_token_logps(model, input_ids, attention_mask, labels, temperature=temperature,
                                                 **layout)
    else:
        old_logps, mask, old_values = completion_token_logps_and_values(model, value_head, input_ids, attention_mask,
                                                                        labels, temperature=temperature, **layout)
    stopped = (torch.isin(tokens, torch.tensor(list(stop_ids), device=tokens.device)) & keep).any(-1)
    lengths = keep.sum(-1)
    greedy_texts = None
    if greedy:
        greedy_tokens, greedy_keep = sample_tokens(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                                   do_sample=False, temperature=temperature, stop_ids=stop_ids,
                                                   pad_token_id=pad_token_id, sampler=sampler)
        greedy_texts = _decode(tokenizer, greedy_tokens, greedy_keep.sum(-1))
    return Rollout(input_ids, attention_mask, labels, old_logps.detach() if old_logps is not None else None, mask,
                   lengths, ~stopped, _decode(tokenizer, tokens, lengths),
                   old_values.detach() if old_values is not None else None, greedy_texts)


def _decode(tokenizer, tokens: torch.Tensor, lengths: torch.Tensor) -> List[str]:
    """Each row's first ``lengths`` tokens as text, special tokens skipped."""
    return tokenizer.batch_decode([row[: int(n)] for row, n in zip(tokens.tolist(), lengths.tolist())],
                                  skip_special_tokens=True)
