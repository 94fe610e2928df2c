"""Our decode loop (``generator.sampler=rlmf``): the completions ``model.generate`` would sample, for less work.

Where the time of ``model.generate`` goes on CPU (one rollout, README "Sampling benchmark"): the decode steps'
forwards; around them, per step, ``torch.multinomial`` (an exponential race that draws one random number per
vocabulary entry and row: a fifth of a step of SmolLM2-135M, whose vocabulary is 49k), logits processors that do
nothing at our settings (min-p 0 still runs a softmax and a top-k), the KV cache grown by concatenation (the whole
cache copied every step) and the attention mask rebuilt; the prompt's prefill is repeated for each of its
``num_return_sequences`` completions, and rows that have stopped keep being computed until the last one stops.

:func:`decode` does the same sampling with less:

- each prompt is prefilled once and its KV cache repeated across its ``n`` completions;
- one draw per row from ``softmax(logits / temperature)`` by inverse transform sampling (:func:`draw`): a single
  uniform per row against the cumulative weights in float64, nothing else applied (no top-k, top-p or penalty);
  greedy decoding is the same ``argmax`` as ``generate``'s;
- every stop token ends its row, which then leaves the batch (its cache rows with it);
- full-attention layers keep their keys and values in a buffer allocated once for the whole completion
  (:class:`PreallocatedLayer`); sliding-window layers keep transformers' own;
- a plain Llama's one-token steps run its forward written out (:func:`rlmf.llama_step.llama_step`: the same
  operations and logits without the wrappers' Python).

Greedy completions are ``generate``'s token for token (tests/test_generation.py). Sampled ones follow the same
distribution but not the same random stream: ``generate`` spends ``rows x vocabulary`` random numbers a step,
finished rows included, this loop one per live row, so a seed gives other samples than ``generator.sampler=hf``.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rlmf.llama_step import llama_step


class PreallocatedLayer(DynamicLayer):
    """A full-attention layer's keys and values ``[rows, heads, length, head_dim]`` in a buffer sized once for the
    prompt and the whole completion: each step writes its token in place instead of concatenating a new cache (a
    copy of all of it), and attention reads a view of the filled part. It grows by doubling if ever outrun."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        rows, heads, _, _ = key_states.shape
        self.key_buffer = key_states.new_empty(rows, heads, self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(rows, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[2]:
            self._resize(max(end, 2 * self.key_buffer.shape[2]))
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self._refresh()
        return self.keys, self.values

    def _resize(self, capacity: int) -> None:
        grown = [buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[-1])
                 for buffer in (self.key_buffer, self.value_buffer)]
        for new, old in zip(grown, (self.key_buffer, self.value_buffer)):
            new[:, :, :self.length] = old[:, :, :self.length]
        self.key_buffer, self.value_buffer = grown

    def _refresh(self) -> None:
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
            self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._refresh()


def kv_cache(model: nn.Module, capacity: int) -> DynamicCache:
    """The cache ``model.generate`` would build (``DynamicCache`` from the model's config, sliding-window layers
    where the model has them), its full-attention layers replaced by :class:`PreallocatedLayer` of ``capacity``."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def refusal(model: nn.Module) -> Optional[str]:
    """Why :func:`decode` cannot run ``model`` (then ``sample_tokens`` runs ``generate``), or None: it needs a
    decoder-only model whose forward takes a ``cache`` and ``position_ids`` and whose every cache layer is an
    attention layer that can drop rows (no recurrent state)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only transformers model"
    accepted = inspect.signature(model.forward).parameters
    missing = [name for name in ("cache", "position_ids") if name not in accepted]
    if missing:
        return f"{type(model).__name__}.forward takes no {' or '.join(missing)}"
    layers = DynamicCache(config=config).layers
    if not all(isinstance(layer, DynamicLayer) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers if not isinstance(layer, DynamicLayer)})
        return f"its cache has layers that are not attention layers ({', '.join(kinds)})"
    return None


