"""Packed rows (rlmf.packing) give the padded rows' log-probs: shared prompts and no padding change only the cost.

The reference is the padded path, itself checked against each model's own ``forward``
(tests/test_logprobs_architectures.py). Every tiny checkpoint of a real architecture is scored both ways, with each
attention implementation that takes a mask, values and gradients; a sliding-window model is exact only because the
window is applied to the packed mask; an attention that cannot take the mask falls back to padded rows and says why.
"""

import logging

import pytest
import torch
from checkpoints import ARCHITECTURES, MASKED_ATTENTION, pair_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlmf import logprobs as lp
from rlmf import packing as layout
from rlmf.logprobs import completion_logps, completion_token_logps, packing_problem
from rlmf.packing import PackedRows, pack, row_groups, stack_rows


def test_a_pair_shares_its_prompt_and_each_completion_sees_only_itself():
    # prompt 11 12 13; chosen 21 22; rejected 31 (right-padded with 0)
    input_ids = torch.tensor([[11, 12, 13, 21, 22], [11, 12, 13, 31, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 21, 22], [-100, -100, -100, 31, -100]])
    packed = pack(input_ids, attention_mask, labels, groups=torch.tensor([0, 0]), capacity=6)
    assert packed.input_ids.tolist() == [[11, 12, 13, 21, 22, 31]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]  # the rejected completion restarts after the prompt
    assert packed.shared_tokens == 3
    allowed = packed.allowed[0]
    assert allowed[5].tolist() == [True, True, True, False, False, True]  # rejected: prompt and itself only
    assert allowed[4].tolist() == [True, True, True, True, True, False]
    assert not allowed.triu(1).any()  # causal
    assert packed.index.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 5, -1]]


def test_a_group_longer_than_a_packed_row_is_split_with_a_copy_of_its_prompt():
    """A packed row is no longer than its capacity (by default at most twice the padded width: attention under a
    dense mask is quadratic in it): a prompt with completions that do not fit together is split, each part keeping
    the prompt."""
    input_ids = torch.tensor([[11, 12, 21, 22], [11, 12, 31, 32], [11, 12, 41, 0]])
    attention_mask = (input_ids != 0).long()
    labels = torch.where(torch.arange(4) >= 2, input_ids, torch.tensor(-100)).masked_fill(attention_mask == 0, -100)
    assert pack(input_ids, attention_mask, labels, groups=torch.tensor([0, 0, 0])).input_ids.shape[1] == 7  # the whole group: 7 <= 2 x 4
    packed = pack(input_ids, attention_mask, labels, groups=torch.tensor([0, 0, 0]), capacity=6)
    assert sorted(packed.input_ids.tolist()) == [[11, 12, 21, 22, 31, 32], [11, 12, 41, 0, 0, 0]]
    assert packed.shared_tokens == 2
    flat = packed.input_ids.flatten()
    assert torch.equal(flat[packed.index.clamp(min=0)] * attention_mask, input_ids)


def test_rows_of_a_group_with_different_prompts_are_packed_apart_and_padding_is_dropped():
    input_ids = torch.tensor([[0, 0, 11, 12, 21], [0, 11, 14, 31, 32], [0, 0, 0, 41, 42]])  # left-padded
    attention_mask = (input_ids != 0).long()
    labels = torch.tensor([[-100, -100, -100, -100, 21], [-100, -100, -100, 31, 32], [-100, -100, -100, -100, 42]])
    packed = pack(input_ids, attention_mask, labels, groups=torch.tensor([0, 0, 1]), capacity=8)
    assert packed.shared_tokens == 0
    tokens = sorted(t for t in packed.input_ids.flatten().tolist() if t)
    assert tokens == sorted(t for t in input_ids.flatten().tolist() if t)  # every real token once, no padding
    flat = packed.input_ids.flatten()
    assert torch.equal(flat[packed.index.clamp(min=0)] * attention_mask, input_ids)
    # the two rows of group 0 cannot see each other although they sit in one packed row
    first, second = packed.index[0, 2:], packed.index[1, 1:]
    allowed = packed.allowed.reshape(-1, packed.allowed.shape[-1])
    for q in second.tolist():
        for k in first.tolist():
            if q // 8 == k // 8:
                assert not allowed[q, k % 8]


