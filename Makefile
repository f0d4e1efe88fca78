# The course in two commands:   make lab   (open the course)   make test   (run every test)
# Both create the virtual environment .venv first if it is missing.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# PyTorch is installed first, by tools/install_torch.py, which picks the build for this
# machine: on Linux without an NVIDIA GPU the CPU wheel (from PyTorch's CPU index, or
# from your package registry if it already serves one), elsewhere the plain wheel.
#   make lab TORCH_VARIANT=cuda                      a CUDA build on an NVIDIA machine
#   make lab TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   any index you like
#   make lab TORCH_SPEC='torch>=2.6'                 another version
# A torch that is already installed in $(VENV) is kept.
TORCH_SPEC    ?= torch==2.13.0
TORCH_VARIANT ?= auto
TORCH_INDEX_URL ?=
export TORCH_SPEC TORCH_VARIANT TORCH_INDEX_URL
LEARN_STAMP := $(VENV)/.installed-learn
TEST_STAMP  := $(VENV)/.installed-test
# Extra arguments for JupyterLab, e.g. make lab LAB_ARGS="--port 8899 --no-browser"
LAB_ARGS   ?=
# Jupyter refuses to run as root unless told to (containers, CI).
ROOT_FLAG  := $(if $(filter 0,$(shell id -u)),--allow-root,)
PYTEST_ARGS ?=
# make test runs the tests in this many pytest-xdist workers, each file (each notebook) whole on
# one worker (--dist loadfile: nbval runs a notebook's cells in order in one kernel).
# TEST_WORKERS=0 runs everything in one process, in order.
TEST_WORKERS ?= 2

.PHONY: lab test test-fast lint env test-env sync exercises check figures bench clean help

help:
	@echo "make lab        open the course in JupyterLab (creates $(VENV) first if needed)"
	@echo "make test       run the whole test suite (package, lessons, solutions, exercise checks)"
	@echo "make test-fast  run the unit tests only (no notebooks, servers or subprocesses), under a minute"
	@echo "make lint       check the code with ruff: lint rules and format (pyproject.toml)"
	@echo "make exercises  regenerate exercises/ from solutions/ (keeps your edits)"
	@echo "make sync       pair every notebook .ipynb with its .py (jupytext), then regenerate exercises/"
	@echo "make check NB=01  check your exercise notebook exercises/01_*.ipynb (moe-course check 01)"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# What a learner needs: PyTorch (the right build) and the course package with its dependencies.
$(LEARN_STAMP): pyproject.toml tools/install_torch.py | $(VENV)/bin/python
	$(BIN)/python tools/install_torch.py
	$(BIN)/python -m pip install -e .
	touch $@

# What the tests need on top: the browser-test and cross-check packages (the `test` extra).
$(TEST_STAMP): $(LEARN_STAMP)
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

env: $(LEARN_STAMP)

test-env: $(TEST_STAMP)

lab: $(LEARN_STAMP)
	$(BIN)/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks/00_welcome.ipynb $(ROOT_FLAG) $(LAB_ARGS)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

exercises: $(LEARN_STAMP)
	$(BIN)/moe-exercises build

sync: $(LEARN_STAMP)
	$(BIN)/jupytext --sync notebooks/[0-9]*.py solutions/[0-9]*.py
	$(BIN)/moe-exercises build

check: $(LEARN_STAMP)
	$(BIN)/moe-course check $(NB)

clean:
	rm -rf $(VENV) build runs

# The unit tier: every test but the slow ones (notebooks, nbval subprocesses, JupyterLab,
# the browser, worker processes); under a minute on two cores.
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

# Lint with the rules in pyproject.toml ([tool.ruff]); ruff comes with the test extra.
lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
