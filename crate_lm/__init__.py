"""crate_lm: pretraining and opening up CRATE (white-box transformer) language models.

``crate_lm.load(path)`` opens a trained model with its tokenizer (see :func:`crate_lm.checkpoint.load`);
it is imported on first use, so ``import crate_lm`` stays light (no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from crate_lm.checkpoint import LoadedModel, load

_LAZY = {"load": "crate_lm.checkpoint", "LoadedModel": "crate_lm.checkpoint"}

__all__ = ["LoadedModel", "__version__", "load"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'crate_lm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
