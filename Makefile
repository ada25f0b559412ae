# Two commands for a fresh machine:  make demo   (the main job)   and   make test
VENV ?= .venv
BIN := $(VENV)/bin
export VENV

.PHONY: setup demo study truth test lint bench clean

setup:
	@bash tools/setup_env.sh

DATA := data/shakespeare

demo: setup
	$(BIN)/python tools/prepare_data.py --builtin --out $(DATA)/shards --val_fraction 0.05 --num_proc 2
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} PYTHONWARNINGS=ignore::FutureWarning $(BIN)/python crate_lm/pretrain.py --config configs/default.yaml

# The sparse-features study the README reports (CRATE vs GPT, ista_lambda sweep): CPU minutes
study: setup
	$(BIN)/python tools/prepare_data.py --builtin --out $(DATA)/shards --val_fraction 0.05 --num_proc 2
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} PYTHONWARNINGS=ignore::FutureWarning $(BIN)/python tools/feature_study.py

# The ELK testbed (synthetic facts -> CRATE and GPT runs -> crate-lm elk), written to docs/truth_testbed/: CPU minutes
truth: setup
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} PYTHONWARNINGS=ignore::FutureWarning $(BIN)/python tools/truth_testbed.py

test: setup
	$(BIN)/ruff check crate_lm tools tests
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python tools/bench_model.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
