# The two set-up commands (README): `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install tiny clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch; an unpinned torch would pull GBs of CUDA packages.
	$(BIN)/python -m pip install -q torch==2.13.0
	# constraints.txt: the tested versions of everything else (see its header).
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# Once per environment, so no run waits for it: the built-in model and DeepSpeed's CPU ops.
	$(BIN)/python -m launcher.builtins.prebuild
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/launcher submit jobs/demo.yaml --backend local

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy launcher

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
