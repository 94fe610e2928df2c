"""Rewards read off a model's output: a trained discriminator, or any sequence classifier's label."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from rlmf.data.reward_collate import encode_prompt_completion
from rlmf.placement import Placement
from rlmf.rewards.base import Reward, RewardConfigError, ScorerReward, place

CLASSIFIER_INPUTS = ("completion", "concat", "pair")


def load_discriminator_reward(path: Union[str, Path], *, name: Optional[str] = None,
                              placement: Optional[Placement] = None, batch_size: Optional[int] = None,
                              torch_dtype: Optional[str] = None) -> ScorerReward:
    """The discriminator ``Discriminator.save`` wrote to ``path``, placed, as a reward (its own ``score``)."""
    from rlmf.modules.discriminator import Discriminator

    reward = ScorerReward(Discriminator.load(path), name=name or "discriminator", placement=placement,
                          batch_size=batch_size)
    reward.kind = "discriminator"
    place(reward.scorer, reward.placement, torch_dtype)
    return reward


def label_index(id2label: Dict[int, str], label: Union[str, int], where: str) -> int:
    """The output index of ``label`` (a name in ``id2label``, or an index); a clear error listing the labels."""
    labels = {int(k): v for k, v in id2label.items()}
    if isinstance(label, int) and not isinstance(label, bool):
        if label in labels:
            return label
    else:
        matches = [i for i, name in labels.items() if name == label]
        if matches:
            return matches[0]
    listed = ", ".join(f"{i}: {name!r}" for i, name in sorted(labels.items()))
    raise RewardConfigError(f"classifier label={label!r} is not a label of {where}; its labels (config.id2label) "
                            f"are {{{listed}}}")


class ClassifierReward(Reward):
    """The logit (or probability) of one named label of an ``AutoModelForSequenceClassification``.

    Args:
        name_or_path: the classifier (hub name or local directory); its own tokenizer is used.
        label: a label name in ``config.id2label`` (an ``int`` index is accepted too).
        probability: False: the label's logit. True: its probability: softmax over the labels, or the sigmoid of
            the logit when the model has a single output or ``problem_type="multi_label_classification"``.
        input: ``completion`` (the completion alone), ``concat`` (``prompt + completion`` as one text, as written)
            or ``pair`` (prompt and completion as a sentence pair, cut like the discriminator's input).
        max_length: most tokens per row (``completion`` cuts the text's end, ``concat`` its start so the completion
            is kept, ``pair`` the prompt's start first).
        batch_size: rows per forward pass (default of :meth:`score`).
        torch_dtype: weights dtype; None: the placement's.
    """

    kind = "classifier"

    def __init__(self, name_or_path: str, label: Union[str, int], *, probability: bool = False,
                 input: str = "completion", max_length: int = 512, batch_size: int = 32,
                 torch_dtype: Optional[str] = None, name: Optional[str] = None,
                 placement: Optional[Placement] = None):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        if input not in CLASSIFIER_INPUTS:
            raise RewardConfigError(f"classifier input={input!r} is not one of {', '.join(CLASSIFIER_INPUTS)}")
        super().__init__(name=name, placement=placement)
        config = AutoConfig.from_pretrained(str(name_or_path))
        self.label_index = label_index(config.id2label, label, str(name_or_path))
        self.label = config.id2label[self.label_index]
        self.sigmoid = config.num_labels == 1 or config.problem_type == "multi_label_classification"
        self.probability, self.input, self.max_length, self.batch_size = probability, input, max_length, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        model = AutoModelForSequenceClassification.from_pretrained(str(name_or_path), config=config)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = place(model, self.placement, torch_dtype)

    def encode(self, prompts: List[str], completions: List[str]) -> Dict[str, torch.Tensor]:
        """The tokenised batch the classifier reads for these rows (see ``input``)."""
        if self.input == "pair":
            return encode_prompt_completion(self.tokenizer, prompts, completions, self.max_length)
        texts = completions if self.input == "completion" else [p + c for p, c in zip(prompts, completions)]
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left" if self.input == "concat" else "right"
        try:
            return self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                                  return_tensors="pt")
        finally:
            self.tokenizer.truncation_side = side

    def _score(self, prompts, completions, batch_size):
        batch_size = batch_size or self.batch_size
        device, out = self.placement.device, []
        with self.placement.inference():
            for start in range(0, len(prompts), batch_size):
                encoding = self.encode(prompts[start:start + batch_size], completions[start:start + batch_size])
                logits = self.model(**{k: v.to(device) for k, v in encoding.items()}).logits.float()
                if self.probability:
                    logits = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
                out.append(logits[:, self.label_index].cpu())
        return torch.cat(out), None, {}
