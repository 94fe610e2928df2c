"""GSPO, CISPO and the options of the token-level objectives (two-sided clip ``delta``, ``top_entropy_quantile``,
``entropy_coef``): each against its paper's formula written here in plain Python floats (float64 inputs, 1e-10), and
against TRL 1.16's ``GRPOTrainer._compute_loss`` (values, gradients with respect to the per-token log-probs and the
entropies, and metrics, 1e-6).

TRL is called unbound on a stand-in ``self`` as in ``test_policy_gradient.py``, whose forward returns our per-token
log-probs and entropies, so that TRL's own code forms the ratios, clips, masks by entropy and aggregates:

- ``gspo``: ``importance_sampling_level="sequence"`` with ``loss_type="grpo"`` and beta 0 (TRL's GSPO recipe);
- ``cispo``: ``loss_type="cispo"`` with ``epsilon_high`` = our ``eps_max``;
- GRPO's ``delta``, ``top_entropy_quantile`` and ``entropy_coef`` (TRL's ``get_high_entropy_mask`` and its static
  entropy bonus, ``use_adaptive_entropy=False``), under each aggregation.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from test_policy_gradient import CLIP_METRICS, TOLERANCE, TRL_TOLERANCE, assert_metrics_close, grads, token_batch
from test_policy_gradient import trl_grpo_loss as trl_loss

from rlmf.losses import get_loss
from rlmf.losses.policy_gradient import entropy_terms, grpo_loss


def with_entropies(batch: dict, seed: int) -> dict:
    """``batch`` with ``entropies`` [B, T]: distinct positive values, a leaf that requires grad."""
    g = torch.Generator().manual_seed(seed)
    # float32 values: TRL takes its entropy quantile in float32, exact for these (a threshold equal to an entropy
    # must not round past it)
    entropies = (0.1 + 3.0 * torch.rand(batch["mask"].shape, generator=g)).double()
    return {**batch, "entropies": entropies.requires_grad_()}


def call(name: str, batch: dict, **hyperparameters):
    inputs = {"policy_logps": batch["logps"], "old_logps": batch["old_logps"], "mask": batch["mask"],
              "advantages": batch["sequence_advantages"], "entropies": batch.get("entropies")}
    return get_loss(name)(**inputs, **hyperparameters)


def all_grads(loss, leaves):
    """Gradients of ``loss`` with respect to ``leaves``; zeros for a leaf it does not use (entropies, no bonus)."""
    found = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(found, leaves)]


def assert_value_and_gradients_match(ours, theirs, batch):
    torch.testing.assert_close(ours, theirs, **TRL_TOLERANCE)
    leaves = [batch["logps"]] + ([batch["entropies"]] if "entropies" in batch else [])
    for mine, trl in zip(all_grads(ours, leaves), all_grads(theirs, leaves)):
        torch.testing.assert_close(mine, trl, **TRL_TOLERANCE)
    assert grads(ours, [batch["logps"]])[0].abs().sum() > 0


# ------------------------------------------------------------------------------------ paper formulas, Python


def quantile(values, q):
    """Linear interpolation between order statistics (what ``torch.quantile`` and numpy's default compute)."""
    xs = sorted(values)
    position = q * (len(xs) - 1)
    low = math.floor(position)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (position - low)


def kept_tokens(batch, top_entropy_quantile):
    """The bool rows of tokens whose entropy is in the top quantile (every masked token at 1)."""
    mask = batch["mask"].tolist()
    if top_entropy_quantile >= 1.0:
        return mask
    entropies = batch["entropies"].detach().tolist()
    pooled = [e for row, keep in zip(entropies, mask) for e, k in zip(row, keep) if k]
    threshold = quantile(pooled, 1 - top_entropy_quantile)
    return [[k and e >= threshold for e, k in zip(row, keep)] for row, keep in zip(entropies, mask)]


def entropy_bonus(batch, keep, entropy_coef):
    if not entropy_coef:
        return 0.0
    entropies = batch["entropies"].detach().tolist()
    chosen = [e for row, row_keep in zip(entropies, keep) for e, k in zip(row, row_keep) if k]
    return entropy_coef * sum(chosen) / max(len(chosen), 1)


def reference_gspo(batch, eps_low, eps_high, delta=None, top_entropy_quantile=1.0, entropy_coef=0.0):
    """GSPO's eq.: s_i = exp(mean_t (logp - old)), -min(s A, clip(s) A) per completion, mean over completions."""
    lp, old = batch["logps"].detach().tolist(), batch["old_logps"].tolist()
    mask, keep = batch["mask"].tolist(), kept_tokens(batch, top_entropy_quantile)
    total = 0.0
    for i, advantage in enumerate(batch["sequence_advantages"].tolist()):
        tokens = [t for t, k in enumerate(mask[i]) if k]
        if not tokens:
            continue
        s = math.exp(sum(lp[i][t] - old[i][t] for t in tokens) / len(tokens))
        unclipped = min(s, delta) if delta is not None else s
        clipped = min(max(s, 1 - eps_low), 1 + eps_high)
        term = -min(unclipped * advantage, clipped * advantage)
        total += term * sum(keep[i][t] for t in tokens) / len(tokens)
    return total / len(mask) - entropy_bonus(batch, keep, entropy_coef)


def reference_cispo(batch, eps_max, top_entropy_quantile=1.0, entropy_coef=0.0):
    """MiniMax-M1's CISPO: -sum_t min(r_t, eps_max) A logp_t over the batch's tokens / their number, and its
    gradient with the weight held constant: -min(r_t, eps_max) A / N on each kept token."""
    lp, old = batch["logps"].detach().tolist(), batch["old_logps"].tolist()
    mask, keep = batch["mask"].tolist(), kept_tokens(batch, top_entropy_quantile)
    count = sum(sum(row) for row in mask)
    total, gradient = 0.0, [[0.0] * len(row) for row in mask]
    for i, advantage in enumerate(batch["sequence_advantages"].tolist()):
        for t, k in enumerate(keep[i]):
            if k:
                weight = min(math.exp(lp[i][t] - old[i][t]), eps_max)
                total -= weight * advantage * lp[i][t] / count
                gradient[i][t] = -weight * advantage / count
    return total - entropy_bonus(batch, keep, entropy_coef), torch.tensor(gradient, dtype=torch.float64)


def reference_grpo_options(batch, eps_low, eps_high, beta, delta, top_entropy_quantile, entropy_coef):
    """GRPO (its per-completion mean) with INTELLECT-2's cap min(r, delta) on the unclipped term, the surrogate on
    the top-entropy tokens only, the k3 KL on every token, minus the entropy bonus."""
    lp, old, ref = batch["logps"].detach().tolist(), batch["old_logps"].tolist(), batch["reference_logps"].tolist()
    mask, keep = batch["mask"].tolist(), kept_tokens(batch, top_entropy_quantile)
    total = 0.0
    for i, advantage in enumerate(batch["sequence_advantages"].tolist()):
        tokens = [t for t, k in enumerate(mask[i]) if k]
        row = 0.0
        for t in tokens:
            r = math.exp(lp[i][t] - old[i][t])
            unclipped = min(r, delta) if delta is not None else r
            clipped = min(max(r, 1 - eps_low), 1 + eps_high)
            d = ref[i][t] - lp[i][t]
            row += -min(unclipped * advantage, clipped * advantage) * keep[i][t] + beta * (math.exp(d) - d - 1)
        total += row / len(tokens) if tokens else 0.0
    return total / len(mask) - entropy_bonus(batch, keep, entropy_coef)


# -------------------------------------------------------------------------------------------------------- GSPO


GSPO_CASES = [
    dict(eps_low=3e-4, eps_high=4e-4),  # the paper's: nearly every completion clipped
    dict(eps_low=0.05, eps_high=0.08),
    dict(eps_low=0.05, eps_high=0.08, delta=1.1),
    dict(eps_low=0.05, eps_high=0.08, top_entropy_quantile=0.4, entropy_coef=0.03),
]


def gspo_batch(seed):
    """``token_batch`` with one completion far off-policy (sequence ratio 1.3) with a negative advantage, so that
    ``delta`` 1.1 binds, and entropies."""
    batch = with_entropies(token_batch(seed), seed + 100)
    mask = batch["mask"]
    old = batch["old_logps"].clone()
    old[3] = batch["logps"].detach()[3] - math.log(1.3)
    batch["sequence_advantages"][3] = -abs(batch["sequence_advantages"][3].item())
    return {**batch, "old_logps": torch.where(mask, old, batch["old_logps"])}


@pytest.mark.parametrize("case", GSPO_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_gspo_matches_the_paper_and_trl(case):
    batch = gspo_batch(30)
    result = call("gspo", batch, **case)
    torch.testing.assert_close(result.loss.item(), reference_gspo(batch, **case), **TOLERANCE)
    theirs, metrics = trl_loss(batch, loss_type="grpo", level="sequence", **case)
    assert_value_and_gradients_match(result.loss, theirs, batch)
    names = CLIP_METRICS + (("entropy",) if "entropies" in batch else ())
    assert_metrics_close(result.metrics, {name: metrics[name] for name in names}, TRL_TOLERANCE)


def test_gspo_clips_whole_completions_and_gradchecks():
    batch = gspo_batch(31)
    paper = call("gspo", batch)  # 3e-4 / 4e-4: a completion whose ratio moved the advantage's way is clipped
    (gradient,) = grads(paper.loss, [batch["logps"]])
    clipped = torch.tensor([a * (s - 1) > 0 for a, s in zip(batch["sequence_advantages"].tolist(), torch.exp(
        ((batch["logps"].detach() - batch["old_logps"]) * batch["mask"]).sum(1) / batch["mask"].sum(1).clamp(min=1)
    ).tolist())]) & batch["mask"].any(1)
    assert clipped.any() and paper.metrics["clip_ratio/region_mean"].item() == clipped.double().mean().item()
    assert (gradient[clipped] == 0).all() and (gradient[~clipped & batch["mask"].any(1)] != 0).any()
    wide = call("gspo", batch, eps_low=0.9, eps_high=10.0)
    assert wide.metrics["clip_ratio/region_mean"].item() == 0.0
    small = with_entropies(token_batch(32, lengths=[3, 1, 0], width=3), 33)

    def fn(logps, entropies):
        return call("gspo", {**small, "logps": logps, "entropies": entropies}, eps_low=0.1, eps_high=0.2,
                    entropy_coef=0.1).loss

    assert torch.autograd.gradcheck(fn, (small["logps"], small["entropies"]))


# ------------------------------------------------------------------------------------------------------- CISPO


@pytest.mark.parametrize("eps_max,top_entropy_quantile,entropy_coef", [(5.0, 1.0, 0.0), (1.1, 1.0, 0.0),
                                                                         (1.1, 0.3, 0.02)])
def test_cispo_matches_the_paper_and_trl(eps_max, top_entropy_quantile, entropy_coef):
    batch = with_entropies(token_batch(40), 41)
    options = dict(top_entropy_quantile=top_entropy_quantile, entropy_coef=entropy_coef)
    result = call("cispo", batch, eps_max=eps_max, **options)
    expected, expected_gradient = reference_cispo(batch, eps_max, **options)
    torch.testing.assert_close(result.loss.item(), expected, **TOLERANCE)
    if not entropy_coef:  # the stop-gradient weight: the gradient is -w A / N, no d(w)/d(logp) term
        torch.testing.assert_close(grads(result.loss, [batch["logps"]])[0], expected_gradient, **TOLERANCE)
    theirs, metrics = trl_loss(batch, loss_type="cispo", eps_low=0.2, eps_high=eps_max, **options)
    assert_value_and_gradients_match(result.loss, theirs, batch)
    assert_metrics_close(result.metrics, {name: metrics[name] for name in ("cispo_clip_ratio", "entropy")},
                         TRL_TOLERANCE)
    assert (result.metrics["cispo_clip_ratio"] > 0) == (eps_max < 2)


# ---------------------------------------------------------------------------------------- GRPO's new options


GRPO_OPTION_CASES = [
    dict(loss_type="grpo", delta=1.4),
    dict(loss_type="bnpo", delta=1.4, beta=0.04),
    dict(loss_type="grpo", top_entropy_quantile=0.2, beta=0.04),
    dict(loss_type="dapo", top_entropy_quantile=0.0),
    dict(loss_type="dr_grpo", top_entropy_quantile=0.5, entropy_coef=0.05),
    dict(loss_type="grpo", entropy_coef=-0.01, delta=1.4, top_entropy_quantile=0.7, beta=0.04),
]


def options_batch(seed):
    """``token_batch`` with a token of ratio 1.6 and a negative advantage (``delta`` 1.4 binds) and entropies."""
    batch = with_entropies(token_batch(seed), seed + 1)
    batch["old_logps"][3, 0] = batch["logps"].detach()[3, 0] - math.log(1.6)
    batch["sequence_advantages"][3] = -abs(batch["sequence_advantages"][3].item())
    return batch


@pytest.mark.parametrize("case", GRPO_OPTION_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_grpo_options_match_trl(case):
    batch = options_batch(50)
    hyperparameters = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.0, **case}
    result = grpo_loss(batch["logps"], batch["old_logps"], batch["sequence_advantages"], batch["mask"],
                       batch["reference_logps"], batch["entropies"], max_completion_length=10, **hyperparameters)
    theirs, metrics = trl_loss(batch, **hyperparameters)
    assert_value_and_gradients_match(result.loss, theirs, batch)
    names = CLIP_METRICS + ("entropy",) + (("kl",) if hyperparameters["beta"] else ())
    assert_metrics_close(result.metrics, {name: metrics[name] for name in names}, TRL_TOLERANCE)
    if case["loss_type"] == "grpo":
        options = {"delta": None, "top_entropy_quantile": 1.0, "entropy_coef": 0.0}
        options.update({k: v for k, v in case.items() if k in options})
        expected = reference_grpo_options(batch, 0.2, 0.28, hyperparameters["beta"], **options)
        torch.testing.assert_close(result.loss.item(), expected, **TOLERANCE)


def test_delta_caps_the_loss_of_a_negative_advantage():
    batch = options_batch(51)
    plain = grpo_loss(batch["logps"], batch["old_logps"], batch["sequence_advantages"], batch["mask"],
                      eps_high=0.28)
    capped = grpo_loss(batch["logps"], batch["old_logps"], batch["sequence_advantages"], batch["mask"],
                       eps_high=0.28, delta=1.4)
    assert capped.loss < plain.loss  # the ratio-1.6 token with A < 0 now counts at 1.4
    # Above delta the capped term is constant: no gradient on that token.
    assert grads(capped.loss, [batch["logps"]])[0][3, 0] == 0
    assert grads(plain.loss, [batch["logps"]])[0][3, 0] != 0
    with pytest.raises(ValueError, match=r"delta=1.2 must be > 1 \+ eps_high"):
        grpo_loss(batch["logps"], batch["old_logps"], batch["sequence_advantages"], batch["mask"], eps_high=0.28,
                  delta=1.2)


def test_entropy_terms_edges_and_errors():
    batch = with_entropies(token_batch(60), 61)
    mask, entropies = batch["mask"], batch["entropies"]
    keep, bonus, metrics = entropy_terms("t", entropies, mask, 1.0, 0.0)
    assert keep is None and bonus is None and "entropy" in metrics
    keep, _, _ = entropy_terms("t", entropies, mask, 0.0, 0.0)  # only the highest
    assert keep.sum() == 1 and entropies[keep].item() == entropies.detach()[mask].max().item()
    keep, bonus, _ = entropy_terms("t", entropies, torch.zeros_like(mask), 0.5, 0.1)  # no tokens
    assert not keep.any() and bonus.item() == 0.0
    assert entropy_terms("t", None, mask, 1.0, 0.0) == (None, None, {})
    with pytest.raises(ValueError, match="need the policy's per-token entropies"):
        entropy_terms("t", None, mask, 0.5, 0.0)
    with pytest.raises(ValueError, match="top_entropy_quantile=1.5"):
        entropy_terms("t", entropies, mask, 1.5, 0.0)
    with pytest.raises(ValueError, match="eps_max"):
        call("cispo", batch, eps_max=0.0)


@pytest.mark.parametrize("name", ["gspo", "cispo"])
def test_padding_is_never_read(name):
    batch = with_entropies(token_batch(70), 71)
    options = dict(top_entropy_quantile=0.5, entropy_coef=0.1)
    clean = call(name, batch, **options)
    garbage = torch.tensor([float("nan"), float("inf"), -1e30, float("-inf")], dtype=torch.float64)
    filler = garbage[torch.arange(batch["mask"].numel()) % 4].view(batch["mask"].shape)
    dirty = {**batch}
    for key in ("logps", "entropies"):
        dirty[key] = torch.where(batch["mask"], batch[key].detach(), filler).requires_grad_()
    dirty["old_logps"] = torch.where(batch["mask"], batch["old_logps"], filler)
    result = call(name, dirty, **options)
    torch.testing.assert_close(result.loss, clean.loss, **TOLERANCE)
    for key in ("logps", "entropies"):
        (clean_grad,), (dirty_grad,) = all_grads(clean.loss, [batch[key]]), all_grads(result.loss, [dirty[key]])
        torch.testing.assert_close(dirty_grad, clean_grad, **TOLERANCE)
