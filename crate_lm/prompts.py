r"""Prompts as the command line takes them: ``\n``, ``\t`` and ``\\`` stand for newline, tab and
one backslash, and a prompts file holds one prompt per line (blank lines skipped)."""

from __future__ import annotations

import re
from pathlib import Path

from crate_lm.errors import CrateLMError

_ESCAPE = re.compile(r"\\([\\nt])")
_ESCAPES = {"\\": "\\", "n": "\n", "t": "\t"}


def unescape_prompt(text: str) -> str:
    r"""``\n``, ``\t`` and ``\\`` in ``text`` as newline, tab and one backslash; other text as is."""
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group(1)], text)


def read_prompt_lines(path: str | Path, flag: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, each unescaped; a CrateLMError naming ``flag``
    (e.g. ``--prompts_file``) when the file is missing, not UTF-8 text or empty."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise CrateLMError(f"{flag} {path}: no such file; pass a text file with one entry per line")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise CrateLMError(f"{flag} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    entries = [unescape_prompt(line) for line in lines if line.strip()]
    if not entries:
        raise CrateLMError(f"{flag} {path} holds no entry; write one per line")
    return entries
