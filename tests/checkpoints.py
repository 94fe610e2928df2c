"""Tiny random checkpoints of real Hugging Face causal-LM architectures, saved like any hub model.

``save_tiny_checkpoint(arch, directory)`` writes a model *and* a tokenizer with ``save_pretrained``, so that
``AutoModelForCausalLM.from_pretrained(directory)`` and ``AutoTokenizer.from_pretrained(directory)`` (and
``rlmf.models.load_generator``) load it offline. Tests use it through the session-scoped ``tiny_checkpoint`` fixture
(tests/conftest.py), which builds each architecture once.

The architectures are chosen for what their ``forward`` does between the last hidden state and the returned logits,
and each config is set so that this difference is large enough to matter (a default Gemma-2 cap of 30 would never
touch the logits of a random 32-wide model):

=============  ===============================================================================================
``llama``      plain head, tied to the input embedding
``qwen2``      plain head, untied
``gemma2``     ``final_logit_softcapping``: ``cap * tanh(logits / cap)``, small cap, tied
``gemma3``     Gemma-3 text model (``Gemma3ForCausalLM``), the same soft-cap
``gpt2``       plain tied head; the decoder sits under ``transformer`` rather than ``model``
``phi``        untied head with a bias (set to random values here: ``save_pretrained`` would keep zeros)
``cohere``     ``logit_scale``: logits multiplied by it
``cohere2``    the same ``logit_scale``
``granite``    ``logits_scaling``: logits divided by it
=============  ===============================================================================================
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Dict

import torch

# Sentences the tokenizer is trained on; any text works, it only needs to yield a few hundred merges.
_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Dear Ms. Alvarez, thank you for your note about the quarterly report.",
    "Please find attached the invoice for the consulting work done in March.",
    "We would love to schedule a short call next week to discuss the proposal.",
    "Best regards, and looking forward to hearing from you soon.",
    "Numbers like 12, 345 and 6789 appear in emails about budgets and dates.",
    "A preference pair has a chosen completion and a rejected completion.",
    "Log-probabilities of the completion tokens are summed for every row.",
]
VOCAB_SIZE = 384

# Shared sizes: 2 layers, 32 wide, 4 query heads over 2 key/value heads, short context.
_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
# Random weights this large give logits of a few units, so soft-caps and scalings change the log-probs visibly.
_INIT = dict(initializer_range=0.2)


def _llama(special: Dict[str, int], **overrides: Any):
    from transformers import LlamaConfig

    return LlamaConfig(**_SIZES, **_INIT, **special, tie_word_embeddings=True, **overrides)


def _qwen2(special, **overrides):
    from transformers import Qwen2Config

    return Qwen2Config(**_SIZES, **_INIT, **special, tie_word_embeddings=False, **overrides)


def _gemma2(special, **overrides):
    from transformers import Gemma2Config

    settings = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=16, final_logit_softcapping=2.0,
                    attn_logit_softcapping=50.0)
    settings.update(overrides)
    return Gemma2Config(**_SIZES, **_INIT, **special, **settings)


def _gemma3(special, **overrides):
    from transformers import Gemma3TextConfig

    settings = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=16, final_logit_softcapping=2.0)
    settings.update(overrides)
    return Gemma3TextConfig(**_SIZES, **_INIT, **special, **settings)


def _gpt2(special, **overrides):
    from transformers import GPT2Config

    settings = dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=128, initializer_range=0.2)
    settings.update(overrides)
    return GPT2Config(**special, **settings)


def _phi(special, **overrides):
    from transformers import PhiConfig

    settings = dict(tie_word_embeddings=False, partial_rotary_factor=0.5)
    settings.update(overrides)
    return PhiConfig(**_SIZES, **_INIT, **special, **settings)


def _cohere(special, **overrides):
    from transformers import CohereConfig

    settings = dict(logit_scale=2.5)
    settings.update(overrides)
    return CohereConfig(**_SIZES, **_INIT, **special, **settings)


def _cohere2(special, **overrides):
    from transformers import Cohere2Config

    settings = dict(logit_scale=2.5, sliding_window=16)
    settings.update(overrides)
    return Cohere2Config(**_SIZES, **_INIT, **special, **settings)


def _granite(special, **overrides):
    from transformers import GraniteConfig

    settings = dict(logits_scaling=0.4)  # divides the logits: 0.4 makes them 2.5x larger
    settings.update(overrides)
    return GraniteConfig(**_SIZES, **_INIT, **special, **settings)


CONFIGS: Dict[str, Callable] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gpt2": _gpt2,
    "phi": _phi,
    "cohere": _cohere,
    "cohere2": _cohere2,
    "granite": _granite,
}
ARCHITECTURES = tuple(CONFIGS)
# Attention implementations that take a custom mask, per architecture (transformers refuses SDPA for Gemma-2's
# soft-capping): what packed rows run through.
MASKED_ATTENTION = {arch: ("eager",) if arch == "gemma2" else ("sdpa", "eager") for arch in ARCHITECTURES}


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """The byte-level BPE tokenizer every tiny checkpoint shares (trained once per process; eos and pad set)."""
    from rlmf.models import train_tokenizer

    tokenizer = train_tokenizer(_TEXTS, VOCAB_SIZE)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    return tokenizer


def tiny_config(arch: str, **overrides: Any):
    """The ``transformers`` config of the tiny ``arch`` model (``overrides`` replace any field)."""
    if arch not in CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    tokenizer = tiny_tokenizer()
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CONFIGS[arch](special, **overrides)


def save_tiny_checkpoint(arch: str, directory, seed: int = 0, **overrides: Any) -> Path:
    """Build a random tiny ``arch`` model (one of :data:`ARCHITECTURES`) and save it with its tokenizer.

    Args:
        arch: architecture name, e.g. ``"gemma2"``.
        directory: where to write (created if missing).
        seed: weight initialisation seed (the global RNG state is left untouched).
        overrides: config fields to change, e.g. ``final_logit_softcapping=5.0``.

    Returns:
        ``directory`` as a :class:`~pathlib.Path`.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings()
        if head.bias is not None:
            # Heads with a bias start at zero; random values make a dropped bias visible in the log-probs.
            with torch.no_grad():
                head.bias.normal_(std=1.0)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


