# The course in two commands:   make lab   (open the course)   make test   (run every test)
# Both create the virtual environment .venv first if it is missing.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# PyTorch is installed first and on its own, so that you can choose the build:
# on this course's reference machines torch==2.13.0 is the CPU build; on a GPU
# box use e.g. `make lab TORCH_SPEC=torch` (or follow pytorch.org's selector).
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.installed
LAB_ARGS   ?=
# Jupyter refuses to run as root unless told to (containers, CI).
ROOT_FLAG  := $(if $(filter 0,$(shell id -u)),--allow-root,)
PYTEST_ARGS ?=

.PHONY: lab test test-fast lint env sync exercises check figures bench clean help

help:
	@echo "make lab        open the course in JupyterLab (creates $(VENV) first if needed)"
	@echo "make test       run the whole test suite (package, lessons, solutions, exercise checks)"
	@echo "make test-fast  run the unit tests only (no notebooks, servers or subprocesses), under a minute"
	@echo "make lint       check the code with ruff (rules in pyproject.toml)"
	@echo "make exercises  regenerate exercises/ from solutions/ (keeps your edits)"
	@echo "make sync       pair every notebook .ipynb with its .py (jupytext), then regenerate exercises/"
	@echo "make check NB=01  check your exercise notebook exercises/01_*.ipynb with nbval"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

env: $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks/00_welcome.ipynb $(ROOT_FLAG) $(LAB_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

exercises: $(STAMP)
	$(BIN)/moe-exercises build

sync: $(STAMP)
	$(BIN)/jupytext --sync notebooks/[0-9]*.py solutions/[0-9]*.py
	$(BIN)/moe-exercises build

check: $(STAMP)
	$(BIN)/moe-check $(NB)

clean:
	rm -rf $(VENV) build runs

# The unit tier: every test but the slow ones (notebooks, nbval subprocesses, JupyterLab,
# the browser, worker processes); under a minute on two cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

# Lint with the rules in pyproject.toml ([tool.ruff]); ruff comes with the dev extras.
lint: $(STAMP)
	$(BIN)/ruff check .
