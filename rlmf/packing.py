"""Packed rows: a padded batch re-laid without padding, rows that share a prompt encoding it once.

A preference batch holds each prompt twice (chosen and rejected rows), an online rollout ``G`` times, and every row
is padded to the longest. :func:`pack` lays the same tokens out as

    [prompt, completion_1, completion_2, ...]  [prompt', completion'_1, ...]  ...   (no padding between them)

in as few rows of ``capacity`` tokens as first-fit-decreasing bin packing allows. Attention inside a packed row is
restricted by a mask so that each token sees exactly what it saw in its padded row:

* a prompt token sees the earlier tokens of its own prompt;
* a completion token sees its prompt and the earlier tokens of its own completion, never a sibling completion;
* positions restart: completion ``k`` continues at ``len(prompt)``, as if it followed the prompt alone.

So the decoder's hidden states, and every log-prob, are those of the padded rows (to float tolerance: the matmuls
have other shapes), while the prompt is encoded once per group and padding is not computed at all. Rows are grouped
by the caller (``groups``: the chosen and the rejected row of a pair, the ``G`` completions of a prompt); within a
group only rows whose prompt tokens are identical share them, the others are packed on their own.

``prompt`` here means the attended tokens before a row's first labelled token; the rest of the row, labelled or not,
is its completion. Shapes: padded rows ``[B, L]``; packed rows ``[R, C]``; the mask ``[R, C, C]``.

:func:`packed_hidden` runs a decoder on the packed layout, with the mask in the form its attention implementation
takes (:func:`packed_attention_mask`); whether a given model's numbers survive that is probed in
:func:`rlmf.logprobs.packing_problem`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from rlmf.data.collate import IGNORE_INDEX

# How rows are laid out for the decoder: padded rows as collated, packed rows with each row on its own, or packed
# rows in which the rows of a group that share their prompt encode it once.
PACKINGS = ("none", "padding_free", "shared_prompt")


@dataclass
class PackedRows:
    """The packed layout of a padded batch.

    Attributes:
        input_ids: ``[R, C]`` tokens (0 in the unused tail of a packed row).
        position_ids: ``[R, C]`` each token's position in its padded row (counting attended tokens only).
        allowed: ``[R, C, C]`` bool, ``allowed[r, q, k]``: query ``q`` attends key ``k`` (causal included). Every
            token attends at least itself, so no attention row is empty.
        index: ``[B, L]`` long, the flat position ``r * C + c`` of each attended token of the padded rows, -1 at
            padding: ``hidden.reshape(R * C, H)[index[b, t]]`` is the padded row's hidden state at ``[b, t]``.
        shared_tokens: prompt tokens not computed again because a group shares them (a statistic).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    index: torch.Tensor
    shared_tokens: int

    def windowed(self, window: int) -> torch.Tensor:
        """``allowed`` further restricted to keys less than ``window`` positions back (sliding-window layers:
        ``q_position - k_position < window``, as transformers' sliding mask counts it)."""
        pos = self.position_ids
        return self.allowed & ((pos[:, :, None] - pos[:, None, :]) < window)


@dataclass
class _Unit:
    """One prompt and the completions that follow it: ``(row, attended columns, prompt length, completion tokens)``."""

    prompt: List[int]
    rows: List[Tuple[int, torch.Tensor, int, List[int]]]

    @property
    def size(self) -> int:
        return len(self.prompt) + sum(len(rest) for _, _, _, rest in self.rows)


def _units(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
           groups: Optional[List[int]]) -> List[_Unit]:
    attended = attention_mask.bool()
    labelled = labels != IGNORE_INDEX
    units: List[_Unit] = []
    by_prompt: Dict[Tuple[int, Tuple[int, ...]], _Unit] = {}
    for b in range(input_ids.shape[0]):
        cols = attended[b].nonzero().squeeze(1)
        tokens = input_ids[b, cols].tolist()
        first = labelled[b, cols].nonzero()
        p = int(first[0]) if len(first) else len(tokens)
        if groups is None:
            unit = None
        else:
            key = (groups[b], tuple(tokens[:p]))
            unit = by_prompt.get(key)
        if unit is None:
            unit = _Unit(tokens[:p], [])
            units.append(unit)
            if groups is not None:
                by_prompt[key] = unit
        unit.rows.append((b, cols, p, tokens[p:]))
    return units


