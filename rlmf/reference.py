"""The reference policy of the preference losses, three ways (``algo.reference``):

* ``frozen``: a frozen copy of the starting policy, run beside it at every step.
* ``precomputed``: reference log-probs computed once per (dataset, model) and cached on disk under
  ``algo.reference_cache_dir``; a sweep over beta reads them back instead of recomputing.
* ``lora``: the policy trains a LoRA adapter (peft); the reference is the same network with the adapter disabled,
  so no second copy of the weights exists.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from rlmf.data.collate import FeedbackCollator, PairCollator
from rlmf.logprobs import batched_completion_logps

log = logging.getLogger(__name__)
CONTENT_HASH_LIMIT = 256 * 2**20  # hash weight files' bytes below this total size; their size and mtime above it


def model_fingerprint(model_dir: str | Path) -> str:
    """What identifies a saved model: its weights' bytes (small models) or their names, sizes and mtimes."""
    files = sorted(p for p in Path(model_dir).glob("*") if p.suffix in (".safetensors", ".bin", ".json"))
    digest = hashlib.sha256(str(Path(model_dir).resolve()).encode() if not files else b"")
    total = sum(p.stat().st_size for p in files)
    for p in files:
        digest.update(p.name.encode())
        if total <= CONTENT_HASH_LIMIT:
            digest.update(p.read_bytes())
        else:
            stat = p.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def dataset_fingerprint(features: List[Dict[str, Any]]) -> str:
    keys = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids")
    rows = [[f.get(k) for k in keys] for f in features]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def compute_reference_logps(model: nn.Module, features: List[Dict[str, Any]], data_format: str, pad_token_id: int,
                            max_length: int, batch_size: int = 16) -> List[Any]:
    """Reference log-probs per feature: a ``(chosen, rejected)`` pair for paired data, a float otherwise."""
    if data_format == "unpaired":
        return batched_completion_logps(model, features, FeedbackCollator(pad_token_id), batch_size).tolist()
    out: List[Any] = []
    collate = PairCollator(pad_token_id)
    for start in range(0, len(features), batch_size):
        logps = batched_completion_logps(model, features[start: start + batch_size], collate, batch_size).tolist()
        half = len(logps) // 2
        out += list(zip(logps[:half], logps[half:]))
    return out


def attach_precomputed(model: nn.Module, model_dir: str | Path, splits: Dict[str, List[Dict[str, Any]]],
                       data_format: str, pad_token_id: int, max_length: int, cache_dir: str | Path
                       ) -> Tuple[Path, bool]:
    """Add ``reference_logps`` to every feature of every split, from the cache when it holds them.

    Returns the cache file and whether it was a hit.
    """
    key = hashlib.sha256((model_fingerprint(model_dir) + data_format + str(max_length) + "".join(
        name + dataset_fingerprint(rows) for name, rows in sorted(splits.items()))).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.pt"
    hit = path.exists()
    if hit:
        cached = torch.load(path)
        log.info("reference log-probs: cache hit %s", path)
    else:
        cached = {name: compute_reference_logps(model, rows, data_format, pad_token_id, max_length)
                  for name, rows in splits.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(cached, tmp)
        tmp.replace(path)
        log.info("reference log-probs: computed and cached in %s", path)
    for name, rows in splits.items():
        for feature, ref in zip(rows, cached[name]):
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
