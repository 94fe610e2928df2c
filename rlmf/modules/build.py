"""One way to build each LightningModule from the job's config: the stages and the benchmarks both call these.

``cfg`` is the composed config (``rlmf-train``'s, or ``compose(...)`` in a test or benchmark): the SFT generator
reads ``generator.sft``, the aligned generators ``algo`` and ``generator``, the discriminator ``discriminator``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from torch import nn

from rlmf.generation import stop_token_ids
from rlmf.modules.discriminator import Discriminator
from rlmf.modules.generator import Generator
from rlmf.modules.online import OnlineGenerator


def build_sft_generator(cfg: DictConfig, model: nn.Module) -> Generator:
    """The SFT stage's module: ``model`` trained with the ``sft`` loss at ``generator.sft``'s optimiser settings."""
    g, opt = cfg.generator, cfg.generator.sft
    return Generator(model, loss_name="sft", lr=opt.lr, weight_decay=opt.weight_decay,
                     warmup_ratio=opt.warmup_ratio, metric_prefix="sft", packing=g.packing)


def build_aligned_generator(cfg: DictConfig, policy: nn.Module, tokenizer, reference: Optional[nn.Module],
                            reference_mode: str) -> Generator:
    """An offline alignment module (``algo`` of a paired or unpaired loss): ``policy`` (the model, or its LoRA
    wrapper) against ``reference`` (:func:`rlmf.reference.prepare_reference`) in ``reference_mode``, refreshed
    from the policy every ``algo.reference_sync_steps`` steps when set (TR-DPO)."""
    a, g, opt = cfg.algo, cfg.generator, cfg.algo.optim
    model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy  # a LoRA wrapper's model
    return Generator(policy, loss_name=a.name, loss_kwargs=OmegaConf.to_container(a.loss, resolve=True),
                     lr=opt.lr, weight_decay=opt.weight_decay, warmup_ratio=opt.warmup_ratio,
                     reference=reference, reference_mode=reference_mode, online_samples=a.online_samples,
                     max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                     stop_token_ids=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                     metric_prefix="align", packing=g.packing, reference_sync_steps=a.reference_sync_steps,
                     reference_mixup_alpha=a.reference_mixup_alpha, sampler=g.sampler)


def build_online_generator(cfg: DictConfig, model: nn.Module, tokenizer, reward: Callable,
                           reference: Optional[nn.Module],
                           monitor: Optional[Callable[[List[str], List[str]], Dict[str, float]]] = None
                           ) -> OnlineGenerator:
    """An online RL module (``algo`` of the ``online`` data format): ``model`` samples ``algo.online`` rollouts
    that ``reward`` scores (``reward(prompts, completions)`` -> scores with validity, :mod:`rlmf.rewards`);
    ``reference`` is the frozen copy the KL is measured against, when the objective needs one
    (:func:`rlmf.modules.online.needs_reference`); ``monitor`` logs a metric of every rollout the policy never sees
    (the task's gold)."""
    a, g, o, opt = cfg.algo, cfg.generator, cfg.algo.online, cfg.algo.optim
    return OnlineGenerator(
        model, tokenizer, reward, loss_name=a.name, loss_kwargs=OmegaConf.to_container(a.loss, resolve=True),
        reference=reference, num_generations=o.num_generations, num_iterations=o.num_iterations,
        minibatch_size=o.minibatch_size, temperature=o.temperature if o.temperature is not None else g.temperature,
        max_new_tokens=o.max_new_tokens or g.max_new_tokens, scale_rewards=o.scale_rewards, kl_coef=o.kl_coef,
        kl_target=o.kl_target, kl_horizon=o.kl_horizon, gamma=o.gamma, lam=o.lam,
        drop_uniform_groups=o.drop_uniform_groups, mask_truncated_completions=o.mask_truncated_completions,
        multi_objective_aggregation=o.multi_objective_aggregation, lr=opt.lr, weight_decay=opt.weight_decay,
        warmup_ratio=opt.warmup_ratio, gradient_clip_val=cfg.trainer.gradient_clip_val,
        stop_token_ids=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id, metric_prefix="align",
        monitor=monitor, log_completions_every=o.log_completions_every, packing=g.packing, sampler=g.sampler)


def discriminator_settings(cfg: DictConfig) -> Dict[str, Any]:
    """The ``discriminator`` group as :class:`Discriminator`'s arguments (its data settings left out)."""
    d = OmegaConf.to_container(cfg.discriminator, resolve=True)
    return {k: v for k, v in d.items() if k not in ("batch_size", "max_epochs")}


def build_discriminator(cfg: DictConfig) -> Discriminator:
    """A fresh reward model as the ``discriminator`` group says (backbone, objective, optimiser)."""
    return Discriminator(**discriminator_settings(cfg))
