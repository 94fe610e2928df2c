"""The one way to build each module from the config (rlmf.modules.build): what the config says is what the module
holds, for the offline, online and discriminator modules the stages and the benchmarks build."""

import pytest

from rlmf.models import build_tiny_generator, train_tokenizer
from rlmf.modules.build import build_aligned_generator, build_discriminator, build_online_generator, build_sft_generator
from rlmf.reference import frozen_copy


@pytest.fixture(scope="module")
def tiny():
    tokenizer = train_tokenizer(["Dear team, thank you for the report.", "Hello, the meeting moved to Friday."] * 8,
                                vocab_size=300)
    return build_tiny_generator(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                max_position_embeddings=64, seed=0), tokenizer


def test_sft_generator_takes_generator_sft_settings(compose, tiny):
    cfg = compose("generator.sft.lr=0.123", "generator.sft.warmup_ratio=0.25", "generator.packing=none")
    module = build_sft_generator(cfg, tiny[0])
    assert (module.hparams.loss_name, module.hparams.lr, module.hparams.warmup_ratio, module.hparams.packing) == \
        ("sft", 0.123, 0.25, "none")


def test_aligned_generator_takes_algo_and_tr_dpo_settings(compose, tiny):
    model, tokenizer = tiny
    cfg = compose("algo=tr_dpo", "algo.optim.lr=0.004", "algo.loss.beta=0.3", "algo.reference_sync_steps=7",
                  "algo.reference_mixup_alpha=0.5")
    module = build_aligned_generator(cfg, model, tokenizer, frozen_copy(model), "frozen")
    h = module.hparams
    assert (h.loss_name, h.lr, h.loss_kwargs["beta"], h.reference_sync_steps, h.reference_mixup_alpha) == \
        (cfg.algo.name, 0.004, 0.3, 7, 0.5)
    assert h.stop_token_ids == [tokenizer.eos_token_id] and h.pad_token_id == tokenizer.pad_token_id


def test_online_generator_takes_algo_online_settings(compose, tiny):
    model, tokenizer = tiny
    cfg = compose("algo=grpo", "algo.online.num_generations=3", "algo.online.max_new_tokens=11",
                  "algo.online.temperature=0.7", "algo.online.mask_truncated_completions=true",
                  "algo.online.scale_rewards=batch", "trainer.gradient_clip_val=0.5")
    module = build_online_generator(cfg, model, tokenizer, reward=lambda p, c: None, reference=frozen_copy(model))
    h = module.hparams
    assert (h.loss_name, h.num_generations, h.max_new_tokens, h.temperature, h.mask_truncated_completions,
            h.scale_rewards, h.gradient_clip_val) == ("grpo", 3, 11, 0.7, True, "batch", 0.5)
    # Unset online temperature and length fall back to the generator's.
    cfg = compose("algo=grpo", "generator.temperature=0.9", "generator.max_new_tokens=13")
    h = build_online_generator(cfg, model, tokenizer, reward=lambda p, c: None, reference=frozen_copy(model)).hparams
    assert (h.temperature, h.max_new_tokens) == (0.9, 13)


def test_discriminator_takes_the_discriminator_group(compose):
    cfg = compose("discriminator.backbone=tiny", "discriminator.lr=0.002", "discriminator.objective=thumbs")
    module = build_discriminator(cfg)
    assert (module.hparams.backbone, module.hparams.lr, module.hparams.objective) == ("tiny", 0.002, "thumbs")
