"""Per-token entropies of a causal LM's next-token distributions at the completion positions.

The entropy options of the online objectives (training only on the highest-entropy tokens, an entropy bonus:
:func:`rlmf.losses.policy_gradient.entropy_terms`) need ``H_t = -sum_v p_t(v) log p_t(v)`` of the policy at every
completion token. The fused log-prob kernel (:func:`rlmf.kernels.logprobs_from_hidden`) cannot give it: it scores
the target token without ever holding the ``[tokens, vocab]`` logits. So this is an exact PyTorch computation from
the same decoder forward as the log-probs: the log-probs still come from :func:`rlmf.logprobs.head_logprobs`
(the same numbers as without entropies), and the entropies from the logits of the labelled positions, transformed
as ``model.forward`` does (:func:`rlmf.logprobs.logit_transform`) and divided by the temperature, a chunk of
:data:`rlmf.logprobs.MATERIALISED_CHUNK_ELEMENTS` logits at a time, each chunk recomputed in the backward. The price
is one more ``[tokens, vocab]`` head product, paid only when an option asks for entropies.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.utils.checkpoint
from torch import nn

from rlmf.logprobs import (
    MATERIALISED_CHUNK_ELEMENTS,
    _labelled_hidden,
    _scatter,
    base_model_of,
    describe_model,
    head_logprobs,
    logit_transform,
)


def head_entropies(model: nn.Module, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``H(softmax(model_logits(hidden) / T))`` per row: ``[N, H]`` hidden states -> ``[N]`` entropies (float32, or
    float64 for a float64 model), differentiable."""
    transform = logit_transform(model)
    head = base_model_of(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{describe_model(model)} has no output embeddings (get_output_embeddings() is None)")

    def entropy(h: torch.Tensor) -> torch.Tensor:
        logits = transform.apply(head(h))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        logp = torch.log_softmax(logits, dim=-1)
        return -(logp.exp() * logp).sum(-1)

    vocab_size = base_model_of(model).get_input_embeddings().num_embeddings
    rows = max(1, MATERIALISED_CHUNK_ELEMENTS // max(1, vocab_size))
    if hidden.shape[0] <= rows:
        return entropy(hidden)
    chunks = []
    for h in hidden.split(rows):
        grad = torch.is_grad_enabled()
        chunks.append(torch.utils.checkpoint.checkpoint(entropy, h, use_reentrant=False) if grad else entropy(h))
    return torch.cat(chunks)


def completion_token_logps_and_entropies(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                         labels: torch.Tensor, temperature: float = 1.0, *, packing: str = "none",
                                         groups: Optional[torch.Tensor] = None
                                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`rlmf.logprobs.completion_token_logps` and, from the same forward, ``entropies [B, L-1]``: the
    entropy of the next-token distribution at each position that predicts a labelled token (0 elsewhere)."""
    hidden, targets, mask = _labelled_hidden(model, input_ids, attention_mask, labels, packing, groups)
    token_logps = _scatter(mask, head_logprobs(model, hidden, targets, temperature))
    entropies = head_entropies(model, hidden, temperature)
    return token_logps, mask, _scatter(mask, entropies.to(token_logps.dtype))
