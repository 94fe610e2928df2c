"""rlmf.entropies: the per-token entropies of the policy, exactly as its own forward's distribution gives them.

The reference is ``Categorical(logits=model(...).logits / T).entropy()`` at the positions that predict a label, for
architectures whose forward transforms the logits (Gemma's soft-cap, Cohere's scale, a head bias); the log-probs
returned beside the entropies must be those of :func:`rlmf.logprobs.completion_token_logps` bit for bit, and the
entropies' gradients (the bonus trains through them) those of the forward, in one piece or in checkpointed chunks.
"""

import pytest
import torch
from checkpoints import padded_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlmf import entropies as ent
from rlmf.entropies import completion_token_logps_and_entropies
from rlmf.logprobs import completion_token_logps


def load(directory):
    return AutoModelForCausalLM.from_pretrained(directory).float().eval(), AutoTokenizer.from_pretrained(directory)


def forward_entropies(model, input_ids, attention_mask, labels, temperature):
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]
    entropy = torch.distributions.Categorical(logits=logits / temperature).entropy()
    return entropy * (labels[:, 1:] != -100)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "cohere", "phi"])
@pytest.mark.parametrize("packing", ["none", "shared_prompt"])
def test_entropies_match_the_models_own_forward_and_logps_are_unchanged(tiny_checkpoint, arch, packing):
    model, tokenizer = load(tiny_checkpoint(arch))
    inputs = padded_batch(tokenizer, "left")
    groups = torch.tensor([0, 0, 1])
    logps, mask, entropies = completion_token_logps_and_entropies(model, *inputs, temperature=0.7, packing=packing,
                                                                  groups=groups)
    plain, plain_mask = completion_token_logps(model, *inputs, temperature=0.7, packing=packing, groups=groups)
    assert torch.equal(logps, plain) and torch.equal(mask, plain_mask)
    expected = forward_entropies(model, *inputs, 0.7)
    torch.testing.assert_close(entropies, expected, atol=1e-5, rtol=1e-5)
    assert (entropies[mask] > 0).all() and (entropies[~mask] == 0).all()


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_entropy_gradients_match_the_forward(tiny_checkpoint, monkeypatch, chunk_rows):
    model, tokenizer = load(tiny_checkpoint("gemma2"))
    inputs = padded_batch(tokenizer, "right")
    if chunk_rows:
        monkeypatch.setattr(ent, "MATERIALISED_CHUNK_ELEMENTS", chunk_rows * model.config.vocab_size)

    def grads(entropies):
        model.zero_grad()
        (entropies * torch.linspace(-1, 2, entropies.shape[1])).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = grads(completion_token_logps_and_entropies(model, *inputs, temperature=1.3)[2])
    theirs = grads(forward_entropies(model, *inputs, 1.3))
    assert ours.keys() == theirs.keys() and len(ours) > 5
    for name, expected in theirs.items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(ours[name], expected, atol=1e-5 * scale + 1e-8, rtol=0, msg=lambda m: f"{name}: {m}")
