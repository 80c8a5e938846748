# Two entry points: `make demo` (set up, then run the main job) and `make test` (set up, then test).
# The set-up puts a CPU torch into the venv *first*, so no multi-GB CUDA build is ever resolved.
# On a GPU machine override it, e.g. `make test TORCH="torch==2.11.0"` or `TORCH=` to keep the
# torch that the interpreter already has (use VENV_FLAGS=--system-site-packages for that).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
VENV_FLAGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.elmkit-installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@if [ -n "$(TORCH)" ]; then $(PY) -m pip install --disable-pip-version-check -q "$(TORCH)"; fi
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/elmkit demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
