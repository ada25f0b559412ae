"""Token-level binary labels for probing, computed from the text alone.

A *labeler* is ``fn(text: str, offsets: np.ndarray (n, 2)) -> np.ndarray bool (n,)``: given the
decoded text of n tokens and each token's [start, end) character span in it, it says which
tokens carry the property. Labels come from text, not from token ids, so that models with
different tokenizers (a CRATE run and its GPT baseline) are labelled by one definition, each on
its own tokenization.

:func:`token_spans` gives the text and the spans, :func:`label_sequence` applies a labeler to a
token sequence (special tokens are never positive and separate texts: each document is
labelled on its own), :func:`resolve_labeler` turns a name, a callable or a
``"package.module:function"`` / ``"path/to/file.py:function"`` string into a :class:`Labeler`.
``LABELERS`` holds the built-ins: ``line_start``, ``speaker``, ``punctuation``, ``digit``,
``capitalized``.

A sequence cut from a longer text (a packed training sequence) starts wherever the cut fell;
its text starts there too, so its first token counts as a line start if it is not whitespace.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crate_lm.errors import CrateLMError

LabelFn = Callable[[str, np.ndarray], np.ndarray]
REPLACEMENT = "\ufffd"  # what a decoder prints for the bytes of an unfinished character
MAX_RUN = 8  # a character spans at most 4 bytes: byte-level tokens that only decode together stay close


class LabelError(CrateLMError):
    """A labeler cannot be found or returned something other than one bool per token."""


# ---- text and character spans ----------------------------------------------------------------


def _common_prefix(a: str, b: str, start: int = 0) -> int:
    """Length of the common prefix of ``a`` and ``b`` (both known to agree up to ``start``)."""
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prefix_spans(tokenizer: Any, ids: list[int], full: str) -> np.ndarray:
    """Spans by decoding every prefix: token i ends where decode(ids[:i+1]) stops agreeing with
    the whole text (an unfinished character decodes as U+FFFD, which disagrees, so the token that
    completes it owns it). O(n^2) decoding; the fallback of the fallback."""
    spans = np.zeros((len(ids), 2), dtype=np.int64)
    end = 0
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1])
        agree = len(prefix) if full.startswith(prefix) else _common_prefix(prefix, full, end)
        new_end = max(end, min(agree, len(full)))
        spans[i] = (end, new_end)
        end = new_end
    spans[-1, 1] = len(full) if len(ids) else 0
    return spans


def _local_spans(tokenizer: Any, ids: list[int], full: str, pieces: list[str]) -> np.ndarray | None:
    """Spans walking the tokens: a token whose own decoding continues the text owns that piece;
    a short run of tokens that only decodes cleanly together (a character split across byte-level
    tokens) is prefix-decoded within the run. None when the walk cannot follow the text."""
    n = len(ids)
    spans = np.zeros((n, 2), dtype=np.int64)
    pos = i = 0
    while i < n:
        piece = pieces[i]
        if REPLACEMENT not in piece and full.startswith(piece, pos):
            spans[i] = (pos, pos + len(piece))
            pos += len(piece)
            i += 1
            continue
        for k in range(i + 1, min(n, i + MAX_RUN)):
            run = tokenizer.decode(ids[i : k + 1])
            if REPLACEMENT not in run and full.startswith(run, pos):
                break
        else:
            return None
        end = pos
        for j in range(i, k + 1):
            text = run if j == k else tokenizer.decode(ids[i : j + 1])
            agree = pos + _common_prefix(text, full[pos : pos + len(text)])
            new_end = max(end, agree) if j < k else pos + len(run)
            spans[j] = (end, new_end)
            end = new_end
        pos, i = end, k + 1
    return spans if pos == len(full) else None


def token_spans(tokenizer: Any, ids: Sequence[int] | np.ndarray) -> tuple[str, np.ndarray]:
    """The decoded text of ``ids`` and each token's [start, end) character span in it, (n, 2) int64.

    Tokens are decoded one by one; when their concatenation is the whole decoding (always for
    ASCII) the spans are the pieces' lengths. Otherwise (a multi-byte character split across
    byte-level tokens, or a decoder that treats a leading space specially) the spans follow
    prefix decodings, so they always slice the whole text: the token that completes a character
    owns it and the tokens holding only part of it get empty spans."""
    ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
    full = tokenizer.decode(ids)
    if not ids:
        return full, np.zeros((0, 2), dtype=np.int64)
    pieces = [tokenizer.decode([i]) for i in ids]
    if "".join(pieces) == full:
        ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
        return full, np.stack([ends - [len(p) for p in pieces], ends], axis=1)
    spans = _local_spans(tokenizer, ids, full, pieces)
    return full, spans if spans is not None else _prefix_spans(tokenizer, ids, full)


def tokens_touching(chars: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per token: does its span hold at least one character marked in ``chars`` (bool, len(text))?"""
    counts = np.concatenate([[0], np.cumsum(chars, dtype=np.int64)])
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return counts[offsets[:, 1]] > counts[offsets[:, 0]]