def draw(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per row ``[R]`` from ``softmax(logits / temperature)`` (``logits`` ``[R, V]``), exactly: the
    weights ``exp(l / T - max)`` are summed cumulatively in float64 and one uniform ``u`` per row picks the first
    token whose cumulative weight exceeds ``u * total`` (inverse transform sampling). A token of weight 0 is never
    drawn; float64 resolves probabilities down to about 1e-16 of the row's total. Uses torch's global RNG on the
    logits' device, one number per row."""
    scaled = logits.float() / temperature  # as transformers' TemperatureLogitsWarper, in float32
    weights = (scaled - scaled.amax(-1, keepdim=True)).double().exp_()
    cumulative = weights.cumsum_(-1)
    total = cumulative[:, -1:].contiguous()
    u = torch.rand(total.shape, dtype=torch.float64, device=logits.device)
    picked = torch.searchsorted(cumulative, u * total, right=True)
    # u * total can round up to total (probability < 2**-52): then the last token of positive weight.
    last = torch.searchsorted(cumulative, total, right=False)
    return torch.minimum(picked, last).squeeze(-1)


@torch.no_grad()
def decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           do_sample: bool, temperature: float, stop_ids: Sequence[int], pad_token_id: int,
           num_return_sequences: int = 1) -> torch.Tensor:
    """``num_return_sequences`` completions of each left-padded prompt ``[B, P]``: tokens ``[B * n, L]`` (the ``n``
    of a prompt adjacent), ``pad_token_id`` after each row's first stop token, ``L`` the longest completion (at most
    ``max_new_tokens``), as ``generate`` returns them. The model must be in eval mode (``sample_tokens`` sees to it).

    Positions follow the mask (``cumsum - 1``), as ``generate`` sets them; a mask of all ones is dropped, as
    ``generate`` drops it, so the attention takes the same path."""
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature}: sampling needs a temperature above 0 (greedy: do_sample=False)")
    n = num_return_sequences
    rows = input_ids.shape[0] * n
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    mask = None if bool(attention_mask.all()) else attention_mask
    cache = kv_cache(model, input_ids.shape[1] + max_new_tokens)
    last_only = "logits_to_keep" in inspect.signature(model.forward).parameters
    logits = _forward(model, input_ids, mask, positions, cache, last_only)
    # The one-token steps: a plain Llama's forward written out (the same logits, less Python), else its forward.
    step_forward = llama_step(model) or (lambda ids, mask, position, cache: _forward(model, ids, mask, position,
                                                                                    cache, last_only))
    if n > 1:  # the prompt's cache, once per completion
        cache.batch_repeat_interleave(n)
        logits, positions = logits.repeat_interleave(n, 0), positions.repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0) if mask is not None else None
    position = positions[:, -1:]
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    live = torch.arange(rows, device=input_ids.device)  # the output row of each row still decoding
    length = 0
    for step in range(max_new_tokens):
        next_tokens = draw(logits, temperature) if do_sample else logits.argmax(-1)
        tokens[live, step] = next_tokens
        length = step + 1
        going = ~torch.isin(next_tokens, stops)
        if step + 1 == max_new_tokens or not bool(going.any()):
            break
        if not bool(going.all()):  # stopped rows leave the batch
            kept = going.nonzero().squeeze(-1)
            cache.batch_select_indices(kept)
            live, next_tokens, position = live[kept], next_tokens[kept], position[kept]
            mask = mask[kept] if mask is not None else None
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        position = position + 1
        logits = step_forward(next_tokens[:, None], mask, position, cache)
    return tokens[:, :length]


def _forward(model: nn.Module, input_ids: torch.Tensor, mask: Optional[torch.Tensor], positions: torch.Tensor,
             cache: DynamicCache, last_only: bool) -> torch.Tensor:
    """The float32 logits ``[rows, V]`` of the last position (``generate`` casts them the same way), the keys and
    values of ``input_ids`` added to ``cache``; ``last_only``: the head runs on the last position only, as
    ``generate`` asks (``logits_to_keep=1``) of a model that takes it."""
    extra = {"logits_to_keep": 1} if last_only else {}
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                **extra)
    return out.logits[:, -1].float()
