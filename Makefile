# The README's commands. Everything runs in a local virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast lint bench bench-full speed docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m examples.demo

test: setup
	$(PY) -m pytest -n 2 --dist loadgroup

test-fast: setup
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m benchmarks.accuracy --suite quick --jobs 2

bench-full: setup
	$(PY) -m benchmarks.accuracy --suite full --jobs 2

speed: setup
	$(PY) -m benchmarks.speed --part all

# The HTML documentation in docs/_build/html, warnings as errors (installs the docs extra).
docs: $(VENV)/.docs-installed
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -e ".[docs]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
	rm -rf docs/_build docs/api/generated docs/auto_examples docs/sg_execution_times.rst
