"""Every library file fits in a head: at most 400 lines per file and 80 per function (STYLE.md, issue #21).

Counted on the source of the package (``rlmf/`` and ``kernels/rlmf_kernels/``), not tests or experiments. A file
or function that grows past the limit is split by job, not exempted here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "rlmf", ROOT / "kernels" / "rlmf_kernels"]
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def library_files():
    return sorted(path for folder in SOURCES for path in folder.rglob("*.py"))


def test_no_library_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in library_files()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"split these by job: {long}"


def test_no_function_is_over_80_lines():
    long = {}
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}::{node.name}"] = lines
    assert not long, f"split these: {long}"