def test_paired_batches_group_chosen_with_rejected_and_rows_of_other_widths_stack():
    batch = {"input_ids": torch.zeros(6, 3, dtype=torch.long), "chosen_lengths": torch.ones(3)}
    assert row_groups(batch).tolist() == [0, 1, 2, 0, 1, 2]
    assert row_groups({"input_ids": torch.zeros(2, 3)}) is None
    a = (torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), torch.full((1, 2), 5))
    b = (torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), torch.full((1, 4), 7))
    ids, mask, labels = stack_rows(a, b)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and labels[0].tolist() == [5, 5, -100, -100]


def load(directory, implementation):
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=implementation).float().eval()
    return model, AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("arch,implementation", [(a, i) for a in ARCHITECTURES for i in MASKED_ATTENTION[a]])
def test_packed_logps_and_gradients_equal_padded_for_every_architecture(tiny_checkpoint, arch, implementation):
    model, tokenizer = load(tiny_checkpoint(arch), implementation)
    assert packing_problem(model) is None
    for side in ("right", "left"):
        *rows, groups = pair_rows(tokenizer, side)
        assert pack(*rows, groups).shared_tokens > 0  # the prompts are shared
        padded, mask = completion_token_logps(model, *rows)
        for packing in ("padding_free", "shared_prompt"):
            packed, packed_mask = completion_token_logps(model, *rows, packing=packing, groups=groups)
            assert torch.equal(mask, packed_mask)
            torch.testing.assert_close(packed, padded, atol=2e-5, rtol=0, msg=f"{arch} {side} {packing}")

    *rows, groups = pair_rows(tokenizer, "right")
    grads = []
    for packing in ("none", "shared_prompt"):
        model.zero_grad()
        completion_logps(model, *rows, packing=packing, groups=groups)[0].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gemma2", "cohere2"])
def test_sliding_window_layers_get_the_window_in_the_packed_mask(tiny_checkpoint, arch, monkeypatch):
    """The rows are longer than the tiny checkpoints' window (16 tokens): without the window in the packed mask the
    sliding layers would see too far back, and the log-probs would differ."""
    model, tokenizer = load(tiny_checkpoint(arch), "eager")
    *rows, groups = pair_rows(tokenizer, "right")
    assert rows[1].sum(-1).max() > model.config.sliding_window
    padded, _ = completion_token_logps(model, *rows)
    packed, _ = completion_token_logps(model, *rows, packing="shared_prompt", groups=groups)
    torch.testing.assert_close(packed, padded, atol=2e-5, rtol=0)
    monkeypatch.setattr(PackedRows, "windowed", lambda self, window: self.allowed)
    unwindowed, _ = completion_token_logps(model, *rows, packing="shared_prompt", groups=groups)
    assert (unwindowed - padded).abs().max() > 1e-3


def test_an_attention_that_cannot_take_the_mask_runs_padded_and_says_why(tiny_checkpoint, monkeypatch, caplog):
    model, tokenizer = load(tiny_checkpoint("llama"), "sdpa")
    monkeypatch.setattr(layout, "MASKABLE_ATTENTION", ("eager",))  # as if SDPA could not take a 4D mask
    *rows, groups = pair_rows(tokenizer, "right")
    with caplog.at_level(logging.WARNING, logger="rlmf.logprobs"):
        packed, _ = completion_token_logps(model, *rows, packing="shared_prompt", groups=groups)
        completion_token_logps(model, *rows, packing="shared_prompt", groups=groups)
    problem = packing_problem(model)
    assert "attn_implementation='sdpa'" in problem
    assert sum("cannot run on packed rows" in r.getMessage() for r in caplog.records) == 1  # said once
    assert torch.equal(packed, completion_token_logps(model, *rows)[0])  # the padded path ran


def test_a_packed_mask_that_changes_the_numbers_is_caught_by_the_probe(tiny_checkpoint, monkeypatch):
    model, _ = load(tiny_checkpoint("qwen2"), "sdpa")

    def leaky_pack(*args, **kwargs):  # causal only: completions see their siblings and other groups
        packed = pack(*args, **kwargs)
        packed.allowed = torch.ones_like(packed.allowed).tril()
        return packed

    monkeypatch.setattr(layout, "pack", leaky_pack)
    with pytest.raises(ValueError, match="differ from padded rows"):
        lp.check_packing_matches_padded(model)
    assert "differ from padded rows" in packing_problem(model)


