# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install what they need.
# torch is installed first and pinned (a CPU wheel); everything else installs after it and reuses it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/python examples/quantize_existing_model.py

lint: venv
	$(BIN)/ruff check .

test: venv lint
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python benchmarks/bench_linear.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
