"""The run context every stage shares: the config, the run and stage folders, the task, loading and sampling
models on the run's placement, and the loggers.

A stage writes under ``<run_dir>/<stage>/`` (round r > 1: ``<run_dir>/round<r>/<stage>/``), or in a directory
shared by the jobs of a sweep (:mod:`rlmf.stage_cache`). Every model a stage runs outside ``trainer.fit`` is loaded
and called through :class:`Run`, so it runs where the config says (:mod:`rlmf.placement`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from rlmf.errors import ConfigError
from rlmf.generation import generate
from rlmf.logprobs_check import check_logprobs_match_forward
from rlmf.models import load_generator
from rlmf.modules.discriminator import Discriminator
from rlmf.placement import Placement
from rlmf.rewards import build_reward
from rlmf.stage_cache import SHARED_STAGES, stage_key
from rlmf.tasks.base import Task, build_task


@dataclass
class Run:
    """What every stage shares: the config, the run directory, the task, the loggers, the results so far."""

    cfg: DictConfig
    run_dir: Path
    sweep_group: Optional[str] = None
    results: Dict[str, Any] = field(default_factory=dict)
    round: int = 1  # the round of machine feedback (loop.rounds); round r > 1 lives in <run_dir>/round<r>/
    _task: Optional[Task] = None
    _wandb: Any = None

    def for_round(self, r: int) -> "Run":
        """This run seen from round ``r``: its stage directories are ``<run_dir>/round<r>/<stage>`` (round 1: the
        run directory itself); the task, loggers and config are shared."""
        return replace(self, round=r, results={})

    def seed(self, offset: int) -> int:
        """The seed of one random draw of a stage: ``seed + offset``, shifted per round so rounds differ."""
        return self.cfg.seed + offset + 1000 * (self.round - 1)

    @property
    def task(self) -> Task:
        """The task (``task.name``; :mod:`rlmf.tasks.base`): the stages ask it for data, feedback and gold."""
        if self._task is None:
            self._task = build_task(self.cfg.task, self.cfg.seed)
        return self._task

    @property
    def placement(self) -> Placement:
        """Where every model outside ``trainer.fit`` runs (device, dtype, autocast): :mod:`rlmf.placement`."""
        return Placement.from_config(self.cfg)

    def load_generator(self, path: str | Path):
        """A generator checkpoint and its tokenizer as the config says (dtype, attention, gradient checkpointing),
        checked to give the log-probs its own forward gives, placed on the run's device in eval mode."""
        g = self.cfg.generator
        model, tokenizer = load_generator(path, torch_dtype=g.torch_dtype, attn_implementation=g.attn_implementation,
                                          gradient_checkpointing=g.gradient_checkpointing)
        check_logprobs_match_forward(model)
        return self.placement.put(model), tokenizer

    def load_reward(self):
        """The reward that ranks this round's samples (``reward=``), on the run's placement."""
        if self.cfg.reward is None:
            raise ConfigError("reward is null: choose one of the conf/reward options (reward=discriminator, ...)")
        found = self.finished_dir("discriminator")
        context = {"discriminator_path": found / "model"} if found is not None else {}
        context.update(self.task.reward_context())
        return build_reward(self.cfg.reward, self.placement, **context)

    def load_discriminator(self, path: Path):
        """A saved discriminator (reward model), on the run's placement."""
        return self.placement.put(Discriminator.load(path))

    def _round_root(self, root: Path) -> Path:
        return root if self.round == 1 else root / f"round{self.round}"

    def stage_dir(self, stage: str) -> Path:
        """Where ``stage`` writes: its shared directory when the sweep shares it (:meth:`shared_stage_dir`), else
        ``<run_dir>/<stage>``."""
        shared = self.shared_stage_dir(stage)
        return shared if shared is not None else self._round_root(self.run_dir) / stage

    def shared_stage_dir(self, stage: str) -> Optional[Path]:
        """``<stage.cache_dir>/<stage>-<key>`` for a stage every job with the same inputs can share (sft, feedback,
        discriminator of round 1; :func:`stage_key`), or None when ``stage.cache_dir`` is null. A relative
        ``cache_dir`` is taken from the directory that holds the run directory: the sweep directory in a multirun."""
        root = self.shared_root()
        if root is None or stage not in SHARED_STAGES or self.round != 1:
            return None
        return root / f"{stage}-{stage_key(self.cfg, stage)[:16]}"

    def shared_root(self) -> Optional[Path]:
        """``stage.cache_dir`` (a relative one taken from the directory that holds the run directory), or None."""
        if self.cfg.stage.get("cache_dir") is None:
            return None
        root = Path(self.cfg.stage.cache_dir)
        return root if root.is_absolute() else self.run_dir.parent / root

    def shared_feedback_dir(self) -> Optional[Path]:
        """Where the align stage's round of machine feedback is shared (round 1 with ``stage.cache_dir``), else
        None: ``<stage.cache_dir>/align_feedback-<key>``."""
        sft = self.shared_stage_dir("sft")
        return None if sft is None else sft.parent / f"align_feedback-{stage_key(self.cfg, 'align_feedback')[:16]}"

    def finished_dir(self, stage: str) -> Optional[Path]:
        """Where a finished ``stage`` (of this round) lies: this run first, then the shared stages
        (``stage.cache_dir``), then ``stage.from_run``."""
        candidates = [self._round_root(self.run_dir) / stage]
        if self.shared_stage_dir(stage) is not None:
            candidates.append(self.shared_stage_dir(stage))
        if self.cfg.stage.from_run:
            candidates.append(self._round_root(Path(self.cfg.stage.from_run)) / stage)
        for directory in candidates:
            if (directory / "done.json").exists():
                return directory
        return None

    def require(self, stage: str) -> Path:
        """Where a finished ``stage`` lies (:meth:`finished_dir`); a clear error when it has not finished."""
        found = self.finished_dir(stage)
        if found is None:
            hint = f" (looked in {self.run_dir} and stage.from_run={self.cfg.stage.from_run})"
            raise FileNotFoundError(f"stage {stage!r} has not finished{hint}; run it first or point "
                                    f"stage.from_run at a run directory that has {stage}/done.json")
        return found

    # --- generators ----------------------------------------------------------------------------------------------
    def starting_generator(self) -> str | Path:
        """What alignment (and a round's feedback) starts from: the previous round's aligned generator in round
        r > 1; else the SFT generator when the run has one, or a ``generator=hf`` checkpoint as it is when the job
        leaves ``sft`` out of ``stage.stages``."""
        if self.round > 1:
            return self.for_round(self.round - 1).require("align") / "generator"
        if self.finished_dir("sft") is None and "sft" not in self.cfg.stage.stages and self.cfg.generator.kind == "hf":
            return self.cfg.generator.name_or_path
        return self.require("sft") / "generator"

    def generator_checkpoints(self) -> Dict[str, str | Path]:
        """Every generator the run has produced so far, by the name used in tables: initial, sft, aligned."""
        found: Dict[str, str | Path] = {}
        sft = self.finished_dir("sft")
        if sft is not None:
            found["initial"] = sft / "initial"
            found["sft"] = sft / "generator"
        elif self.cfg.generator.kind == "hf":
            found["initial"] = self.cfg.generator.name_or_path
        align = self.finished_dir("align")
        if align is not None:
            found["aligned"] = align / "generator"
        for r in range(2, self.cfg.loop.rounds + 1):
            later = self.for_round(r).finished_dir("align")
            if later is not None:
                found[f"round{r}"] = later / "generator"
        return found

    # --- sampling and scoring: every model call of a stage outside trainer.fit, on the run's placement -----------
    def generate(self, model, tokenizer, prompts: List[Any], **kwargs):
        """:func:`rlmf.generation.generate` under the run's placement (device, dtype, autocast, eval mode), by the
        run's ``generator.sampler``."""
        with self.placement.inference():
            return generate(model, tokenizer, prompts, sampler=self.cfg.generator.sampler, **kwargs)

    def sample(self, model, tokenizer, prompts: List[Any], k: int, seed: int, what: str = "sampling", **kwargs):
        """``k`` completions of each prompt at ``generator.temperature`` (a progress bar named ``what``)."""
        g = self.cfg.generator
        progress = f"{what}: {len(prompts)} prompts x {k}" if self.cfg.trainer.progress_bar else None
        return self.generate(model, tokenizer, prompts, max_new_tokens=g.max_new_tokens, do_sample=True,
                             temperature=g.temperature, seed=seed, max_prompt_length=g.max_prompt_length,
                             num_return_sequences=k, progress=progress, **kwargs)

    def greedy(self, model, tokenizer, prompts: List[Any]) -> List[str]:
        """One greedy completion of each prompt."""
        g = self.cfg.generator
        return self.generate(model, tokenizer, prompts, max_new_tokens=g.max_new_tokens, do_sample=False,
                             max_prompt_length=g.max_prompt_length)

    def score(self, discriminator, prompts: List[str], completions: List[str]) -> torch.Tensor:
        """Discriminator rewards ``[B]`` on the run's device and precision."""
        with self.placement.inference():
            return discriminator.score(prompts, completions)

    # --- logging -------------------------------------------------------------------------------------------------
    def lightning_loggers(self, stage: str) -> List[Any]:
        kind = self.cfg.logger.kind
        if kind == "none":
            return []
        if kind == "csv":
            from lightning.pytorch.loggers import CSVLogger
            name = stage if self.round == 1 else f"round{self.round}_{stage}"
            return [CSVLogger(save_dir=str(self.run_dir / "logs"), name=name, version="")]
        return [self.wandb_logger()]

    def wandb_logger(self):
        if self._wandb is None:
            from lightning.pytorch.loggers import WandbLogger
            os.environ.setdefault("WANDB_MODE", self.cfg.logger.mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = WandbLogger(
                project=self.cfg.logger.project, save_dir=self.cfg.logger.save_dir, group=self.sweep_group,
                name=self.run_dir.name if not self.sweep_group else f"{self.sweep_group}/{self.run_dir.name}",
                config=OmegaConf.to_container(self.cfg, resolve=True))
        return self._wandb

    def log_table(self, key: str, columns: List[str], rows: List[List[Any]]) -> None:
        if self.cfg.logger.kind == "wandb":
            self.wandb_logger().log_table(key=key, columns=columns, data=rows)

    def log_summary(self, metrics: Dict[str, float]) -> None:
        if self.cfg.logger.kind == "wandb":
            run = self.wandb_logger().experiment
            for k, v in metrics.items():
                run.summary[k] = v

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.experiment.finish()


