"""User errors and the one wrapper that turns them into ``error: ...`` and an exit code.

Every mistake a user can make (a config value, a data folder, a checkpoint, a CLI argument)
raises a subclass of :class:`CrateLMError` whose message names the problem and the fix. The
entry points (``pretrain.py``, the ``crate-lm`` CLI, the scripts in ``tools/``) run their work
through :func:`run_cli`, which prints that message as one line on stderr and returns the
error's exit code, never a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class CrateLMError(ValueError):
    """A user error: the message says what is wrong and how to fix it."""

    exit_code = 2


def run_cli(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Call ``fn``; a :class:`CrateLMError` becomes one ``error: ...`` line and its exit code."""
    try:
        result = fn(*args, **kwargs)
    except CrateLMError as err:
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr, flush=True)
        return err.exit_code
    return result if isinstance(result, int) else 0
