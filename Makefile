# The two set-up commands (README): `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint install tiny clean

# The installer: uv (pinned) from the indexes pip is configured with, pip where uv cannot be had.
INSTALL := $(BIN)/python -m launcher.builtins.install

# What the demo needs. The CPU build of torch first: an unpinned torch would pull GBs of CUDA packages.
# constraints.txt: the tested versions of everything else (see its header). Then, once per
# environment, the built-in model, so that no run waits for it.
$(RUN_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(INSTALL) torch==2.13.0
	$(INSTALL) -c constraints.txt -e .
	$(BIN)/python -m launcher.builtins.prebuild
	touch $@

# What the tests and linters need on top (pytest, ruff, mypy, the tracker and QLoRA extras).
$(DEV_STAMP): $(RUN_STAMP)
	$(INSTALL) -c constraints.txt -e '.[dev]'
	touch $@

install: $(RUN_STAMP)

demo: $(RUN_STAMP)
	$(BIN)/launcher submit jobs/demo.yaml --backend local

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy launcher

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
