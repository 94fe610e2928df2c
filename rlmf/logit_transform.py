"""The parts of a causal LM and what its ``forward`` does to the logits, for code that bypasses ``forward``.

:mod:`rlmf.logprobs` scores completions from the decoder's hidden states and the LM head without calling
``model.forward``, so it must reproduce what ``forward`` does between the head and the logits it returns, which
differs per architecture. What is known is described by a :class:`LogitTransform`
(``logits = cap * tanh(scale * head(h) / cap)``, see :func:`logit_transform`):

* a positive ``scale`` alone (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``) folds into the kernel's
  temperature, exactly;
* a soft-cap (Gemma-2/3 ``final_logit_softcapping``) is not linear: the logits of the labelled rows are materialised
  and capped.

:func:`logit_transform` raises for config attributes known to change the logits of architectures it has not been
taught, rather than letting the log-probs be silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn


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


def describe_model(model: nn.Module) -> str:
    """``LlamaForCausalLM (model_type='llama')``: the architecture, for error messages."""
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
                f"{describe_model(model)} sets config.{name}={value!r}, which transforms the logits in the forward of "
                f"some architectures; rlmf.logprobs reproduces it only for {', '.join(knowers)}. "
                "Refusing rather than computing wrong log-probs: read this architecture's forward and add it to "
                "rlmf.logit_transform.KNOWN_LOGIT_TRANSFORMS."
            )
    return read(base) if read is not None else LogitTransform()
