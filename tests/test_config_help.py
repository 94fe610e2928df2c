"""Every config field carries its help text, and docs/config.md is what the schemas render (so it cannot drift)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from rlmf.config import DOC_COMMAND, Config, config_sections, describe_config, main, render_markdown
from rlmf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def schema_classes():
    """Every dataclass reachable from the config's sections, nested ones included (``OptimConfig``, ...)."""
    found, todo = [], [schema for _, schema in config_sections().values()]
    while todo:
        schema = todo.pop()
        if schema in found:
            continue
        found.append(schema)
        instance = schema()
        todo += [type(getattr(instance, f.name)) for f in dataclasses.fields(schema)
                 if dataclasses.is_dataclass(getattr(instance, f.name))]
    return found


def test_every_field_of_every_schema_has_a_help_text():
    classes = schema_classes()
    assert {"OptimConfig", "TinyGeneratorConfig", "OnlineConfig", "JudgeRewardConfig"} <= {c.__name__ for c in classes}
    missing = [f"{schema.__name__}.{f.name}" for schema in classes for f in dataclasses.fields(schema)
               if not str(f.metadata.get("help", "")).strip()]
    assert not missing, f"fields without metadata={{'help': ...}}: {missing}"
    # A dataclass without a docstring gets its signature as __doc__: the section would open with it.
    undocumented = [c.__name__ for c in classes if not c.__doc__ or c.__doc__.startswith(f"{c.__name__}(")]
    assert not undocumented, f"schemas without a docstring: {undocumented}"


def test_docs_config_md_is_what_the_schemas_render():
    rendered = render_markdown(describe_config())
    assert (ROOT / "docs" / "config.md").read_text() == rendered, f"docs/config.md is stale: run {DOC_COMMAND}"


def test_rows_flatten_nested_schemas_with_the_defaults_their_parent_gives():
    rows = {key: (type_name, default)
            for section in describe_config().values() for key, type_name, default, _ in section}
    assert rows["generator.sft.lr"] == ("float", "0.003")  # GeneratorConfig's, not OptimConfig's 0.001
    assert rows["algo.optim.max_steps"] == ("int", "60")
    assert rows["algo.optim.lr"][1].startswith("${generator.optim_by_family.")
    assert rows["task.train"] == ("str", "???")
    assert rows["stage.stages"][1] == "[sft, feedback, discriminator, align, evaluate]"
    assert rows["algo.online.kl_target"] == ("Optional[float]", "null")
    assert set(describe_config("task")) == {"task/persona_email", "task/preference_files"}
    assert set(describe_config("reward/judge", "loop")) == {"reward/judge", "loop"}
    assert len(describe_config("config")["config"]) == len(dataclasses.fields(Config))


def test_an_unknown_group_names_the_ones_there_are():
    with pytest.raises(ConfigError, match="no config group trainr; choose from: config, task/persona_email"):
        describe_config("trainr")


def test_the_text_help_fits_120_columns(capsys):
    main([])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 120
    assert "trainer.max_bad_steps" in out and "[reward/ensemble]" in out


def test_python_m_rlmf_config_prints_the_named_group():
    out = subprocess.run([sys.executable, "-m", "rlmf.config", "logger"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert out.splitlines()[0].startswith("[logger]")
    assert [line.split()[0] for line in out.splitlines()[2:] if line and not line.startswith(" ")] == [
        "logger.kind", "logger.project", "logger.mode", "logger.save_dir"]
