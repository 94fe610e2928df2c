"""What the evaluate stage reports beyond the task's own gold metric: held-out pairs and head-to-head win rates.

Held-out preference pairs (:func:`pair_metrics`), from the summed completion log-probs of a generator (the policy
pi) and of the generator alignment started from (the reference), each ``[P]`` over P pairs:

- ``preference_accuracy``: the share of pairs with ``log pi(y_w|x) > log pi(y_l|x)``, the policy's own ranking;
- ``logps_per_token/chosen``: the mean over pairs of ``log pi(y_w|x) / |y_w|``, how likely the preferred answers
  stay (DPO is known to push it down while the margin grows);
- ``rewards/accuracies`` and ``rewards/margins`` (TRL's names): with the implicit reward
  ``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))`` (Rafailov et al. 2023), the share of pairs with
  ``r(x, y_w) > r(x, y_l)`` and the mean of ``r(x, y_w) - r(x, y_l)``; only for a generator other than the reference.

Held-out prompts scored by a reward (:func:`win_rate`): the aligned generator's sample against the starting
generator's sample of the same prompt, a win counting 1 and a tie 1/2, with a 95% normal interval whose unit is the
prompt (a prompt's k samples are not independent draws of the evaluation).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def pair_metrics(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                 chosen_lengths: torch.Tensor, reference_chosen_logps: Optional[torch.Tensor] = None,
                 reference_rejected_logps: Optional[torch.Tensor] = None, beta: float = 0.1) -> Dict[str, float]:
    """Held-out pair metrics (module docstring) from summed log-probs ``[P]`` and chosen token counts ``[P]``; the
    implicit-reward metrics only when the reference log-probs are given."""
    metrics = {
        "preference_accuracy": float((policy_chosen_logps > policy_rejected_logps).float().mean()),
        "logps_per_token/chosen": float((policy_chosen_logps / chosen_lengths.clamp(min=1)).mean()),
    }
    if reference_chosen_logps is not None:
        margins = beta * ((policy_chosen_logps - reference_chosen_logps)
                          - (policy_rejected_logps - reference_rejected_logps))
        metrics["rewards/accuracies"] = float((margins > 0).float().mean())
        metrics["rewards/margins"] = float(margins.mean())
    return metrics


def win_rate(rewards: Sequence[Sequence[float]], baseline_rewards: Sequence[Sequence[float]]
             ) -> Tuple[float, float]:
    """The win rate of samples scored ``rewards`` ``[P][k]`` over the baseline's samples ``[P][k]`` of the same
    prompts (sample j against sample j; a tie counts 1/2) and the half-width of its 95% interval over prompts
    (NaN with fewer than two prompts)."""
    if len(rewards) != len(baseline_rewards):
        raise ValueError(f"win_rate: {len(rewards)} prompts against {len(baseline_rewards)}")
    per_prompt = []
    for ours, theirs in zip(rewards, baseline_rewards):
        outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)]
        per_prompt.append(sum(outcomes) / len(outcomes))
    n = len(per_prompt)
    mean = sum(per_prompt) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_prompt) / (n - 1))
    return mean, Z95 * sd / math.sqrt(n)