def _mark(text: str, starts_ends: list[tuple[int, int]]) -> np.ndarray:
    chars = np.zeros(len(text), dtype=bool)
    for start, end in starts_ends:
        chars[start:end] = True
    return chars


# ---- built-in labelers -----------------------------------------------------------------------

_FIRST_OF_LINE = re.compile(r"^[^\S\n]*(\S)", re.MULTILINE)


def line_start(text: str, offsets: np.ndarray) -> np.ndarray:
    """The token holds the first non-whitespace character of its line (lines end at '\\n'; the
    text's start begins a line)."""
    return tokens_touching(_mark(text, [m.span(1) for m in _FIRST_OF_LINE.finditer(text)]), offsets)


_CAPS_WORD = r"[A-ZÀ-ÖØ-Þ][A-ZÀ-ÖØ-Þ'’\-]*"
_SPEAKER = re.compile(
    rf"^[^\S\n]*(?P<name>{_CAPS_WORD}(?:(?: | & | and | of ){_CAPS_WORD})*)[^\S\n]*(?:[.:]|$)", re.MULTILINE
)
NOT_SPEAKERS = frozenset({"ACT", "SCENE"})
"""First words of all-capitals lines that are headings, not speakers ('ACT III', 'SCENE II. A street.')."""


def speaker_spans(text: str) -> list[tuple[int, int]]:
    """The [start, end) character spans of the speaker names in ``text`` (see :func:`speaker`)."""
    found = []
    for m in _SPEAKER.finditer(text):
        name = m.group("name")
        if sum(c.isupper() for c in name) >= 2 and name.split(" ")[0] not in NOT_SPEAKERS:
            found.append(m.span("name"))
    return found


def speaker(text: str, offsets: np.ndarray) -> np.ndarray:
    """The token overlaps the name of a speech header: a line that starts (after optional spaces)
    with a name in capitals and ends right after it, or goes on after a '.' or ':'.

    In the built-in corpus (data/shakespeare/plays.jsonl, one scene per document) a speech
    starts with the speaker's name alone on its line: ``THESEUS\\nNow, fair Hippolyta, ...``,
    ``KING HENRY VI\\n...``, ``MARCELLUS & BERNARDO\\nWe do, my lord.``; other editions write
    ``ROMEO.`` or ``FIRST CITIZEN:`` before the speech. The rule: words of capitals (A-Z and
    accented capitals, with ' and - inside a word) separated by single spaces, or joined by
    ' & ', ' and ', ' of ' (``SECOND CITIZEN of CALAIS``); at least two capital letters (so
    'I' or 'O' alone is not a name); then the end of the line, '.' or ':'. Lines whose first
    word is ACT or SCENE are headings and do not count. Known noise in the corpus: the headings
    'PROLOGUE', 'EPILOGUE', 'SONG' and a name broken over two lines count as names; mixed-case
    speakers ('A Player') do not."""
    return tokens_touching(_mark(text, speaker_spans(text)), offsets)


def punctuation(text: str, offsets: np.ndarray) -> np.ndarray:
    """The token's non-whitespace characters are all punctuation (Unicode category P*: . , ; : ! ?
    ' " - ( ) and the like; symbols such as $ + < | are not), and there is at least one."""
    out = np.zeros(len(offsets), dtype=bool)
    for i, (start, end) in enumerate(np.asarray(offsets, dtype=np.int64).reshape(-1, 2)):
        chars = [c for c in text[start:end] if not c.isspace()]
        out[i] = bool(chars) and all(unicodedata.category(c).startswith("P") for c in chars)
    return out


