"""Preference and feedback objectives as pure functions over sequence log-probs.

Every loss takes keyword tensors (see each function's docstring for shapes) plus keyword hyperparameters, and
returns a :class:`LossResult`. Every offline loss (the ``sft``, ``paired``, ``unpaired`` and ``paired_online`` data
formats) also takes optional per-example ``weights`` [B] (>= 0): its batch mean becomes ``sum(w * l) / sum(w)``
(token means weight every token of an example by its ``w``); ``None``, the default, and weights of 1 give the
unweighted loss. The online objectives weigh completions by their rewards instead. ``LOSSES`` maps the name used in
``conf/algo/<name>.yaml`` to the function; :func:`get_loss` looks one up with an error that lists the valid names,
and :func:`bind_loss` binds its hyperparameters (``algo.loss``), checking them before any work: what a module calls.
"""

from __future__ import annotations

from rlmf.losses.registry import (  # noqa: F401  (the package's public names)
    BoundLoss,
    DATA_FORMATS,
    FAMILIES,
    LOSSES,
    LossResult,
    bind_loss,
    get_loss,
    loss_family,
    loss_hyperparameters,
    loss_inputs,
    register_loss,
    takes_entropies,
    takes_weights,
)

# Importing the family modules fills LOSSES. Keep this list sorted; one module per family.
from rlmf.losses import (  # noqa: E402,F401  (registration side effects)
    apo,
    dpo,
    dpo_tokens,
    dpo_variants,
    hypo,
    kto,
    mixture,
    online_dpo,
    orpo,
    policy_gradient,
    policy_gradient_variants,
    ppo,
    reinforce,
    sft,
    simpo,
)
