"""Completion log-probs of a causal LM: ``log pi(y | x)`` summed over the completion tokens.

Every loss, the reference precompute and the evaluation KL take their log-probs here. They do not call
``model.forward``: the decoder's last hidden states are taken at the labelled (completion) positions only, and only
those rows go through the LM head, so the head's cost follows the completion tokens rather than the padded batch.
Plain heads go through the fused ``rlmf.kernels.logprobs_from_hidden`` (the ``[tokens, vocab]`` logits are never
held).

Bypassing ``forward`` means reproducing what it does to the logits, which differs per architecture. What is known is
described by a :class:`LogitTransform` (``logits = cap * tanh(scale * head(h) / cap)``, see :func:`logit_transform`):

* a positive ``scale`` alone (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``) folds into the kernel's
  temperature, exactly;
* a soft-cap (Gemma-2/3 ``final_logit_softcapping``) is not linear: the logits of the labelled rows are materialised,
  capped, and scored with ``rlmf.kernels.logprobs_from_logits``.

Anything else is refused rather than silently wrong: :func:`logit_transform` raises for config attributes that are
known to change the logits of architectures it has not been taught, and :func:`check_logprobs_match_forward`
compares the result against ``log_softmax(model(...).logits)`` on a short probe (run once when a model is loaded).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.utils.checkpoint
from torch import nn

from rlmf.data.collate import IGNORE_INDEX
from rlmf.kernels import logprobs_from_hidden, logprobs_from_logits
from rlmf.packing import PACKINGS, PackedRows, pack, row_groups

log = logging.getLogger(__name__)


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` module under any wrapper (a PEFT model's ``get_base_model()``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model: nn.Module) -> nn.Module:
    """The causal LM without its head (``model.model`` for Llama), whatever wraps it (PEFT included)."""
    base = base_model_of(model)
    return getattr(base, base.base_model_prefix)


# --- what forward does to the logits ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LogitTransform:
    """How a model's ``forward`` turns the head output ``z = h @ W.T + b`` into the logits it returns:
    ``logits = softcap * tanh(scale * z / softcap)``, or ``scale * z`` when ``softcap`` is None.

    Our ``temperature`` then divides those logits, as it would divide ``model(...).logits``.
    """

    scale: float = 1.0
    softcap: Optional[float] = None

    @property
    def folds_into_temperature(self) -> bool:
        """A positive scaling only: ``log_softmax(scale * z / T) == log_softmax(z / (T / scale))``."""
        return self.softcap is None and self.scale > 0

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` head output -> ``[N, V]`` logits, computed like the HF forward (scale, then cap)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


# Config attributes that some architectures' forward applies to the logits, with the value that leaves them alone.
# Seen in transformers 5.24: final_logit_softcapping (Gemma-2/3/3n/4, VaultGemma, nanochat, Inkling2, Mistral-Large-4),
# logits_soft_cap (RecurrentGemma), logit_scale (Cohere, Cohere2), logits_scaling (Granite family divides,
# HyperCLOVA X multiplies, MiniCPM3 divides the hidden state), lm_head_multiplier (Falcon-H1), output_multiplier
# (MuseSpark). The same name does not mean the same operation, hence the per-class table below.
LOGIT_CONFIG_ATTRIBUTES: Dict[str, Optional[float]] = {
    "final_logit_softcapping": None,
    "logits_soft_cap": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "lm_head_multiplier": 1.0,
    "output_multiplier": 1.0,
}


def _softcap(model: nn.Module) -> LogitTransform:
    # Gemma2ForCausalLM / Gemma3ForCausalLM: `if cap is not None: logits = tanh(logits / cap) * cap`.
    return LogitTransform(softcap=model.config.final_logit_softcapping)


def _times_logit_scale(model: nn.Module) -> LogitTransform:
    # CohereForCausalLM / Cohere2ForCausalLM: `logits = logits * self.logit_scale`, an attribute copied from the
    # config in __init__ (the module attribute is what forward reads).
    return LogitTransform(scale=float(getattr(model, "logit_scale", model.config.logit_scale)))


def _over_logits_scaling(model: nn.Module) -> LogitTransform:
    # The Granite family: `logits = logits / self.config.logits_scaling`.
    return LogitTransform(scale=1.0 / float(model.config.logits_scaling))


# Architecture class -> (the LOGIT_CONFIG_ATTRIBUTES its forward applies, how). Each entry was read off the
# class's forward in transformers 5.24 (models/<arch>/modeling_<arch>.py). Classes not listed are assumed to
# return the head's output unchanged, which logit_transform() refuses whenever one of the attributes is set.
KNOWN_LOGIT_TRANSFORMS: Dict[str, Tuple[Tuple[str, ...], Callable[[nn.Module], LogitTransform]]] = {
    "Gemma2ForCausalLM": (("final_logit_softcapping",), _softcap),
    "Gemma3ForCausalLM": (("final_logit_softcapping",), _softcap),
    "CohereForCausalLM": (("logit_scale",), _times_logit_scale),
    "Cohere2ForCausalLM": (("logit_scale",), _times_logit_scale),
    "GraniteForCausalLM": (("logits_scaling",), _over_logits_scaling),
    "GraniteMoeForCausalLM": (("logits_scaling",), _over_logits_scaling),
    "GraniteMoeSharedForCausalLM": (("logits_scaling",), _over_logits_scaling),
    "GraniteMoeHybridForCausalLM": (("logits_scaling",), _over_logits_scaling),
}


def _describe(model: nn.Module) -> str:
    base = base_model_of(model)
    return f"{type(base).__name__} (model_type={getattr(base.config, 'model_type', None)!r})"


def logit_transform(model: nn.Module) -> LogitTransform:
    """What ``model.forward`` does between the LM head and the logits it returns, for ``model`` (PEFT-wrapped or not).

    Raises:
        ValueError: the config (or its text config) sets one of :data:`LOGIT_CONFIG_ATTRIBUTES` to a non-neutral
            value on an architecture not in :data:`KNOWN_LOGIT_TRANSFORMS`: its forward changes the logits in a way
            this module does not reproduce, and the log-probs would be silently wrong.
    """
    base = base_model_of(model)
    handled, read = KNOWN_LOGIT_TRANSFORMS.get(type(base).__name__, ((), None))
    configs = [base.config]
    text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if text_config is not base.config:
        configs.append(text_config)
    for config in configs:
        for name, neutral in LOGIT_CONFIG_ATTRIBUTES.items():
            value = getattr(config, name, neutral)
            if name in handled or value is None or value == neutral:
                continue
            knowers = [cls for cls, (names, _) in KNOWN_LOGIT_TRANSFORMS.items() if name in names] or ["none"]
            raise ValueError(
                f"{_describe(model)} sets config.{name}={value!r}, which transforms the logits in the forward of "
                f"some architectures; rlmf.logprobs reproduces it only for {', '.join(knowers)}. "
                "Refusing rather than computing wrong log-probs: read this architecture's forward and add it to "
                "rlmf.logprobs.KNOWN_LOGIT_TRANSFORMS."
            )
    return read(base) if read is not None else LogitTransform()


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
        raise ValueError(f"{_describe(model)} has no output embeddings (get_output_embeddings() is None)")
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


def varying_shape_attention(device: torch.device):
    """The SDPA backends for forwards whose shapes change at every call (ours: a batch's padded width, a packed
    row's length): flash, memory-efficient or math, not cuDNN. On CUDA (torch 2.11, H200, bf16) SDPA picked cuDNN
    attention, which builds a graph for each new shape: 4-6 ms of CPU per attention call, about 0.1 s of every DPO
    step of an 8-layer model (torch.profiler, ``experiments/bench_step.py --device cuda --profile``), against 2-3 ms
    of GPU time for those kernels. A no-op off CUDA. The backward follows the kernel the forward picked."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


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
        hidden = _packed_hidden(model, input_ids, attention_mask, labels, mask,
                                groups if packing == "shared_prompt" else None)
        return hidden, shifted[mask], mask
    hidden = _padded_hidden(model, input_ids, attention_mask)
    return hidden[:, :-1][mask], shifted[mask], mask


def _packed_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   mask: torch.Tensor, groups: Optional[torch.Tensor], capacity: Optional[int] = None
                   ) -> torch.Tensor:
    """The hidden states ``[N, H]`` that predict the labels where ``mask`` (``[B, L-1]``), computed on the packed
    layout of the padded rows (:func:`rlmf.packing.pack`)."""
    packed = pack(input_ids, attention_mask, labels, groups, capacity)
    with varying_shape_attention(input_ids.device):
        hidden = decoder_of(model)(input_ids=packed.input_ids, attention_mask=packed_attention_mask(model, packed),
                                   position_ids=packed.position_ids, use_cache=False).last_hidden_state  # [R, C, H]
    sources = packed.index[:, :-1][mask]
    if bool((sources < 0).any()):
        raise ValueError("a labelled token follows a padding position; packed rows need each completion to follow "
                         "its prompt (labels -100 on the prompt, padding only before or after the row)")
    return hidden.reshape(-1, hidden.shape[-1])[sources]


