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

# torch comes first from pip (it reads the machine's pip configuration, where a CPU or CUDA wheel of
# TORCH_SPEC is found); the rest from uv, which downloads and unpacks in parallel: 14 s against pip's
# 74 s on 2 cores, the same versions (pip freeze identical), torch left as installed. pip does it
# where uv cannot be installed. Neither byte-compiles (pip one file at a time took 85 s of 147);
# compileall does it on every core after, leaving out what nothing here imports (the packages' own
# test suites, Ray's RLlib and Serve, vendored copies). The compiled files matter: where
# PYTHONDONTWRITEBYTECODE is set, nothing compiled on import is kept, and every process would
# compile torch and Ray again (~30 s against 9 s for the pipeline's imports). A few files are not
# Python 3.11 (a torch test helper in 3.12 syntax); they stay uncompiled, so compileall's status is
# not the install's.
NOT_COMPILED := /(tests|rllib|_vendor|_vendored)/|/ray/serve/
EXTRAS := .[test,distributed]

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	( $(BIN)/python -m pip install --quiet uv && $(BIN)/python -m uv pip install --quiet --python $(BIN)/python -e "$(EXTRAS)" ) \
	  || $(BIN)/python -m pip install --quiet --no-compile -e "$(EXTRAS)"
	$(BIN)/python -m compileall -qq -j 0 -x '$(NOT_COMPILED)' $(VENV)/lib hpcdyn analysis sweeps || true
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