# (prompt, completion) rows of different lengths, so each row is padded differently.
TEXTS = [
    ("Dear Ms. Alvarez,", " thank you for your note about the quarterly report."),
    ("Please find attached", " the invoice."),
    ("We would love to schedule a short call", " next week to discuss the proposal, and the budget numbers."),
]


def padded_batch(tokenizer, side: str, device=None):
    """``(input_ids, attention_mask, labels)`` ``[3, L]`` of :data:`TEXTS`, padded on ``side`` ("right" or
    "left"); labels cover the completions (eos included) only."""
    rows = [(tokenizer(p)["input_ids"], tokenizer(c)["input_ids"] + [tokenizer.eos_token_id]) for p, c in TEXTS]
    return padded_rows(rows, tokenizer.pad_token_id, side, device=device)


def pair_rows(tokenizer, side: str, device=None):
    """``(input_ids, attention_mask, labels, groups)``: ``[2 * len(TEXTS), L]`` paired rows, chosen rows (each text's
    completion) then rejected rows (the next text's completion after the same prompt), padded on ``side``, on
    ``device``; and the groups ``[2 * len(TEXTS)]`` on the CPU (a pair's two rows share one, as the modules keep it)."""
    prompts = [tokenizer(p)["input_ids"] for p, _ in TEXTS]
    completions = [tokenizer(c)["input_ids"] + [tokenizer.eos_token_id] for _, c in TEXTS]
    rows = list(zip(prompts, completions))
    rows += [(p, completions[(i + 1) % len(completions)]) for i, p in enumerate(prompts)]
    return (*padded_rows(rows, tokenizer.pad_token_id, side, device=device), torch.arange(len(TEXTS)).repeat(2))


def padded_rows(rows, pad_token_id: int, side: str, width=None, device=None):
    """``(input_ids, attention_mask, labels)`` ``[len(rows), width]`` of ``(prompt_ids, completion_ids)`` rows,
    padded on ``side`` to ``width`` (default: the longest row); labels cover the completions only."""
    width = width or max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_token_id)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        at = slice(0, n) if side == "right" else slice(width - n, width)
        input_ids[i, at] = torch.tensor(prompt + completion)
        attention_mask[i, at] = 1
        labels[i, at] = torch.tensor([-100] * len(prompt) + completion)
    return input_ids.to(device), attention_mask.to(device), labels.to(device)
