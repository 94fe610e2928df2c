"""Completion log-probs of a causal LM: ``log pi(y | x)`` summed over the completion tokens.

Every loss, the reference precompute and the evaluation KL take their log-probs here. They do not call
``model.forward``: the decoder's last hidden states are taken at the labelled (completion) positions only, and only
those rows go through the LM head, so the head's cost follows the completion tokens rather than the padded batch.
Plain heads go through the fused ``rlmf.kernels.logprobs_from_hidden`` (the ``[tokens, vocab]`` logits are never
held).

Bypassing ``forward`` means reproducing what it does to the logits (a scale, a soft-cap: :mod:`rlmf.logit_transform`,
which refuses what it has not been taught); :func:`rlmf.logprobs_check.check_logprobs_match_forward` compares the
result against ``log_softmax(model(...).logits)`` on a short probe when a model is loaded. The decoder runs on padded
rows or on packed ones (:mod:`rlmf.packing`); :func:`packing_problem` decides once per model whether packing is exact
for it.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable, Optional, Tuple

import torch
import torch.utils.checkpoint
from torch import nn

from rlmf.data.collate import IGNORE_INDEX
from rlmf.kernels import logprobs_from_hidden, logprobs_from_logits
from rlmf.logit_transform import LogitTransform, base_model_of, decoder_of, describe_model, logit_transform
from rlmf.packing import PACKINGS, packed_hidden, row_groups, varying_shape_attention

log = logging.getLogger(__name__)


# --- log-probs ---------------------------------------------------------------------------------------------------

def _is_plain_linear(head: nn.Module) -> bool:
    """A head whose output is exactly ``F.linear(h, head.weight, head.bias)`` (not a LoRA or quantised layer)."""
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward


def head_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
                  ) -> torch.Tensor:
    """``log_softmax(model_logits(hidden) / T)[target]`` per row, as ``model.forward`` would score it.

    Args:
        model: the causal LM (PEFT-wrapped or not).
        hidden: ``[N, H]`` last hidden states of the positions to score (already selected: every row costs a
            head evaluation).
        targets: ``[N]`` the token each row predicts (``-100`` rows give 0).
        temperature: divides the model's final logits.

    Returns:
        ``[N]`` float32 log-probs (float64 for a float64 model), differentiable.
    """
    transform = logit_transform(model)
    head = base_model_of(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{describe_model(model)} has no output embeddings (get_output_embeddings() is None)")
    if transform.folds_into_temperature and _is_plain_linear(head):
        # log_softmax(scale * z / T) = log_softmax(z / (T / scale)): exact, and the fused kernel never holds the
        # [N, V] logits.
        return logprobs_from_hidden(hidden, head.weight, targets, bias=head.bias,
                                    temperature=temperature / transform.scale)
    # Non-linear transforms (soft-cap), non-positive scales and heads that are not a plain Linear (a LoRA layer on
    # lm_head, a quantised layer): materialise the logits of the selected rows, a chunk at a time, and score them.
    return _materialised_logprobs(head, transform, hidden, targets, temperature,
                                  vocab_size=base_model_of(model).get_input_embeddings().num_embeddings)


# Logits held at once on the materialised path, in elements (2**24: 64 MiB of float32, 256 rows of a 65k vocabulary).
MATERIALISED_CHUNK_ELEMENTS = 2 ** 24


def _materialised_logprobs(head: nn.Module, transform: LogitTransform, hidden: torch.Tensor, targets: torch.Tensor,
                           temperature: float, vocab_size: int) -> torch.Tensor:
    """``logprobs_from_logits(transform(head(hidden)), targets)`` over ``[N, H]`` rows, at most
    :data:`MATERIALISED_CHUNK_ELEMENTS` logits at a time: ``[N]``.

    Under autograd each chunk is checkpointed (recomputed in backward), so training holds one chunk of logits and
    its tanh rather than ``N x V`` of each; the recomputation is the price.
    """
    def score(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return logprobs_from_logits(transform.apply(head(h)), t, temperature=temperature)

    rows = max(1, MATERIALISED_CHUNK_ELEMENTS // max(1, vocab_size))
    if hidden.shape[0] <= rows:
        return score(hidden, targets)
    out = []
    for h, t in zip(hidden.split(rows), targets.split(rows)):
        if torch.is_grad_enabled():
            out.append(torch.utils.checkpoint.checkpoint(score, h, t, use_reentrant=False))
        else:
            out.append(score(h, t))
    return torch.cat(out)


def _padded_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states of padded rows ``[B, L]``: ``[B, L, H]``."""
    # Positions follow the mask, so a left-padded prompt is scored exactly as generate() saw it.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with varying_shape_attention(input_ids.device):
        return decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state


