"""Completion log-probs of a causal LM: ``log pi(y | x)`` summed over the completion tokens.

Every loss, the reference precompute and the evaluation KL take their log-probs here. The log-probs go through
``rlmf.kernels.logprobs_from_hidden`` (the decoder's last hidden states times the LM head, never materialising the
``[tokens, vocab]`` logits), so they must reproduce exactly what the model's own ``forward`` does to its logits.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import nn

from rlmf.data.collate import IGNORE_INDEX
from rlmf.kernels import logprobs_from_hidden


def decoder_of(model: nn.Module) -> nn.Module:
    """The causal LM without its head (``model.model`` for Llama), whatever wraps it (PEFT included)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


def completion_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled (completion) tokens and their counts, each [B].

    ``labels`` are aligned with ``input_ids`` (-100 where no loss is taken); the shift happens here: the hidden
    state at position t predicts the label at t+1.
    """
    # Positions follow the mask, so a left-padded prompt is scored exactly as generate() saw it.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state
    head = model.get_output_embeddings()
    shifted = labels[:, 1:]
    token_logps = logprobs_from_hidden(
        hidden[:, :-1].reshape(-1, hidden.shape[-1]), head.weight, shifted.reshape(-1), bias=head.bias,
        temperature=temperature,
    ).view(shifted.shape)
    mask = shifted != IGNORE_INDEX
    return token_logps.sum(-1), mask.sum(-1)


@torch.no_grad()
def batched_completion_logps(model: nn.Module, features, collate: Callable, batch_size: int = 32,
                             temperature: float = 1.0, prefix: str = "") -> torch.Tensor:
    """:func:`completion_logps` (summed, no grad, eval mode) over tokenized features, ``batch_size`` at a time,
    in the row order ``collate`` produces (paired collators give chosen rows, then rejected, per batch).

    Batches go to the model's device; the result is a float32 CPU tensor. ``prefix`` selects other rows of the
    collated batch (``"kl_"`` for KTO's mismatched rows).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(features), batch_size):
        batch = collate(features[start: start + batch_size])
        args = (batch[prefix + k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        out.append(completion_logps(model, *args, temperature=temperature)[0].float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