# --- packed rows: the mask each attention implementation takes ---------------------------------------------------

class PackingUnsupported(ValueError):
    """The model cannot run on packed rows (its attention does not take a custom 4D mask)."""


# Attention implementations that take a ready 4D mask and use it as given (transformers 5.24 masking_utils returns
# a 4D mask unchanged): SDPA a boolean one, eager an additive float one.
MASKABLE_ATTENTION = ("sdpa", "eager")


def packed_attention_mask(model: nn.Module, packed: PackedRows):
    """The 4D mask (``[R, 1, C, C]``) of ``packed`` in the form ``model``'s attention takes, or, for a model that
    mixes full and sliding-window layers (``config.layer_types``), a dict of one per layer type as its forward
    accepts. A model whose every layer slides (``sliding_window`` without ``layer_types``) gets the window applied.

    Raises:
        PackingUnsupported: another attention implementation, or a layer type other than full and sliding.
    """
    base = base_model_of(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in MASKABLE_ATTENTION:
        raise PackingUnsupported(f"attn_implementation={implementation!r} does not take a custom 4D mask (packing "
                                 f"needs one of {', '.join(MASKABLE_ATTENTION)})")
    dtype = base.get_input_embeddings().weight.dtype

    def form(allowed: torch.Tensor) -> torch.Tensor:
        allowed = allowed[:, None]
        if implementation == "sdpa":
            return allowed
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - {"full_attention"}:
        unknown = layer_types - {"full_attention", "sliding_attention"}
        if unknown:
            raise PackingUnsupported(f"layer types {sorted(unknown)} are neither full nor sliding-window attention")
        return {"full_attention": form(packed.allowed), "sliding_attention": form(packed.windowed(window))}
    if window is not None and getattr(config, "use_sliding_window", True) is not False and not layer_types:
        return form(packed.windowed(window))
    return form(packed.allowed)


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
                    _describe(model), problem)
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
        packed = head_logprobs(model, _packed_hidden(model, input_ids, attention_mask, labels, mask, groups,
                                                     capacity=3 * length), shifted[mask])
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


# --- refusing rather than being silently wrong ---------------------------------------------------------------------

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
            f"{_describe(model)}: rlmf.logprobs disagrees with log_softmax(model(...).logits) by up to {worst:.3g} "
            f"per token (tolerance {atol:.3g}, temperature {temperature}). Its forward transforms the logits in a way "
            "rlmf.logprobs does not reproduce; read its forward and add it to rlmf.logprobs.KNOWN_LOGIT_TRANSFORMS."
        )
    return worst