def _labelled_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     packing: str = "none", groups: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states at the positions that predict a label: ``(hidden [N, H], targets [N],
    mask [B, L-1])``, ``N = mask.sum()``; ``mask[b, t]`` is ``labels[b, t+1] != -100``.

    ``packing`` (:data:`rlmf.packing.PACKINGS`) picks the layout the decoder runs on: the padded rows as given
    (``"none"``), packed without padding (``"padding_free"``), or packed with the rows of a ``groups`` entry that
    share their prompt encoding it once (``"shared_prompt"``; see :mod:`rlmf.packing`). A model that cannot take
    the packed layout (:func:`packing_problem`) runs padded, and says why once.
    """
    shifted = labels[:, 1:]                                                           # [B, L-1]
    mask = shifted != IGNORE_INDEX
    if packing not in PACKINGS:
        raise ValueError(f"packing={packing!r}; expected one of {', '.join(PACKINGS)}")
    if packing != "none" and packing_problem(model) is None:
        hidden = packed_hidden(decoder_of(model), input_ids, attention_mask, labels, mask,
                               groups if packing == "shared_prompt" else None)
        return hidden, shifted[mask], mask
    hidden = _padded_hidden(model, input_ids, attention_mask)
    return hidden[:, :-1][mask], shifted[mask], mask


_PACKING_PROBLEMS: "weakref.WeakKeyDictionary[nn.Module, Tuple[str, Optional[str]]]" = weakref.WeakKeyDictionary()


def packing_problem(model: nn.Module) -> Optional[str]:
    """Why ``model`` cannot run on packed rows, or None when it can.

    Decided once per model (and attention implementation) by a probe: three rows, two of which share a prompt,
    scored padded and packed (:func:`check_packing_matches_padded`). A model that fails it, by an error or by a
    difference, runs on padded rows; the reason is logged once at WARNING.
    """
    base = base_model_of(model)
    implementation = getattr(base.config, "_attn_implementation", None)
    known = _PACKING_PROBLEMS.get(base)
    if known is not None and known[0] == implementation:
        return known[1]
    try:
        check_packing_matches_padded(model)
        problem = None
    except Exception as error:  # any failure means: do not pack this model; the reason is what the user needs
        problem = f"{type(error).__name__}: {error}"
        log.warning("%s cannot run on packed rows, so its log-probs use padded rows (slower, same numbers): %s",
                    describe_model(model), problem)
    _PACKING_PROBLEMS[base] = (implementation, problem)
    return problem


@torch.no_grad()
def check_packing_matches_padded(model: nn.Module, atol: Optional[float] = None, length: int = 12) -> float:
    """Score a probe padded and packed with a shared prompt; raise ``ValueError`` if they differ by more than
    ``atol`` per token (default: 1e-4 plus 64 epsilons of the model's dtype, a check for gross errors in 16-bit).
    Returns the largest difference. Eval mode during the probe; the mode is restored."""
    base = base_model_of(model)
    vocab_size = base.get_input_embeddings().num_embeddings
    head = base.get_output_embeddings()
    if getattr(head, "weight", None) is not None:
        vocab_size = min(vocab_size, head.weight.shape[0])
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (length // 2,), generator=generator)
    rows = [torch.cat([prompt, torch.randint(0, vocab_size, (n,), generator=generator)]) for n in (length // 2, 3)]
    rows.append(torch.randint(0, vocab_size, (length - 2,), generator=generator))
    prompt_lengths = [len(prompt), len(prompt), 2]
    input_ids = torch.zeros(3, length, dtype=torch.long)
    attention_mask = torch.zeros(3, length, dtype=torch.long)
    labels = torch.full((3, length), IGNORE_INDEX)
    for i, (row, p) in enumerate(zip(rows, prompt_lengths)):
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
        labels[i, p:len(row)] = row[p:]
    input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    groups = torch.tensor([0, 0, 1])
    was_training = model.training
    model.eval()
    try:
        shifted = labels[:, 1:]
        mask = shifted != IGNORE_INDEX
        padded = head_logprobs(model, _padded_hidden(model, input_ids, attention_mask)[:, :-1][mask], shifted[mask])
        # One packed row holds everything: a shared prompt, siblings and another group side by side.
        packed = head_logprobs(model, packed_hidden(decoder_of(model), input_ids, attention_mask, labels, mask,
                                                    groups, capacity=3 * length), shifted[mask])
    finally:
        model.train(was_training)
    worst = float((padded.float() - packed.float()).abs().max())
    dtype = base.get_input_embeddings().weight.dtype
    if atol is None:
        atol = 1e-4 + 64 * torch.finfo(dtype).eps
    if not worst <= atol:  # also catches NaN
        raise ValueError(f"packed rows' log-probs differ from padded rows' by up to {worst:.3g} per token "
                         f"(tolerance {atol:.3g})")
    return worst


def _scatter(mask: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """``[N]`` values back to ``[B, L-1]`` (zeros elsewhere). masked_scatter keeps the graph to ``picked``, and a
    dense row sum is deterministic on every device, unlike an atomic index_add."""
    return torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)


def completion_token_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           labels: torch.Tensor, temperature: float = 1.0, *, packing: str = "none",
                           groups: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labelled tokens: ``(token_logps [B, L-1], mask [B, L-1])``.

    ``token_logps[b, t]`` is ``log p(labels[b, t+1] | input_ids[b, :t+1])`` where ``mask[b, t]``
    (``labels[b, t+1] != -100``), 0 elsewhere. Inputs are ``[B, L]``; ``labels`` are aligned with ``input_ids`` and
    shifted here. Positions follow the mask (``cumsum(mask) - 1``), so left- and right-padded rows score the same.
    ``packing`` and ``groups`` (``[B]``, rows that may share their prompt) choose the decoder's layout, not the
    result (:func:`_labelled_hidden`).
    """
    hidden, targets, mask = _labelled_hidden(model, input_ids, attention_mask, labels, packing, groups)
    # Only the labelled positions go through the head: prompts and padding cost nothing there.
    return _scatter(mask, head_logprobs(model, hidden, targets, temperature)), mask


def completion_token_logps_and_values(model: nn.Module, value_head: nn.Module, input_ids: torch.Tensor,
                                      attention_mask: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                                      *, packing: str = "none", groups: Optional[torch.Tensor] = None
                                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`completion_token_logps` and, from the same forward, ``values [B, L-1]``: ``value_head`` (``[N, H] ->
    [N]``) on the hidden state that predicts each labelled token, i.e. the value of the state before that token
    (PPO's critic on the policy's shared trunk). Zeros outside the mask."""
    hidden, targets, mask = _labelled_hidden(model, input_ids, attention_mask, labels, packing, groups)
    token_logps = _scatter(mask, head_logprobs(model, hidden, targets, temperature))
    values = value_head(hidden)
    return token_logps, mask, _scatter(mask, values.to(token_logps.dtype))


@torch.no_grad()
def _log_sum_sq_probs(model: nn.Module, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log sum_v p(v)^2`` ([N]) of the model's next-token distribution at each ``[N, H]`` row of ``hidden``, from
    its materialised logits (scaled and capped as ``forward`` does), :data:`MATERIALISED_CHUNK_ELEMENTS` at a time.
    Float32 at least; no gradient."""
    transform, base = logit_transform(model), base_model_of(model)
    head = base.get_output_embeddings()
    rows = max(1, MATERIALISED_CHUNK_ELEMENTS // max(1, base.get_input_embeddings().num_embeddings))
    out = [hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))]
    for h in hidden.split(rows):
        z = head(h)
        logits = transform.apply(z.to(torch.promote_types(z.dtype, torch.float32))) / temperature
        out.append(torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1))
    return torch.cat(out)


