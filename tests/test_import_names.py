"""Nothing at the top of the repository shadows a dependency when Python runs from the repository root.

`python -m pytest`, `python -m rlmf.train` and a notebook opened at the root all put the root first on ``sys.path``,
so a top-level folder with an ``__init__.py`` wins over an installed module of the same name. transformers imports
Hugging Face's ``kernels`` package while loading ``modeling_utils``; our kernels once sat in a top-level
``kernels/__init__.py`` and broke every import of a model.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def top_level_packages() -> list[str]:
    """The regular packages importable by name from the repository root (folders holding an ``__init__.py``)."""
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))


def test_no_top_level_package_has_a_dependency_module_name():
    installed = importlib.metadata.packages_distributions()  # top-level module name -> distributions providing it
    ours = set(top_level_packages()) - {"rlmf"}  # rlmf is the project itself, installed from this folder
    clashes = {name: installed[name] for name in ours if name in installed}
    assert not clashes, f"top-level packages that shadow installed modules from the repository root: {clashes}"


def test_only_the_project_and_its_configs_are_top_level_packages():
    """conf/ must stay a package for Hydra's ``pkg://rlmf.conf``; anything new at the top needs a look at the test
    above (and a name nothing installs)."""
    assert top_level_packages() == ["conf", "rlmf"]


def run_from_root(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_kernels_from_the_root_is_the_installed_package_and_transformers_loads():
    """With ``-c`` the current folder (the root) is first on ``sys.path``, as under ``python -m pytest``."""
    try:
        installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers older than 5.2x does not need it)")
    origin = run_from_root("import sys, kernels, transformers.modeling_utils; "
                           "assert sys.path[0] == ''; print(kernels.__file__)")
    assert Path(origin).resolve() == Path(installed).resolve(), origin


def test_rlmf_kernels_is_the_public_import_from_anywhere():
    origin = run_from_root("import rlmf.kernels as k; k.logprobs_from_logits; print(k.__file__)")
    assert Path(origin).resolve() == ROOT / "kernels" / "rlmf_kernels" / "__init__.py"