@pytest.mark.parametrize("loss_name", ["dpo", "kto", "hypo"])
def test_a_training_step_is_the_same_packed_and_padded(loss_name):
    """The generator's whole step (policy and frozen reference, KTO's mismatched rows, HyPO's online samples) gives
    the same loss and gradients with ``packing=shared_prompt`` as with padded rows."""
    from rlmf.data import tokenize_feedback, tokenize_pairs
    from rlmf.data.alignment import collator_for, with_mismatched_completions
    from rlmf.data.formats import FeedbackExample, PreferencePair
    from rlmf.losses import get_loss
    from rlmf.models import build_tiny_generator, train_tokenizer
    from rlmf.modules.generator import Generator
    from rlmf.reference import frozen_copy
    from rlmf.tasks.persona_email import build_world, corpus_texts

    world = build_world(seed=0, num_prospects=40)
    tokenizer = train_tokenizer(corpus_texts(world), vocab_size=300)
    model = build_tiny_generator(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=320, seed=0)
    reference = frozen_copy(model)
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=0.05)  # policy != reference
    demos = world.demonstrations["train"]
    fmt = get_loss(loss_name).data_format
    if fmt == "unpaired":
        examples = [FeedbackExample(world.train[i].prompt, demos[4 * i + j][1], desirable=j == 0)
                    for i in range(3) for j in range(2)]
        features = with_mismatched_completions(tokenize_feedback(examples, tokenizer, 200, 96)[0], 200)
    else:
        pairs = [PreferencePair(world.train[i].prompt, demos[4 * i][1], demos[4 * i + 1][1]) for i in range(3)]
        features = tokenize_pairs(pairs, tokenizer, 200, 96)[0]
    batch = collator_for(fmt, tokenizer.pad_token_id, 200)(features)
    assert packing_problem(model) is None and packing_problem(reference) is None  # so the packed path runs

    results = []
    for packing in ("none", "shared_prompt"):
        torch.manual_seed(0)  # HyPO samples online completions
        module = Generator(model, loss_name=loss_name, reference=reference, packing=packing,
                           pad_token_id=tokenizer.pad_token_id, max_new_tokens=12, online_samples=2)
        module.log_metrics = lambda *a, **k: None
        model.zero_grad()
        loss = module._shared_step(batch, "train")
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-4)


def test_online_rollouts_score_the_same_packed_and_padded():
    """The scoring forward of a rollout, whose ``G`` completions of a prompt share it when packed."""
    from rlmf.data.collate import PromptCollator
    from rlmf.data.formats import PromptOnly
    from rlmf.data.tokenization import tokenize_prompts
    from rlmf.modules.rollouts import rollout
    from rlmf.models import build_tiny_generator, train_tokenizer
    from rlmf.tasks.persona_email import build_world, corpus_texts

    world = build_world(seed=0, num_prospects=40)
    tokenizer = train_tokenizer(corpus_texts(world), vocab_size=300)
    model = build_tiny_generator(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=320, seed=0)
    prompts = PromptCollator(tokenizer.pad_token_id)(
        tokenize_prompts([PromptOnly(b.prompt) for b in world.train[:3]], tokenizer, 96))
    assert packing_problem(model) is None
    scored = []
    for packing in ("none", "shared_prompt"):
        torch.manual_seed(0)
        rows = rollout(model, tokenizer, prompts["input_ids"], prompts["attention_mask"], num_generations=3,
                       temperature=1.0, max_new_tokens=10, stop_ids=[tokenizer.eos_token_id],
                       pad_token_id=tokenizer.pad_token_id, packing=packing)
        scored.append(rows)
    assert torch.equal(scored[0].input_ids, scored[1].input_ids)
    torch.testing.assert_close(scored[1].old_logps, scored[0].old_logps, atol=1e-5, rtol=0)


def test_forwards_of_varying_shape_keep_cudnn_attention_off_on_cuda_only():
    """cuDNN attention builds a graph per new shape (tests/gpu/test_gpu_packing.py checks the real forward)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with layout.varying_shape_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with layout.varying_shape_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
