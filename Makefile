# Two commands for a fresh machine:  make demo   (the main job)   and   make test
VENV ?= .venv
BIN := $(VENV)/bin
export VENV

.PHONY: setup demo test lint bench clean

setup:
	@bash tools/setup_env.sh

demo: setup
	$(BIN)/crate-lm smoke

test: setup
	$(BIN)/ruff check crate_lm tools tests
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python tools/bench_model.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
