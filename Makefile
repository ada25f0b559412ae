# Two commands for a fresh machine:  make demo   (the main job)   and   make test
VENV ?= .venv
BIN := $(VENV)/bin
export VENV

.PHONY: setup demo test lint bench clean

setup:
	@bash tools/setup_env.sh

DATA := data/shakespeare

demo: setup
	$(BIN)/python tools/prepare_data.py --builtin --out $(DATA)/shards --val_fraction 0.05 --num_proc 2
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} PYTHONWARNINGS=ignore::FutureWarning $(BIN)/python crate_lm/pretrain.py --config configs/default.yaml

test: setup
	$(BIN)/ruff check crate_lm tools tests
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python tools/bench_model.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