def completion_token_logps_and_sq_probs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                        labels: torch.Tensor, temperature: float = 1.0, *, packing: str = "none",
                                        groups: Optional[torch.Tensor] = None
                                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`completion_token_logps` and, from the same forward, ``log_sum_sq_probs [B, L-1]``:
    ``log sum_v p(v | input_ids[b, :t+1])^2`` at each labelled position (0 elsewhere), without gradient. WPO's weights
    divide each token's probability by it (:func:`rlmf.losses.dpo_tokens.wpo`). It needs the whole distribution,
    which the fused kernel does not keep, so the logits of the labelled rows are materialised for it: a second pass
    through the head, in chunks, only for the losses that ask."""
    hidden, targets, mask = _labelled_hidden(model, input_ids, attention_mask, labels, packing, groups)
    token_logps = _scatter(mask, head_logprobs(model, hidden, targets, temperature))
    log_sum_sq = _log_sum_sq_probs(model, hidden.detach(), temperature)
    return token_logps, mask, _scatter(mask, log_sum_sq.to(token_logps.dtype))


def completion_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     temperature: float = 1.0, *, packing: str = "none", groups: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled (completion) tokens and their counts, each [B].

    ``labels`` are aligned with ``input_ids`` (-100 where no loss is taken); the shift happens here: the hidden
    state at position t predicts the label at t+1. Equal to summing
    ``log_softmax(model(input_ids, attention_mask, position_ids).logits / temperature)`` at the labels.
    """
    token_logps, mask = completion_token_logps(model, input_ids, attention_mask, labels, temperature,
                                               packing=packing, groups=groups)
    return token_logps.sum(-1), mask.sum(-1)


@torch.no_grad()
def batched_completion_logps(model: nn.Module, features, collate: Callable, batch_size: int = 32,
                             temperature: float = 1.0, prefix: str = "", packing: str = "none") -> torch.Tensor:
    """:func:`completion_logps` (summed, no grad, eval mode) over tokenized features, ``batch_size`` at a time,
    in the row order ``collate`` produces (paired collators give chosen rows, then rejected, per batch).

    Batches go to the model's device; the result is a float32 CPU tensor. ``prefix`` selects other rows of the
    collated batch (``"kl_"`` for KTO's mismatched rows). With ``packing`` the rows of a pair share their prompt
    (:func:`rlmf.packing.row_groups`).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(features), batch_size):
        batch = collate(features[start: start + batch_size])
        args = (batch[prefix + k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        groups = row_groups(batch) if not prefix else None
        out.append(completion_logps(model, *args, temperature=temperature, packing=packing,
                                    groups=groups)[0].float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
