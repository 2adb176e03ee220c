# weft: one command to set up and run the main job, one to set up and run the tests.
#   make demo   bootstrap .venv (idempotent) and run the main job on the embedded sample world
#   make test   bootstrap .venv (idempotent) and run the default test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.weft-installed

# Nothing may reach a model hub or an update server.
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export DS_ACCELERATOR := cpu

.PHONY: setup demo test bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m cuda_ops.build
	$(PY) -m cuda_ops.bench --shapes tiny_llm

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m cuda_ops.bench
