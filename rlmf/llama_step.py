"""One decode step of a transformers Llama, written out: the same operations as ``LlamaForCausalLM.forward`` in the
same order, without the wrappers around them.

A Llama decode step on a small model is mostly Python: the tiny generator's step (2 layers, hidden 128, 32 rows)
spends about 1.6 ms in matrix products and attention and as much again in what surrounds them (keyword
deprecation and config-default decorators, output capturing, the gradient-checkpointing layer's call, output
dataclasses, the module call machinery of every wrapper). :func:`llama_step` calls the model's own submodules and
transformers' own functions (``create_causal_mask``, the rotary embedding, ``apply_rotary_pos_emb``, the attention
function the config names) on the same tensors in the same order, so its logits are the model's, bit for bit
(tests/test_generation.py compares them). Measured on the tiny generator's rollout (README "Sampling"): the forward
alone 1.3x faster, a whole decode step (with the draw and the loop around it) 10-15% faster.

Only a plain ``LlamaForCausalLM`` in eval mode takes it (:func:`inlined_step_refusal` says why another does not):
no hooks on the modules it steps over and none of their forwards replaced, the attention ``sdpa`` or ``eager``.
Every other model decodes through its own ``forward``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

ATTENTIONS = ("sdpa", "eager")


def inlined_step_refusal(model: nn.Module) -> Optional[str]:
    """Why :func:`llama_step` cannot stand in for ``model``'s forward, or None when it can."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama import modeling_llama
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaModel

    if type(model) is not LlamaForCausalLM or type(getattr(model, "model", None)) is not LlamaModel:
        return f"{type(model).__name__} is not a plain LlamaForCausalLM"
    if model.training:
        return "the model is in training mode"
    if model.config._attn_implementation not in ATTENTIONS:
        return f"attention {model.config._attn_implementation!r} is not one of {ATTENTIONS}"
    layers = list(model.model.layers[: model.config.num_hidden_layers])
    stepped_over = [model, model.model, *layers, *(layer.self_attn for layer in layers)]
    if any(type(layer) is not LlamaDecoderLayer or type(layer.self_attn) is not LlamaAttention for layer in layers):
        return "a decoder layer is not transformers' own"
    if any(m._forward_hooks or m._forward_pre_hooks for m in stepped_over):
        return "a hook is registered on a module whose forward it would skip"
    # Hub kernels (transformers' `use_kernels`) may replace a module's forward; the submodules the step calls keep
    # theirs, and the functions it calls are the ones modeling_llama's forwards call, but a replaced forward of a
    # module it steps over would be skipped.
    if any("forward" in vars(m) or type(m).forward.__module__ != modeling_llama.__name__ for m in stepped_over):
        return "the forward of a module it steps over was replaced (hub kernels?)"
    return None


def llama_step(model: nn.Module) -> Optional[Callable[..., torch.Tensor]]:
    """``step(input_ids [R, 1], attention_mask [R, K] or None, position_ids [R, 1], cache) -> logits [R, V]``
    (float32, the last position's), the keys and values added to ``cache``: ``model``'s forward with
    ``logits_to_keep=1``, bit for bit; None where :func:`inlined_step_refusal` turns ``model`` down."""
    if inlined_step_refusal(model) is not None:
        return None
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

    base = model.model
    layers = list(base.layers[: base.config.num_hidden_layers])
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(base.config._attn_implementation, eager_attention_forward)

    def step(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], position_ids: torch.Tensor,
             cache) -> torch.Tensor:
        hidden = base.embed_tokens(input_ids)
        mask = create_causal_mask(config=base.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        cos, sin = base.rotary_emb(hidden, position_ids=position_ids)
        for layer in layers:
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden)
            shape = (*normed.shape[:-1], -1, attention.head_dim)
            query = attention.q_proj(normed).view(shape).transpose(1, 2)
            key = attention.k_proj(normed).view(shape).transpose(1, 2)
            value = attention.v_proj(normed).view(shape).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            key, value = cache.update(key, value, attention.layer_idx)
            out, _ = attend(attention, query, key, value, mask, dropout=0.0, scaling=attention.scaling)
            hidden = hidden + attention.o_proj(out.reshape(*normed.shape[:-1], -1).contiguous())
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = base.norm(hidden)
        return model.lm_head(hidden[:, -1:])[:, -1].float()

    return step
