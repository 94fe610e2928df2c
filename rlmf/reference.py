"""The reference policy of the preference losses, three ways (``algo.reference``):

* ``frozen``: a frozen copy of the starting policy, run beside it at every step.
* ``precomputed``: reference log-probs computed once per (dataset, model) and cached on disk under
  ``algo.reference_cache_dir``; a sweep over beta reads them back instead of recomputing.
* ``lora``: the policy trains a LoRA adapter (peft); the reference is the same network with the adapter disabled,
  so no second copy of the weights exists.

The frozen copy may also be refreshed from the policy during training (TR-DPO, ``algo.reference_sync_steps``):
:func:`mix_into_reference`, checked by :func:`check_reference_sync`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from rlmf.data.collate import FeedbackCollator, PairCollator
from rlmf.files import write_atomic
from rlmf.logprobs import batched_completion_logps

log = logging.getLogger(__name__)

# Bump when the way reference log-probs are computed changes in a way the files hashed below do not show.
REFERENCE_CACHE_VERSION = 2
# The code whose output the reference cache stores: the log-prob path and its kernels (modules, located through the
# import system: rlmf.kernels is installed from the repository's kernels/rlmf_kernels/ folder).
_LOGPROB_CODE = ("rlmf.logprobs", "rlmf.logit_transform", "rlmf.packing", "rlmf.kernels.dispatch",
                 "rlmf.kernels.logprobs_torch", "rlmf.kernels.logprobs_hidden_triton",
                 "rlmf.kernels.logprobs_logits_triton")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")


def _hash_file(digest, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)


def model_fingerprint(name_or_path: str | Path) -> str:
    """What identifies a saved model: the bytes of its weight, config and tokenizer files (or of its one file, a
    ``.gguf``), whatever their size.

    A hub name is fingerprinted through its local snapshot (no network); a name with no local files falls back to
    the name itself, with a warning, since nothing else identifies it.
    """
    directory = Path(name_or_path)
    if directory.is_file():  # a single-file checkpoint (.gguf)
        digest = hashlib.sha256(b"file:")
        _hash_file(digest, directory)
        return digest.hexdigest()
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(name_or_path), local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means: no local snapshot to hash
            log.warning("no local files for %s: its cache entries are keyed by its name only", name_or_path)
            return hashlib.sha256(f"name:{name_or_path}".encode()).hexdigest()
    digest = hashlib.sha256()
    for p in sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES
                    and not p.name.startswith(("eval-", "."))):
        digest.update(str(p.relative_to(directory)).encode())
        _hash_file(digest, p)
    return digest.hexdigest()


def code_fingerprint() -> str:
    """The version of the code that computes log-probs: the cache's own version and the source files' bytes."""
    import importlib.util

    digest = hashlib.sha256(str(REFERENCE_CACHE_VERSION).encode())
    for name in _LOGPROB_CODE:
        _hash_file(digest, Path(importlib.util.find_spec(name).origin))
    return digest.hexdigest()


def dataset_fingerprint(features: List[Dict[str, Any]]) -> str:
    keys = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "kl_completion_ids")
    rows = [[f.get(k) for k in keys] for f in features]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def compute_reference_logps(model: nn.Module, features: List[Dict[str, Any]], data_format: str, pad_token_id: int,
                            batch_size: int = 16, packing: str = "none") -> List[Any]:
    """Reference log-probs per feature, on the model's device.

    Paired data: a ``(chosen, rejected)`` pair. Unpaired data: a float, or ``(completion, kl)`` when the features
    carry KTO's mismatched completion (``kl_completion_ids``, from
    :func:`rlmf.data.alignment.with_mismatched_completions`). ``packing``: the decoder's layout
    (:data:`rlmf.packing.PACKINGS`), which does not change the numbers.
    """
    if data_format == "unpaired":
        collate = FeedbackCollator(pad_token_id)
        logps = batched_completion_logps(model, features, collate, batch_size, packing=packing).tolist()
        if features and "kl_completion_ids" in features[0]:
            mismatched = [{**f, "completion_ids": f["kl_completion_ids"]} for f in features]
            kl = batched_completion_logps(model, mismatched, collate, batch_size, packing=packing).tolist()
            return list(zip(logps, kl))
        return logps
    out: List[Any] = []
    collate = PairCollator(pad_token_id)
    for start in range(0, len(features), batch_size):
        logps = batched_completion_logps(model, features[start: start + batch_size], collate, batch_size,
                                         packing=packing).tolist()
        half = len(logps) // 2
        out += list(zip(logps[:half], logps[half:]))
    return out


def attach_precomputed(model: nn.Module, model_name_or_path: str | Path, splits: Dict[str, List[Dict[str, Any]]],
                       data_format: str, pad_token_id: int, cache_dir: str | Path, placement: Any = None,
                       packing: str = "none") -> Tuple[Path, bool]:
    """Add ``reference_logps`` (and ``reference_kl_logps`` for KTO's mismatched rows) to every feature of every
    split, from the cache when it holds them.

    The cache key is the content of the reference checkpoint's files, the data's token ids, the data format, the
    weights' dtype and device type the log-probs are computed in, the log-prob backend, and the code computing
    them (:func:`code_fingerprint`); never file sizes or modification times. The file is written atomically under
    a per-process temporary name, so concurrent jobs filling the same entry both succeed. Returns the cache file
    and whether it was a hit. ``packing`` (the decoder's layout when computing) is not part of the key: it does not
    change the log-probs beyond float rounding.
    """
    from rlmf.kernels import get_default_backend

    parameter = next(model.parameters())
    key_parts = [model_fingerprint(model_name_or_path), data_format, str(parameter.dtype), parameter.device.type,
                 str(getattr(placement, "autocast_dtype", None)), get_default_backend(), code_fingerprint()]
    key_parts += [name + dataset_fingerprint(rows) for name, rows in sorted(splits.items())]
    key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.pt"
    hit = path.exists()
    if hit:
        cached = torch.load(path)
        log.info("reference log-probs: cache hit %s", path)
    else:
        cached = {name: compute_reference_logps(model, rows, data_format, pad_token_id, packing=packing)
                  for name, rows in splits.items()}
        buffer = io.BytesIO()
        torch.save(cached, buffer)
        write_atomic(path, buffer.getvalue())
        log.info("reference log-probs: computed and cached in %s", path)
    for name, rows in splits.items():
        for feature, ref in zip(rows, cached[name]):
            if "kl_completion_ids" in feature:
                feature["reference_logps"], feature["reference_kl_logps"] = ref
            else:
                feature["reference_logps"] = ref
    return path, hit


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    """Wrap ``model`` so only a LoRA adapter on its linear layers trains; ``disable_adapter()`` gives the base."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def frozen_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).requires_grad_(False).eval()


def prepare_reference(mode: str, model: nn.Module, lora_rank: int = 8, data_format: str = "paired"
                      ) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The policy to train and the reference module for ``mode`` (None where the batch or LoRA supplies it).

    ``precomputed`` still needs a live frozen copy for ``paired_online`` (HyPO): its online samples are new at every
    step, so only the offline pairs can come from the cache.
    """
    if mode == "frozen" or (mode == "precomputed" and data_format == "paired_online"):
        return model, frozen_copy(model)
    if mode == "lora":
        return add_lora(model, lora_rank), None
    if mode in ("precomputed", "none"):
        return model, None
    raise ValueError(f"algo.reference={mode!r} is not one of frozen, precomputed, lora, none")


def check_reference_sync(steps: Optional[int], alpha: float, reference_mode: str, data_format: str) -> None:
    """Raise ``ValueError`` unless TR-DPO's refresh can run: ``steps`` (``algo.reference_sync_steps``) None, or an
    integer >= 1 with ``alpha`` (``algo.reference_mixup_alpha``) in (0, 1], an offline loss and a frozen reference."""
    if steps is None:
        return
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"reference_sync_steps={steps!r} must be an integer >= 1 (optimiser steps between refreshes "
                         "of the reference), or null for a fixed reference")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(f"reference_mixup_alpha={alpha!r} must lie in (0, 1] (1: the reference becomes a copy of "
                         "the policy)")
    if data_format == "online":
        raise ValueError("reference_sync_steps applies to the offline losses (rlmf.modules.generator); the online "
                         "objectives keep their reference fixed")
    if reference_mode != "frozen":
        raise ValueError(f"reference_sync_steps refreshes the frozen copy of the reference, but algo.reference="
                         f"{reference_mode}: precomputed log-probs of the starting model would go stale, lora's "
                         "reference is the base network under the adapter, and none has no reference; use frozen "
                         "(with a loss that takes reference log-probs)")


@torch.no_grad()
def mix_into_reference(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO's refresh, in place: each parameter of ``reference`` becomes ``alpha * policy + (1 - alpha) *
    reference`` (``alpha = 1``: a copy; Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
    Alignment"). Parameters are matched by name; buffers are left alone (they are not trained)."""
    policy_parameters = dict(policy.named_parameters())
    for name, target in reference.named_parameters():
        source = policy_parameters.get(name)
        if source is None or source.shape != target.shape:
            raise ValueError(f"cannot refresh the reference from the policy: parameter {name!r} "
                             f"{'is missing' if source is None else f'has shape {tuple(source.shape)}'} in the "
                             f"policy (reference: {tuple(target.shape)}); sharded or wrapped policies are not "
                             "supported")
        target.mul_(1.0 - alpha).add_(source.detach().to(target.dtype), alpha=alpha)
