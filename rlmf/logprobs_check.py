"""Refusing rather than being silently wrong: :func:`check_logprobs_match_forward` scores a short probe with
:func:`rlmf.logprobs.completion_token_logps` and with ``log_softmax(model(...).logits)``, and raises if they differ
by more than :func:`probe_tolerance` allows for the model's dtype. Run once when a model is loaded.

(Whether a model may run on packed rows is probed where the log-probs decide it:
:func:`rlmf.logprobs.packing_problem`.)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from rlmf.data.collate import IGNORE_INDEX
from rlmf.logit_transform import base_model_of, describe_model, logit_transform
from rlmf.logprobs import completion_token_logps


def probe_tolerance(dtype: torch.dtype, logits_absmax: float) -> float:
    """Largest tolerated ``|our log-prob - forward's|`` for a model computing in ``dtype`` whose logits reach
    ``logits_absmax``.

    Both paths share the decoder; they differ in the head. Forward rounds each logit to ``dtype`` (the fused kernels
    keep float32), an error of at most ``eps/2 * |logit|`` per logit and so ``eps * max|logit|`` per log-prob; float32
    matmuls may run in TF32 or bfloat16 (``torch.set_float32_matmul_precision``). Four times that, plus 1e-4: about
    1e-4 in float32, ~1 nat for bfloat16 logits of 30. A missed soft-cap or logit scale on a real model is off by
    whole nats; 16-bit models get a check for gross errors only.
    """
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32:
        precision = torch.get_float32_matmul_precision()
        if precision == "medium":
            eps = 2.0 ** -7  # bfloat16 products
        elif precision == "high" or torch.backends.cuda.matmul.allow_tf32:
            eps = 2.0 ** -10  # TF32 (the Triton kernel follows allow_tf32 too)
    return 1e-4 + 4 * eps * logits_absmax


def probe_batch(vocab_size: int, length: int = 8, device=None, seed: int = 0
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A two-row probe ``(input_ids, attention_mask, labels)``, each ``[2, length]``: row 0 right-padded and row 1
    left-padded by two positions, random tokens (fixed ``seed``), every real token but the first labelled."""
    if length < 4:
        raise ValueError(f"probe length must be >= 4, got {length}")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[0, -2:] = 0
    attention_mask[1, :2] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[0, 0] = labels[1, 2] = IGNORE_INDEX  # the first real token is the "prompt"
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


@torch.no_grad()
def check_logprobs_match_forward(model: nn.Module, temperature: float = 1.0, atol: Optional[float] = None,
                                 length: int = 8) -> float:
    """Check that :func:`completion_logps` agrees with ``log_softmax(model(...).logits / T)`` on ``model``.

    Run once when a model is loaded: a two-row probe of ``length`` random tokens (one right-, one left-padded)
    goes through both paths, without grad and in eval mode (the train/eval mode is restored). Works for
    PEFT-wrapped models.

    Args:
        model: the causal LM.
        temperature: temperature of the comparison.
        atol: largest tolerated per-token difference; default :func:`probe_tolerance` for the head's dtype.
        length: probe length in tokens.

    Returns:
        The largest per-token absolute difference found.

    Raises:
        ValueError: naming the architecture class and ``model_type``: a config attribute known to transform the
            logits is not handled (see :func:`logit_transform`), or the two paths differ by more than ``atol``.
    """
    logit_transform(model)  # the clearer message first, for what we know we do not handle
    base = base_model_of(model)
    head = base.get_output_embeddings()
    dtype = head.weight.dtype if getattr(head, "weight", None) is not None else next(model.parameters()).dtype
    vocab_size = base.get_input_embeddings().num_embeddings
    if getattr(head, "weight", None) is not None:
        vocab_size = min(vocab_size, head.weight.shape[0])  # probe tokens must be both inputs and targets
    device = next(model.parameters()).device
    input_ids, attention_mask, labels = probe_batch(vocab_size, length, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    was_training = model.training
    model.eval()
    try:
        ours, mask = completion_token_logps(model, input_ids, attention_mask, labels, temperature)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits[:, :-1]
    finally:
        model.train(was_training)
    targets = labels[:, 1:]
    theirs = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets.clamp(min=0)[..., None])
    diff = (ours.float() - theirs[..., 0]).abs()[mask]
    worst = float(diff.max()) if diff.numel() else 0.0
    if atol is None:
        atol = probe_tolerance(dtype, float(logits[mask].abs().max()))
    if not worst <= atol:  # also catches NaN
        raise ValueError(
            f"{describe_model(model)}: rlmf.logprobs disagrees with log_softmax(model(...).logits) by up to "
            f"{worst:.3g} per token (tolerance {atol:.3g}, temperature {temperature}). Its forward transforms the "
            "logits in a way rlmf.logprobs does not reproduce; read its forward and add it to "
            "rlmf.logit_transform.KNOWN_LOGIT_TRANSFORMS."
        )
    return worst
