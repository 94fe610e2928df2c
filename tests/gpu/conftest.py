"""The GPU suite (``make test-gpu``): runs only where torch sees a CUDA device.

Two guards keep it off CPU machines: ``tests/conftest.py`` does not collect this folder at all without CUDA (so
``make test`` stays CPU-only), and when the folder is named explicitly (``pytest tests/gpu``, which bypasses that)
every test here is marked skipped at collection, before any fixture could touch a device.

The device name is printed in pytest's header (shown without ``-q``) and in the terminal summary (always).
Fixtures: ``device`` (the CUDA device) and ``accelerator`` (the ``trainer.accelerator`` value), and full-float32
matmuls (no TF32) for every test here, so float32 tolerances mean float32 and the Triton kernel (which follows
``torch.backends.cuda.matmul.allow_tf32``) and cuBLAS compute alike.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
HAS_CUDA = torch.cuda.is_available()


def _device_line() -> str:
    if not HAS_CUDA:
        return f"rlmf GPU suite: torch {torch.__version__} sees no CUDA device; every test in tests/gpu is skipped"
    props = torch.cuda.get_device_properties(0)
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    return (f"rlmf GPU suite on cuda:0 = {torch.cuda.get_device_name(0)} (sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible); torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), triton {triton_version}")


def pytest_report_header(config):
    return _device_line()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(_device_line())


def pytest_collection_modifyitems(config, items):
    """Without CUDA, every test of this folder is skipped (this hook sees the whole session's items)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="tests/gpu needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device every test here computes on."""
    return torch.device("cuda", 0)


@pytest.fixture(scope="session")
def accelerator() -> str:
    """``trainer.accelerator`` for pipeline runs on :func:`device`."""
    return "gpu"


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    """TF32 off for cuBLAS (torch's default, pinned here in case something in the process turned it on)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before
