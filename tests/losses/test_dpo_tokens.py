"""LD-DPO, WPO, SFT on the chosen completions and the mixture of losses against their papers' formulas, written here
independently (per pair, token by token, from explicit next-token distributions), float64 to 1e-10 in values and
gradients. TRL's versions are compared in test_dpo_tokens_against_trl.py; the generator's per-token inputs in
tests/modules/test_generator_token_losses.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlmf.losses import bind_loss, get_loss

TOLERANCE = dict(atol=1e-10, rtol=1e-10)


def completions(seed: int, batch_size: int = 5, width: int = 12, vocab: int = 9):
    """Per-token log-probs of a chosen and a rejected completion per pair under a policy and a reference, from
    explicit softmaxes; each completion starts at its own offset in a ``[B, width]`` row (as left- or right-padded
    rows would place it). Returns ``{side: (policy [B, W], reference [B, W], mask [B, W], log_sum_sq [B, W])}``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side in ("chosen", "rejected"):
        lengths = torch.randint(1, 7, (batch_size,), generator=g)
        starts = torch.randint(0, width - 6, (batch_size,), generator=g)
        positions = torch.arange(width)[None]
        mask = (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])
        tokens = torch.randint(0, vocab, (batch_size, width), generator=g)
        logits = [2.0 * torch.randn((batch_size, width, vocab), generator=g, dtype=torch.float64) for _ in range(2)]
        policy, reference = (torch.log_softmax(z, -1).gather(-1, tokens[..., None])[..., 0] for z in logits)
        probs = torch.softmax(logits[0], -1)
        log_sum_sq = torch.log((probs**2).sum(-1))
        zero = torch.zeros(())
        out[side] = (torch.where(mask, policy, zero).requires_grad_(), torch.where(mask, reference, zero), mask,
                     torch.where(mask, log_sum_sq, zero))
    return out


def token_inputs(c):
    return {"policy_chosen_token_logps": c["chosen"][0], "policy_rejected_token_logps": c["rejected"][0],
            "reference_chosen_token_logps": c["chosen"][1], "reference_rejected_token_logps": c["rejected"][1],
            "chosen_token_mask": c["chosen"][2], "rejected_token_mask": c["rejected"][2]}


def summed_inputs(c):
    return {"policy_chosen_logps": c["chosen"][0].sum(-1), "policy_rejected_logps": c["rejected"][0].sum(-1),
            "reference_chosen_logps": c["chosen"][1].sum(-1), "reference_rejected_logps": c["rejected"][1].sum(-1),
            "chosen_lengths": c["chosen"][2].sum(-1), "rejected_lengths": c["rejected"][2].sum(-1),
            "policy_chosen_log_sum_sq_probs": c["chosen"][3].sum(-1),
            "policy_rejected_log_sum_sq_probs": c["rejected"][3].sum(-1)}


def assert_same(result_loss, reference_loss, wrt, masks):
    """Same value, and same gradient at every completion token (elsewhere the log-probs are 0 by construction, and
    a formula that picks the tokens out never sees them)."""
    torch.testing.assert_close(result_loss, reference_loss, **TOLERANCE)
    ours = torch.autograd.grad(result_loss, wrt, retain_graph=True)
    theirs = torch.autograd.grad(reference_loss, wrt, retain_graph=True)
    for o, t, mask in zip(ours, theirs, masks):
        torch.testing.assert_close(o * mask, t * mask, **TOLERANCE)
    assert any((o * mask).abs().sum() > 0 for o, mask in zip(ours, masks))


# ---------------------------------------------------------------------------------------------------- LD-DPO


def ld_logp(token_logps, mask, public_length, alpha):
    """LD-DPO's likelihood of one completion: its first ``public_length`` tokens in full, the rest to the alpha."""
    tokens = token_logps[mask]  # in order
    return tokens[:public_length].sum() + alpha * tokens[public_length:].sum()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta,alpha", [(0.1, 0.5), (0.4, 0.0), (0.2, 0.8), (0.1, 1.0)])
