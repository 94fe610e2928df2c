"""The generator: tiny SFT lowers validation loss; save/load round trips; the hub-style path loads a local dir."""

import lightning as L
import torch

from rlmf.data.sft import SFTDataModule
from rlmf.generation import generate
from rlmf.models import build_tiny_generator, load_generator, save_generator, train_tokenizer
from rlmf.logprobs import completion_logps
from rlmf.modules.generator import Generator
from rlmf.tasks.persona_email import build_world, corpus_texts


def tiny(world, seed=0):
    tokenizer = train_tokenizer(corpus_texts(world), vocab_size=300)
    model = build_tiny_generator(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=256, seed=seed)
    return model, tokenizer


def test_completion_logps_match_a_plain_log_softmax():
    world = build_world(seed=0, num_prospects=40)
    model, tokenizer = tiny(world)
    data = SFTDataModule(world.demonstrations["train"][:4], [], tokenizer, batch_size=4, max_length=160,
                         max_prompt_length=96)
    batch = data.collate(data.train_rows)
    logps, lengths = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(logps.double(), (expected * mask).sum(-1), atol=1e-4)
    assert torch.equal(lengths, mask.sum(-1))
    assert (lengths == torch.tensor([len(r["completion_ids"]) for r in data.train_rows])).all()


def test_tiny_sft_lowers_the_validation_loss(tmp_path):
    L.seed_everything(0, verbose=False)
    world = build_world(seed=0, num_prospects=60, emails_per_prospect=2)
    model, tokenizer = tiny(world)
    data = SFTDataModule(world.demonstrations["train"], world.demonstrations["validation"], tokenizer,
                         batch_size=8, max_length=160, max_prompt_length=96)
    module = Generator(model, loss_name="sft", lr=3e-3, warmup_ratio=0.1)
    trainer = L.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=4,
                        num_sanity_val_steps=0)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["generator/val/loss"]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["generator/val/loss"]
    assert after < before - 1.0, (before, after)


def test_save_and_load_round_trip(tmp_path):
    world = build_world(seed=0, num_prospects=40)
    model, tokenizer = tiny(world)
    save_generator(model, tokenizer, tmp_path / "gen")
    loaded, loaded_tok = load_generator(tmp_path / "gen")
    text = world.train[0].prompt + world.demonstrations["train"][0][1]
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tok.decode(tokenizer(text)["input_ids"]) == text, "byte-level BPE must decode exactly"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id and loaded_tok.eos_token_id == tokenizer.eos_token_id


def test_hub_style_loading_of_a_local_directory_generates(tmp_path):
    world = build_world(seed=0, num_prospects=40)
    model, tokenizer = tiny(world)
    model.save_pretrained(tmp_path / "hub-model")
    tokenizer.save_pretrained(tmp_path / "hub-model")
    loaded, loaded_tok = load_generator(str(tmp_path / "hub-model"))
    prompts = [b.prompt for b in world.heldout[:3]]
    greedy = generate(loaded, loaded_tok, prompts, max_new_tokens=8, do_sample=False)
    assert greedy == generate(loaded, loaded_tok, prompts, max_new_tokens=8, do_sample=False)
    sampled = generate(loaded, loaded_tok, prompts, max_new_tokens=8, do_sample=True, seed=1, num_return_sequences=2)
    assert len(sampled) == 6
    assert sampled == generate(loaded, loaded_tok, prompts, max_new_tokens=8, do_sample=True, seed=1,
                               num_return_sequences=2), "seeded sampling must be reproducible"


def test_weighted_pairs_from_a_file_reach_the_loss(tmp_path):
    """A ``weight`` field in a pairs JSONL row travels through tokenisation and collation into the generator's loss:
    the step's DPO loss is the weighted mean over the pairs (0 removes a pair), not the plain mean."""
    from rlmf.data import load_pairs, tokenize_pairs, write_jsonl
    from rlmf.data.collate import PairCollator
    from rlmf.data.formats import PreferencePair
    from rlmf.losses import get_loss
    from rlmf.reference import frozen_copy

    world = build_world(seed=0, num_prospects=40)
    model, tokenizer = tiny(world)
    pairs = [PreferencePair(world.train[i].prompt, world.demonstrations["train"][4 * i][1],
                            world.demonstrations["train"][4 * i + 1][1], weight=w)
             for i, w in enumerate([2.0, 0.0, 1.0])]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    loaded, _ = load_pairs(tmp_path / "pairs.jsonl")
    assert [p.weight for p in loaded] == [2.0, 0.0, 1.0]
    features, _ = tokenize_pairs(loaded, tokenizer, 200, 96)
    batch = PairCollator(tokenizer.pad_token_id)(features)
    assert batch["weights"].tolist() == [2.0, 0.0, 1.0]

    reference = frozen_copy(model)
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=0.05)  # policy != reference, so the pairs differ
    module = Generator(model, loss_name="dpo", loss_kwargs={"beta": 0.5}, reference=reference)
    module.log_metrics = lambda *a, **k: None
    loss = module._shared_step(batch, "train")
    logps, _ = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref, _ = completion_logps(reference, batch["input_ids"], batch["attention_mask"], batch["labels"])
    per_pair = -torch.nn.functional.logsigmoid(0.5 * ((logps[:3] - ref[:3]) - (logps[3:] - ref[3:])))
    torch.testing.assert_close(loss, (2 * per_pair[0] + per_pair[2]) / 3)
    plain = get_loss("dpo")(logps[:3], logps[3:], ref[:3], ref[3:], beta=0.5).loss
    assert not torch.isclose(loss, plain), "the weights changed nothing"
