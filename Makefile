# Two commands do all the set-up on a fresh machine:
#   make run    builds .venv and runs the main job (the whole study, quick preset, local Ray)
#   make test   builds .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch 2.13.0 is installed first, so the package's torch range is already met
# and pip never pulls the multi-GB CUDA wheels. On a GPU node, set TORCH_SPEC to a CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,distributed]"
	$(BIN)/python -c "import torch; print('torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/hpcdyn pipeline --preset quick --out $(RUN_DIR)/pipeline --progress

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/bench_simulator.py --write benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) $(RUN_DIR) .pytest_cache
