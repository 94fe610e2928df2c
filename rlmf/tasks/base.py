"""What a task gives the pipeline, and the registry of tasks by ``task.name``.

The stages (:mod:`rlmf.pipeline`) speak only to :class:`Task`: where the prompts, demonstrations and preference data
come from, who answers a batch of completions (the A/B feedback of the ``feedback`` stage), and whether a gold metric
exists to evaluate against. Adding a task is one file with a :class:`Task` subclass decorated with
:func:`register_task`, and one ``conf/task/<name>.yaml`` whose ``name`` is the registered one, or
``package.module:Class`` for a task outside this package (its other keys are the task's own settings, read by the
task from ``self.cfg``). The built-in tasks are
:class:`rlmf.tasks.persona_email.PersonaEmailTask` and :class:`rlmf.tasks.preference_files.PreferenceFilesTask`.

Sampling counts that the stages apply to any task are read from the task's config with a default:
``eval_samples_per_prompt`` (1), ``feedback_samples_per_prompt`` (4), ``align_samples_per_prompt`` (4).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Type

TASKS: Dict[str, Type["Task"]] = {}


def register_task(name: str) -> Callable[[Type["Task"]], Type["Task"]]:
    """Register a :class:`Task` subclass as ``task.name=<name>``."""

    def decorate(cls: Type["Task"]) -> Type["Task"]:
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task {name!r} is registered twice ({TASKS[name].__module__} and {cls.__module__})")
        cls.name = name
        TASKS[name] = cls
        return cls

    return decorate


def task_class(name: str) -> Type["Task"]:
    """The :class:`Task` class ``task.name`` names: a registered name, or ``"package.module:Class"`` for a task in
    your own code (its module is imported, which also registers it)."""
    if isinstance(name, str) and name.count(":") == 1:
        import importlib

        module_name, class_name = name.split(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"task.name={name!r}: cannot import {class_name} from {module_name}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise KeyError(f"task.name={name!r} is not a subclass of rlmf.tasks.base.Task")
        return cls
    if name not in TASKS:
        raise KeyError(f"task.name={name!r} is not a registered task; choose one of: {', '.join(sorted(TASKS))}, "
                       "or 'package.module:Class'")
    return TASKS[name]


def build_task(cfg, seed: int) -> "Task":
    """The task ``cfg.name`` names (:func:`task_class`), built from its config section and the run's seed."""
    return task_class(cfg.get("name"))(cfg, seed)


class Task(ABC):
    """A source of prompts, demonstrations and feedback for the pipeline.

    Prompts are :class:`rlmf.data.PromptOnly` (text, and chat messages where the task has them). Demonstrations are
    what :class:`rlmf.data.sft.SFTDataModule` takes: ``(prompt, completion)`` tuples or desirable
    :class:`rlmf.data.FeedbackExample` rows.
    """

    name: ClassVar[str] = ""
    #: True when :meth:`feedback` answers completions (the ``feedback`` stage then runs); False when the task brings
    #: its preference pairs (:meth:`preference_pairs`).
    has_feedback: ClassVar[bool] = False
    #: True when :meth:`gold` gives the hidden ground truth the evaluation reports.
    has_gold: ClassVar[bool] = False
    #: What the gold metric and the feedback measure, as it appears in metric names: ``gold/<metric_name>/sft``,
    #: ``feedback/observed_<metric_name>`` (the persona-email task: ``reply_rate``).
    metric_name: ClassVar[str] = "score"

    def __init__(self, cfg, seed: int):
        self.cfg, self.seed = cfg, seed

    def setting(self, key: str, default: Any) -> Any:
        """A setting of the task's config section, or ``default`` when the task does not have it."""
        value = self.cfg.get(key)
        return default if value is None else value

    # --- data ------------------------------------------------------------------------------------------------------
    @abstractmethod
    def corpus(self) -> List[str]:
        """Texts to train the tiny generator's tokenizer on (prompts and completions of the task)."""

    @abstractmethod
    def demonstrations(self, split: str) -> Sequence[Any]:
        """SFT rows of ``split`` (``"train"`` or ``"validation"``)."""

    @abstractmethod
    def train_prompts(self) -> List[Any]:
        """The prompts the alignment round (and the online algorithms) sample for."""

    @abstractmethod
    def eval_prompts(self) -> List[Any]:
        """Held-out prompts the evaluation samples for."""

    def preference_pairs(self, split: str) -> Optional[List[Any]]:
        """Fixed preference pairs of ``split`` (``"train"`` or ``"eval"``), or None when pairs come from feedback."""
        return None

    # --- feedback and the ground truth ------------------------------------------------------------------------------
    def feedback_prompts(self) -> List[Any]:
        """The prompts whose completions the ``feedback`` stage asks :meth:`feedback` about."""
        raise NotImplementedError(f"task {self.name!r} has no feedback source")

    def feedback(self, prompts: List[str], completions: List[str], rng: random.Random) -> List[bool]:
        """One answer per completion (a reply, a thumbs-up): the task's A/B feedback, drawn with ``rng``."""
        raise NotImplementedError(f"task {self.name!r} has no feedback source")

    def gold(self, prompts: List[str], completions: List[str]) -> Optional[List[float]]:
        """The ground-truth value of each completion (e.g. a reply probability), or None without one."""
        return None

    def group(self, prompt: str) -> str:
        """The group a prompt belongs to for per-group reports (the persona of an email brief)."""
        return "all"

    def reward_context(self) -> Dict[str, Any]:
        """Objects of the task that ``function`` rewards may take by name (:func:`rlmf.rewards.build_reward`)."""
        return {}
