# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install what they need.
# torch is installed first and pinned (a CPU wheel); everything else installs after it and reuses it.
# The Lightning integration (integrations/lightning, its own distribution) installs in the same pip call as
# the local monoquant, so its `monoquant` requirement is met by this checkout, never by PyPI, and the torch pin
# is repeated there so that lightning can never pull another torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml integrations/lightning/pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q $(TORCH_PIN) -e ".[dev,transformers,plot]" -e "integrations/lightning[examples,cli]"
	touch $(STAMP)

demo: venv
	$(BIN)/python examples/quantize_existing_model.py
	$(BIN)/python examples/lightning_digits.py
	$(BIN)/python examples/transformers_causal_lm.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: venv lint
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python benchmarks/bench_linear.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