def test_ld_dpo_is_dpo_on_the_length_desensitised_likelihoods(seed, beta, alpha):
    c = completions(seed)
    per_pair = []
    for i in range(c["chosen"][0].shape[0]):
        public = int(min(c["chosen"][2][i].sum(), c["rejected"][2][i].sum()))  # l_p, the shared length
        pi_w, ref_w, pi_l, ref_l = (ld_logp(c[side][k][i], c[side][2][i], public, alpha)
                                    for side, k in (("chosen", 0), ("chosen", 1), ("rejected", 0), ("rejected", 1)))
        per_pair.append(-F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))))
    result = get_loss("ld_dpo")(**token_inputs(c), beta=beta, ld_alpha=alpha)
    assert_same(result.loss, torch.stack(per_pair).mean(), [c["chosen"][0], c["rejected"][0]],
                [c["chosen"][2], c["rejected"][2]])


def test_ld_dpo_at_alpha_one_is_dpo():
    c = completions(3)
    ld = get_loss("ld_dpo")(**token_inputs(c), beta=0.3, ld_alpha=1.0)
    s = summed_inputs(c)
    dpo = get_loss("dpo")(s["policy_chosen_logps"], s["policy_rejected_logps"], s["reference_chosen_logps"],
                          s["reference_rejected_logps"], beta=0.3)
    torch.testing.assert_close(ld.loss, dpo.loss, **TOLERANCE)
    for key in ("rewards/margins", "logps/chosen"):
        torch.testing.assert_close(ld.metrics[key], dpo.metrics[key], **TOLERANCE)


def test_ld_dpo_refuses_alpha_outside_0_1_before_any_work():
    with pytest.raises(ValueError, match=r"ld_alpha=1.5 must lie in \[0.0, 1.0\]"):
        bind_loss("ld_dpo", {"ld_alpha": 1.5})
    c = completions(0)
    with pytest.raises(ValueError, match="same shape"):
        get_loss("ld_dpo")(**{**token_inputs(c), "chosen_token_mask": c["chosen"][2][:, :5]})


# ------------------------------------------------------------------------------------------------------- WPO


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_wpo_weights_each_pair_by_the_aligned_probability_of_both_responses(seed, beta):
    """WPO eq. 2 with weight alignment: w(y) = exp(1/|y| sum_t log(p(y_t) / sum_v p(v)^2)), a constant to the
    gradient; loss = -E[w(y_w) w(y_l) log sigmoid(beta * margin)]."""
    c = completions(seed)

    def weight(side):
        policy, _, mask, log_sum_sq = c[side]
        per_token = (policy.detach() - log_sum_sq)[mask]
        rows = mask.sum(-1).tolist()
        return torch.stack([t.mean() for t in per_token.split(rows)]).exp()

    s = summed_inputs(c)
    margin = (s["policy_chosen_logps"] - s["reference_chosen_logps"]) - (
        s["policy_rejected_logps"] - s["reference_rejected_logps"])
    expected = (weight("chosen") * weight("rejected") * -F.logsigmoid(beta * margin)).mean()
    result = get_loss("wpo")(**s, beta=beta)
    assert_same(result.loss, expected, [c["chosen"][0], c["rejected"][0]],
                [c["chosen"][2], c["rejected"][2]])
    torch.testing.assert_close(result.metrics["wpo/pair_weight"], (weight("chosen") * weight("rejected")).mean(),
                               **TOLERANCE)


def test_wpo_gives_a_pair_the_policy_would_sample_a_weight_near_one():
    """A one-token completion whose token has probability p under a distribution with sum_v p(v)^2 = p (the
    policy's greedy, near-certain choice) weighs 1; a token far less likely than the policy's own weighs ~0."""
    zero = torch.zeros(1, dtype=torch.float64)
    likely, unlikely = torch.log(torch.tensor([0.9], dtype=torch.float64)), torch.tensor([-30.0], dtype=torch.float64)
    inputs = dict(policy_chosen_logps=likely, policy_rejected_logps=likely, reference_chosen_logps=zero,
                  reference_rejected_logps=zero, chosen_lengths=torch.ones(1), rejected_lengths=torch.ones(1),
                  policy_chosen_log_sum_sq_probs=likely, policy_rejected_log_sum_sq_probs=likely)
    assert get_loss("wpo")(**inputs).metrics["wpo/pair_weight"].item() == pytest.approx(1.0)
    inputs["policy_rejected_logps"] = unlikely
    assert get_loss("wpo")(**inputs).metrics["wpo/pair_weight"].item() < 1e-12