_DIGIT = re.compile(r"\d")  # str patterns: any Unicode decimal digit (category Nd)


def digit(text: str, offsets: np.ndarray) -> np.ndarray:
    """The token contains a decimal digit (Unicode category Nd: 0-9 and the other scripts' digits;
    Roman numerals and superscripts are not)."""
    return tokens_touching(_mark(text, [m.span() for m in _DIGIT.finditer(text)]), offsets)


_WORD_START = re.compile(r"(?<![^\W\d_])(?<!['’])[^\W\d_]")  # a letter not preceded by a letter or apostrophe


def capitalized(text: str, offsets: np.ndarray) -> np.ndarray:
    """The token holds the first letter of a word, and that letter is uppercase. A word's first
    letter is a letter not preceded by a letter or an apostrophe (' or ’), so the C of 'McCoy' and
    the T of 'don'T' or ''Tis' do not count, while every letter of 'ROMEO' after the R is inside
    the word; digits and '_' separate words."""
    return tokens_touching(_mark(text, [m.span() for m in _WORD_START.finditer(text) if m.group().isupper()]),
                           offsets)  # fmt: skip


LABELERS: dict[str, tuple[LabelFn, str]] = {
    "line_start": (line_start, "the token holds the first non-whitespace character of its line"),
    "speaker": (speaker, "the token overlaps an all-capitals speaker name heading a speech (ROMEO, FIRST CITIZEN.)"),
    "punctuation": (punctuation, "the token's non-whitespace characters are all punctuation (at least one)"),
    "digit": (digit, "the token contains a decimal digit"),
    "capitalized": (capitalized, "the token holds the uppercase first letter of a word"),
}
"""Built-in labelers: name -> (function, one-line description)."""


# ---- resolving and applying labelers -----------------------------------------------------------


@dataclass(frozen=True)
class Labeler:
    """A labeler with the name reports use (``probe_<name>.png``) and a one-line description."""

    name: str
    fn: LabelFn
    description: str = ""

    def __call__(self, text: str, offsets: np.ndarray) -> np.ndarray:
        return self.fn(text, offsets)


SAMPLE_TEXT = "ROMEO\nBut, soft! what light through yonder window breaks?\n\nFIRST CITIZEN.\nAct 2, scene 1.\n"


def _sample_offsets(text: str) -> np.ndarray:
    """Word-like spans covering ``text`` (words, single other characters), for checking a labeler."""
    return np.array([m.span() for m in re.finditer(r"\w+|\s|.", text, re.DOTALL)], dtype=np.int64)


def check_labels(labels: Any, n: int, name: str) -> np.ndarray:
    """``labels`` as returned by a labeler, checked to be a numpy bool array of shape (n,)."""
    if not isinstance(labels, np.ndarray):
        raise LabelError(f"labeler '{name}' returned {type(labels).__name__}, not a numpy array; "
                         "return np.ndarray of dtype bool, one entry per token")  # fmt: skip
    if labels.dtype != np.bool_:
        raise LabelError(f"labeler '{name}' returned dtype {labels.dtype}, not bool; return a bool array "
                         "(e.g. `mask.astype(bool)`), one entry per token")  # fmt: skip
    if labels.shape != (n,):
        raise LabelError(f"labeler '{name}' returned shape {labels.shape} for {n} tokens; return shape ({n},), "
                         "one bool per row of offsets")  # fmt: skip
    return labels


def _tried(labeler: Labeler) -> Labeler:
    """The labeler, after a call on a sample text shows that it returns one bool per token."""
    offsets = _sample_offsets(SAMPLE_TEXT)
    try:
        labels = labeler(SAMPLE_TEXT, offsets)
    except Exception as err:
        detail = " ".join(str(err).split())[:200]
        raise LabelError(
            f"labeler '{labeler.name}' failed on a sample text with {type(err).__name__}: {detail}; "
            "a labeler is fn(text: str, offsets: np.ndarray (n, 2)) -> np.ndarray bool (n,)"
        ) from None
    check_labels(labels, len(offsets), labeler.name)
    return labeler


