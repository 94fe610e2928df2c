"""The discriminator end to end on CPU: it learns a toy preference through a real Lightning Trainer, scores text,
round-trips through save/load and Lightning checkpoints, and loads each backbone offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import inspect
import random
from pathlib import Path

import lightning
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import rlmf.conf
from rlmf.modules.discriminator import BACKBONES, TINY_ENCODER, Discriminator, build_reward_model, minilm_path, pairwise_accuracy

CONF_DIR = Path(rlmf.conf.__file__).parent / "discriminator"
TRAINING_LOOP_KEYS = {"batch_size", "max_epochs"}

# The toy world: a completion that says "thanks" is preferred to one that does not.
FILLER = "meeting project budget report team schedule update client offer product launch review plan call".split()
NAMES = "alice bob carol dave erin frank grace heidi ivan judy".split()


def toy_pairs(n: int, seed: int) -> list:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        body = lambda: [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
        chosen = body()
        chosen.insert(rng.randint(0, len(chosen)), "thanks")
        pairs.append(
            {
                "prompt": f"write an email to {rng.choice(NAMES)} about the {rng.choice(FILLER)}",
                "chosen": " ".join(chosen),
                "rejected": " ".join(body()),
            }
        )
    return pairs


def tiny_discriminator(**overrides) -> Discriminator:
    """The conf/discriminator/tiny.yaml discriminator, constructor keys only, with ``overrides``."""
    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "tiny.yaml"))
    kwargs = {key: value for key, value in config.items() if key not in TRAINING_LOOP_KEYS}
    return Discriminator(**{**kwargs, **overrides})


def cpu_trainer(tmp_path, max_epochs: int) -> lightning.Trainer:
    return lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )


@pytest.mark.parametrize("name", BACKBONES)
def test_config_keys_are_the_constructor_arguments(name):
    config = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    constructor = set(inspect.signature(Discriminator.__init__).parameters) - {"self"}
    assert set(config) == constructor | TRAINING_LOOP_KEYS
    assert config.backbone == name
    if name == "tiny":  # the code's fallback sizes are the config's
        assert OmegaConf.to_container(config.tiny) == TINY_ENCODER


@pytest.mark.parametrize("objective", ["pairs", "thumbs"])
def test_learns_a_separable_preference(tmp_path, objective):
    lightning.seed_everything(0)
    train_pairs, held_out_pairs = toy_pairs(128, seed=1), toy_pairs(64, seed=2)
    if objective == "pairs":
        train_rows = train_pairs
    else:  # each pair becomes a thumbs-up on the chosen and a thumbs-down on the rejected completion
        train_rows = [{"prompt": p["prompt"], "completion": p[side], "desirable": side == "chosen"} for p in train_pairs for side in ("chosen", "rejected")]
    discriminator = tiny_discriminator(max_length=64, objective=objective)
    accuracy_before = pairwise_accuracy(discriminator, held_out_pairs)

    trainer = cpu_trainer(tmp_path, max_epochs=6 if objective == "pairs" else 5)
    trainer.fit(
        discriminator,
        DataLoader(train_rows, batch_size=16, shuffle=True, collate_fn=discriminator.training_collator()),
        DataLoader(held_out_pairs, batch_size=32, collate_fn=discriminator.validation_collator()),
    )

    accuracy = pairwise_accuracy(discriminator, held_out_pairs)
    print(f"{objective}: held-out pairwise accuracy {accuracy_before:.3f} -> {accuracy:.3f}")
    assert accuracy >= 0.95
    assert trainer.callback_metrics["discriminator/accuracy"].item() == pytest.approx(accuracy)
    assert trainer.callback_metrics["discriminator/margin"].item() > 0
    assert "train/discriminator/loss" in trainer.callback_metrics


def test_score_is_batched_no_grad_eval_mode():
    lightning.seed_everything(0)
    discriminator = tiny_discriminator(tiny={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "hidden_dropout_prob": 0.5})
    discriminator.train()
    prompts = ["hi", "a longer prompt about a product", "x", "write to bob"]
    completions = ["hello", "no", "a much longer completion than the others here", "thanks bob"]

    rewards = discriminator.score(prompts, completions)
    assert rewards.shape == (4,) and rewards.dtype == torch.float32 and rewards.device.type == "cpu"
    assert not rewards.requires_grad
    assert discriminator.training  # the caller's mode is restored
    # eval mode: with dropout 0.5 on, two calls would differ; batching must not change the numbers either
    torch.testing.assert_close(discriminator.score(prompts, completions, batch_size=1), rewards, rtol=1e-5, atol=1e-6)
    assert discriminator.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        discriminator.score(["a", "b"], ["c"])


def test_save_and_load_give_identical_scores(tmp_path):
    lightning.seed_everything(0)
    discriminator = tiny_discriminator(margin=0.5)
    pairs = toy_pairs(8, seed=3)
    prompts, completions = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    discriminator.save(tmp_path / "saved")

    loaded = Discriminator.load(tmp_path / "saved")
    assert loaded.hparams.margin == 0.5 and loaded.hparams.max_length == discriminator.hparams.max_length
    torch.testing.assert_close(loaded.score(prompts, completions), discriminator.score(prompts, completions), rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="Discriminator.save"):
        Discriminator.load(tmp_path)


def test_lightning_checkpoint_round_trip(tmp_path):
    lightning.seed_everything(0)
    discriminator = tiny_discriminator()
    trainer = cpu_trainer(tmp_path, max_epochs=1)
    trainer.fit(discriminator, DataLoader(toy_pairs(4, seed=4), batch_size=4, collate_fn=discriminator.training_collator()))
    trainer.save_checkpoint(tmp_path / "discriminator.ckpt")

    restored = Discriminator.load_from_checkpoint(tmp_path / "discriminator.ckpt")
    assert restored.hparams == discriminator.hparams
    prompts, completions = ["write to carol"], ["thanks carol, see you at the meeting"]
    torch.testing.assert_close(restored.score(prompts, completions), discriminator.score(prompts, completions), rtol=0, atol=1e-6)


def test_hf_backbone_loads_a_locally_saved_model(tmp_path):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = AutoConfig.for_model("bert", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=1)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    discriminator = Discriminator(backbone="hf", name_or_path=str(tmp_path), max_length=32)
    encoding = tokenizer(["a prompt"], ["a completion"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**encoding).logits.squeeze(-1)
    torch.testing.assert_close(discriminator.score(["a prompt"], ["a completion"]), expected, rtol=0, atol=1e-6)


def test_minilm_backbone_loads_pretrained_encoder_offline():
    discriminator = Discriminator()  # backbone=minilm is the default
    pretrained = load_file(str(Path(minilm_path()) / "model.safetensors"))
    embedding_key = next(key for key in pretrained if key.endswith("word_embeddings.weight"))
    torch.testing.assert_close(discriminator.model.bert.embeddings.word_embeddings.weight, pretrained[embedding_key])
    assert discriminator.model.config.num_labels == 1
    rewards = discriminator.score(["write to alice"], ["thanks alice"])
    assert rewards.shape == (1,) and torch.isfinite(rewards).all()


def test_invalid_settings_name_the_key():
    with pytest.raises(ValueError, match="backbone='gpt'"):
        build_reward_model("gpt")
    with pytest.raises(ValueError, match="name_or_path is required by backbone=hf"):
        build_reward_model("hf")
    with pytest.raises(ValueError, match="name_or_path"):
        build_reward_model("minilm", name_or_path="somewhere")
    with pytest.raises(ValueError, match="tiny="):
        build_reward_model("minilm", tiny={"hidden_size": 8})
    with pytest.raises(ValueError, match="objective='dpo'"):
        Discriminator(backbone="tiny", objective="dpo")
    with pytest.raises(ValueError, match="margin"):
        Discriminator(backbone="tiny", objective="thumbs", margin=1.0)


class LengthScorer:
    """Any object with score() plugs in: here longer completions score higher."""

    def score(self, prompts, completions, batch_size=None):
        return torch.tensor([float(len(c)) for c in completions])


def test_pairwise_accuracy_uses_only_score():
    pairs = [
        {"prompt": "p", "chosen": "long reply", "rejected": "short"},
        {"prompt": "p", "chosen": "no", "rejected": "a long rejected reply"},
        {"prompt": "p", "chosen": "same", "rejected": "tied"},  # a tie is not a win
        {"prompt": "p", "chosen": "longer still", "rejected": ""},
    ]
    assert pairwise_accuracy(LengthScorer(), pairs) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one"):
        pairwise_accuracy(LengthScorer(), [])
