import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")

from crate_lm.config import ModelConfig  # noqa: E402

VARIANTS = [("crate", "crate"), ("crate", "overcomplete"), ("crate", "alpha"), ("gpt", "alpha")]


def small_config(**overrides) -> ModelConfig:
    """A model small enough for many forward passes per test, with every feature exercised."""
    base = dict(vocab_size=97, max_seq_len=32, d_model=32, n_layers=2, n_heads=4)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