def _load_file(path_text: str, spec: str) -> Any:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise LabelError(f"label '{spec}': no such file {path}; give 'path/to/file.py:function' with an existing file")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_spec = importlib.util.spec_from_file_location(f"crate_lm_user_labels_{digest}", path)
    if module_spec is None or module_spec.loader is None:
        raise LabelError(f"label '{spec}': {path} cannot be imported as Python; give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        detail = " ".join(str(err).split())[:200]
        raise LabelError(f"label '{spec}': importing {path} failed with {type(err).__name__}: {detail}; "
                         "fix the file") from None  # fmt: skip
    return module


def _load_module(name: str, spec: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise LabelError(f"label '{spec}': cannot import module '{name}' ({err}); check the name, or give "
                         "'path/to/file.py:function'") from None  # fmt: skip
    except Exception as err:
        detail = " ".join(str(err).split())[:200]
        raise LabelError(f"label '{spec}': importing '{name}' failed with {type(err).__name__}: {detail}; "
                         "fix the module") from None  # fmt: skip


def resolve_labeler(spec: str | Callable | Labeler) -> Labeler:
    """A :class:`Labeler` from a built-in name (``LABELERS``), a callable, or a user's function
    ``"package.module:function"`` / ``"path/to/file.py:function"`` (imported with importlib).

    User functions are called once on a sample text to check that they return a numpy bool array
    of one entry per token; every failure is a one-line :class:`LabelError` naming the fix."""
    if isinstance(spec, Labeler):
        return spec
    if callable(spec):
        return _tried(Labeler(getattr(spec, "__name__", "custom"), spec, (spec.__doc__ or "").strip().split("\n")[0]))
    if not isinstance(spec, str) or not spec.strip():
        raise LabelError(f"a label is a built-in name ({', '.join(LABELERS)}), a callable or "
                         f"'package.module:function', got {spec!r}")  # fmt: skip
    spec = spec.strip()
    if spec in LABELERS:
        fn, description = LABELERS[spec]
        return Labeler(spec, fn, description)
    if ":" not in spec:
        close = difflib.get_close_matches(spec, list(LABELERS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise LabelError(f"unknown label '{spec}'; {hint}built-in labels: {', '.join(LABELERS)}; or give "
                         "'package.module:function' or 'path/to/file.py:function'")  # fmt: skip
    target, func = spec.rsplit(":", 1)
    if not target or not func.isidentifier():
        raise LabelError(f"label '{spec}': expected 'package.module:function' or 'path/to/file.py:function'")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _load_file(target, spec) if is_file else _load_module(target, spec)
    fn = getattr(module, func, None)
    if fn is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        shown = ", ".join(public[:10]) or "none"
        raise LabelError(f"label '{spec}': {target} has no function '{func}' (its functions: {shown})")
    if not callable(fn):
        raise LabelError(f"label '{spec}': {target}.{func} is a {type(fn).__name__}, not a function")
    return _tried(Labeler(func, fn, (fn.__doc__ or "").strip().split("\n")[0]))


def label_sequence(labeler: str | Callable | Labeler, tokenizer: Any, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """The labels (bool, one per token) of a token sequence: its text and spans (:func:`token_spans`)
    passed to ``labeler``. Special tokens (end-of-document and the like) are never positive and
    split the sequence: each stretch of ordinary tokens is decoded and labelled on its own."""
    labeler = resolve_labeler(labeler)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    labels = np.zeros(len(ids), dtype=bool)
    special = np.isin(ids, np.asarray(tokenizer.all_special_ids, dtype=np.int64))
    bounds = np.flatnonzero(np.diff(np.concatenate([[1], special.astype(np.int8), [1]])))
    for start, end in zip(bounds[::2], bounds[1::2]):  # [start, end) runs of ordinary tokens
        text, offsets = token_spans(tokenizer, ids[start:end])
        labels[start:end] = check_labels(labeler(text, offsets), end - start, labeler.name)
    return labels


__all__ = [
    "LABELERS",
    "LabelError",
    "Labeler",
    "capitalized",
    "check_labels",
    "digit",
    "label_sequence",
    "line_start",
    "punctuation",
    "resolve_labeler",
    "speaker",
    "speaker_spans",
    "token_spans",
    "tokens_touching",
]