# ---------------------------------------------------------------------------------- SFT on chosen, mixtures


def test_sft_chosen_is_the_token_mean_nll_of_the_chosen_completions():
    c = completions(1)
    s = summed_inputs(c)
    tokens = c["chosen"][0][c["chosen"][2]]
    result = get_loss("sft_chosen")(s["policy_chosen_logps"], s["chosen_lengths"])
    assert_same(result.loss, -tokens.mean(), [c["chosen"][0]], [c["chosen"][2]])


@pytest.mark.parametrize("seed", [0, 1])
def test_mixture_is_the_weighted_sum_of_its_parts_formulas(seed):
    """0.7 * DPO + 0.3 * SPPO (hard) + 1.5 * SFT on the chosen, each from its paper's formula."""
    c = completions(seed)
    s = summed_inputs(c)
    rho_c = s["policy_chosen_logps"] - s["reference_chosen_logps"]
    rho_r = s["policy_rejected_logps"] - s["reference_rejected_logps"]
    dpo = -F.logsigmoid(0.2 * (rho_c - rho_r)).mean()
    sppo = ((rho_c - 0.5 / 0.1) ** 2 + (rho_r + 0.5 / 0.1) ** 2).mean()
    sft = -c["chosen"][0][c["chosen"][2]].mean()
    parts = {"dpo": {"weight": 0.7, "beta": 0.2}, "sppo_hard": {"weight": 0.3}, "sft_chosen": {"weight": 1.5}}
    loss = bind_loss("mixture", {"parts": parts})
    result = loss(**{k: s[k] for k in loss.inputs})
    assert_same(result.loss, 0.7 * dpo + 0.3 * sppo + 1.5 * sft, [c["chosen"][0], c["rejected"][0]],
                [c["chosen"][2], c["rejected"][2]])
    torch.testing.assert_close(result.metrics["sppo_hard/loss"], sppo.detach(), **TOLERANCE)
    torch.testing.assert_close(result.metrics["dpo/rewards/margins"], (0.2 * (rho_c - rho_r)).mean().detach(),
                               **TOLERANCE)
    assert "rewards/margins" not in result.metrics  # every metric under its part's name


@pytest.mark.parametrize("parts,match", [
    ({}, r"parts=\{\} must map at least one loss"),
    ({"sft": {"weight": 1.0}}, r"parts.sft reads sft batches.*sft_chosen"),
    ({"kto": {"weight": 1.0}}, r"parts.kto reads unpaired batches"),
    ({"dpo": {"weight": -1.0}}, r"parts.dpo.weight=-1.0 must be a finite number >= 0"),
    ({"dpo": {"weight": math.inf}}, r"parts.dpo.weight=inf must be a finite number"),
    ({"dpo": {"beta": 0.1}}, r"parts.dpo.weight=None"),
    ({"dpo": {"weight": 0.0}}, r"every weight is 0"),
    ({"dpo": {"weight": 1.0, "gamma": 2.0}}, r"parts.dpo: gamma is not a hyperparameter of loss 'dpo'; it takes: beta"),
    ({"ld_dpo": {"weight": 1.0, "ld_alpha": 2.0}}, r"parts.ld_dpo: ld_dpo: ld_alpha=2.0 must lie in"),
    ({"dpoo": {"weight": 1.0}}, r"parts.dpoo: unknown loss 'dpoo'"),
    ({"mixture": {"weight": 1.0}}, r"cannot contain a mixture"),
])
def test_a_bad_mixture_is_refused_before_any_work_naming_the_part(parts, match):
    with pytest.raises(ValueError, match=match):
        bind_loss("mixture", {"parts": parts})