def _fit(units: List[_Unit], capacity: int) -> List[_Unit]:
    """Units no larger than ``capacity``: a group whose prompt and completions do not fit in one is split into
    several, each with its own copy of the prompt and as many of the completions as fit (a single row always fits:
    ``capacity`` is at least the padded width)."""
    fitted: List[_Unit] = []
    for unit in units:
        if unit.size <= capacity:
            fitted.append(unit)
            continue
        part = _Unit(unit.prompt, [])
        for row in unit.rows:
            if part.rows and part.size + len(row[3]) > capacity:
                fitted.append(part)
                part = _Unit(unit.prompt, [])
            part.rows.append(row)
        fitted.append(part)
    return fitted


def _first_fit_decreasing(sizes: List[int], capacity: int) -> List[List[int]]:
    """Unit indices per packed row, each row's sizes summing to at most ``capacity`` (largest units first)."""
    rows: List[List[int]] = []
    free: List[int] = []
    for u in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for r, room in enumerate(free):
            if sizes[u] <= room:
                rows[r].append(u)
                free[r] -= sizes[u]
                break
        else:
            rows.append([u])
            free.append(capacity - sizes[u])
    return rows


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
         groups: Optional[torch.Tensor] = None, capacity: Optional[int] = None) -> PackedRows:
    """Pack padded rows ``[B, L]`` (left- or right-padded; labels aligned with ``input_ids``, -100 where no loss).

    Args:
        groups: ``[B]`` ints; rows with equal ``groups`` and identical prompt tokens share one copy of the prompt.
            None: no sharing (padding-free packing only).
        capacity: tokens per packed row. None: the largest group, but at least the padded width ``L`` and at most
            ``2 L``, which holds any pair (prompt, chosen and rejected each fit in ``L``). A group larger than the
            capacity (an online prompt's many completions) is split, each part with its own copy of the prompt:
            attention under a dense mask is quadratic in a packed row's length, so rows are kept near the padded
            width while the linear layers see fewer tokens.

    Returns:
        :class:`PackedRows` on ``input_ids``' device.
    """
    device = input_ids.device
    ids, mask, labs = input_ids.cpu(), attention_mask.cpu(), labels.cpu()
    units = _units(ids, mask, labs, groups.tolist() if groups is not None else None)
    padded_width = max(ids.shape[1], 1)
    if capacity is None:
        capacity = min(max((u.size for u in units), default=1), 2 * padded_width)
    width = max(capacity, padded_width)
    units = _fit(units, width)
    sizes = [u.size for u in units]
    layout = _first_fit_decreasing(sizes, width)
    n_rows = len(layout)

    packed_ids = torch.zeros(n_rows, width, dtype=torch.long)
    position = torch.zeros(n_rows, width, dtype=torch.long)
    # Pads get a unit of their own (a negative id unique to the slot) so that they attend only themselves.
    unit_of = -1 - torch.arange(n_rows * width).view(n_rows, width)
    branch_of = torch.full((n_rows, width), -1, dtype=torch.long)  # -1: a prompt token, visible to every branch
    index = torch.full(ids.shape, -1, dtype=torch.long)
    shared = 0
    for r, members in enumerate(layout):
        at = 0
        for u in members:
            unit = units[u]
            p = len(unit.prompt)
            prompt_at = at
            packed_ids[r, at:at + p] = torch.tensor(unit.prompt, dtype=torch.long)
            position[r, at:at + p] = torch.arange(p)
            unit_of[r, at:at + p] = u
            at += p
            for b, cols, row_p, rest in unit.rows:
                n = len(rest)
                packed_ids[r, at:at + n] = torch.tensor(rest, dtype=torch.long)
                position[r, at:at + n] = torch.arange(row_p, row_p + n)
                unit_of[r, at:at + n] = u
                branch_of[r, at:at + n] = b
                index[b, cols[:row_p]] = r * width + prompt_at + torch.arange(row_p)
                index[b, cols[row_p:]] = r * width + at + torch.arange(n)
                at += n
            shared += p * (len(unit.rows) - 1)
        branch_of[r, at:] = -2  # pads: not prompt tokens (their own unit keeps them apart anyway)

    unit_of, branch_of = unit_of.to(device), branch_of.to(device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    same_unit = unit_of[:, :, None] == unit_of[:, None, :]
    visible = (branch_of[:, None, :] == -1) | (branch_of[:, :, None] == branch_of[:, None, :])
    allowed = same_unit & visible & causal
    return PackedRows(packed_ids.to(device), position.to(device), allowed, index.to(device), shared)


def row_groups(batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The prompt groups of a collated batch: ``[2B]`` for a paired batch (chosen row ``i`` and rejected row
    ``B + i`` share prompt ``i``: :class:`rlmf.data.collate.PairCollator`), None for rows that share nothing."""
    if "chosen_lengths" not in batch:
        return None
    pairs = batch["chosen_lengths"].shape[0]
    return torch.arange(pairs, device=batch["input_ids"].device).repeat(2)


def stack_rows(*row_sets: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack ``(input_ids, attention_mask, labels)`` triples of widths ``L_i`` into one ``[sum B_i, max L_i]``
    triple, the narrower rows padded on the right (token 0, mask 0, label -100), so they run in one forward."""
    width = max(ids.shape[1] for ids, _, _ in row_sets)

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return (torch.cat([widen(ids, 0) for ids, _, _ in row_sets]),
            torch.cat([widen(mask, 0) for _, mask, _ in row_sets]),
            torch.cat([widen(labels, IGNORE_INDEX) for _, _, labels in row_sets]))


# --- the decoder on packed rows: the mask each attention implementation takes ------------------------------------

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


class PackingUnsupported(ValueError):
    """The model cannot run on packed rows (its attention does not take a custom 4D mask)."""


# Attention implementations that take a ready 4D mask and use it as given (transformers 5.24 masking_utils returns
# a 4D mask unchanged): SDPA a boolean one, eager an additive float one.
MASKABLE_ATTENTION = ("sdpa", "eager")


def packed_attention_mask(decoder: nn.Module, packed: PackedRows):
    """The 4D mask (``[R, 1, C, C]``) of ``packed`` in the form ``decoder``'s attention takes (``decoder``: the
    causal LM without its head, :func:`rlmf.logit_transform.decoder_of`), or, for a model that mixes full and
    sliding-window layers (``config.layer_types``), a dict of one per layer type as its forward accepts. A model
    whose every layer slides (``sliding_window`` without ``layer_types``) gets the window applied.

    Raises:
        PackingUnsupported: another attention implementation, or a layer type other than full and sliding.
    """
    config = decoder.config.get_text_config() if hasattr(decoder.config, "get_text_config") else decoder.config
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in MASKABLE_ATTENTION:
        raise PackingUnsupported(f"attn_implementation={implementation!r} does not take a custom 4D mask (packing "
                                 f"needs one of {', '.join(MASKABLE_ATTENTION)})")
    dtype = decoder.get_input_embeddings().weight.dtype

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


def packed_hidden(decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  mask: torch.Tensor, groups: Optional[torch.Tensor], capacity: Optional[int] = None
                  ) -> torch.Tensor:
    """The hidden states ``[N, H]`` that predict the labels where ``mask`` (``[B, L-1]``), computed by ``decoder``
    (the causal LM without its head) on the packed layout of the padded rows (:func:`pack`; ``groups`` and
    ``capacity`` as there)."""
    packed = pack(input_ids, attention_mask, labels, groups, capacity)
    with varying_shape_attention(input_ids.device):
        hidden = decoder(input_ids=packed.input_ids, attention_mask=packed_attention_mask(decoder, packed),
                         position_ids=packed.position_ids, use_cache=False).last_hidden_state  # [R, C, H]
    sources = packed.index[:, :-1][mask]
    if bool((sources < 0).any()):
        raise ValueError("a labelled token follows a padding position; packed rows need each completion to follow "
                         "its prompt (labels -100 on the prompt, padding only before or after the row)")
    return hidden.reshape(-1, hidden.shape[-1])[sources]
