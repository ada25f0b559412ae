"""crate_lm: pretraining and opening up CRATE (white-box transformer) language models."""

__version__ = "0.1.0"
