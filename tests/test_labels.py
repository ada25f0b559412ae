"""Token labels for probing (``crate_lm.interp.labels``).

Every built-in labeler is checked on handmade text whose tokens (and so offsets) are written out
by hand, against labels written out by hand. ``token_spans`` is checked with a real byte-level
BPE tokenizer on ASCII and non-ASCII text (the spans slice the text back into the tokens'
pieces); ``resolve_labeler`` with a 'module:function', a 'file.py:function' and its errors."""

from __future__ import annotations

import numpy as np
import pytest

from crate_lm.data import train_tokenizer
from crate_lm.errors import CrateLMError
from crate_lm.interp.labels import (
    LABELERS,
    Labeler,
    LabelError,
    capitalized,
    digit,
    label_sequence,
    line_start,
    punctuation,
    resolve_labeler,
    speaker,
    token_spans,
)
from tests.data_fixtures import make_documents


def pieces_to_offsets(pieces: list[str]) -> tuple[str, np.ndarray]:
    """The text the pieces make and each piece's [start, end) span (empty pieces: empty spans)."""
    ends = np.cumsum([len(p) for p in pieces])
    return "".join(pieces), np.stack([ends - [len(p) for p in pieces], ends], axis=1)


def positives(fn, pieces: list[str]) -> list[str]:
    text, offsets = pieces_to_offsets(pieces)
    labels = fn(text, offsets)
    assert labels.dtype == np.bool_ and labels.shape == (len(pieces),)
    return [p for p, positive in zip(pieces, labels) if positive]


# ---- built-in labelers on handmade tokens -------------------------------------------------------------


def test_line_start() -> None:
    pieces = ["  ", "Hello", " world", "\n", "foo", "\n", "\n", "\t", "bar", " baz", "\n  x", "y", "\n", " ", "", "z"]
    assert positives(line_start, pieces) == ["Hello", "foo", "bar", "\n  x", "z"]
    text, offsets = pieces_to_offsets(["a", "b"])
    assert line_start(text, offsets).tolist() == [True, False]  # the text's start begins a line


def test_speaker_follows_the_corpus_headers() -> None:
    pieces = [
        "THE", "SEUS", "\n", "Now", ",", " fair", " Hip", "polyta", "\n\n",
        "FIRST", " CITIZEN", ".", "\n", "We", " are", " poor", ".", "\n",
        "KING", " HENRY", ":", " Go", ".", "\n",
        "MARC", "ELLUS", " &", " BERN", "ARDO", "\n",
        "I", "\n",
        "O", " ROMEO", ",", " ROMEO", "\n",
        "ACT", " III", "\n",
        "SCENE", " II", ".", " A", " street", ".", "\n",
        "Enter", " ROMEO", "\n",
        "  ", "NURSE", "\n",
        "SECOND", " CITIZEN", " of", " CAL", "AIS", "\n",
        "R", "\n",
    ]  # fmt: skip
    assert positives(speaker, pieces) == [
        "THE", "SEUS", "FIRST", " CITIZEN", "KING", " HENRY", "MARC", "ELLUS", " &", " BERN", "ARDO",
        "NURSE", "SECOND", " CITIZEN", " of", " CAL", "AIS",
    ]  # fmt: skip


def test_punctuation() -> None:
    pieces = ["Hello", ",", " world", "!?", " --", " ", "'s", "$", "...\n", "<|", "42", "—", "«", ""]
    assert positives(punctuation, pieces) == [",", "!?", " --", "...\n", "—", "«"]


def test_digit() -> None:
    pieces = ["Act", " 2", ",", " scene", " 10", "b", "4", "Ⅳ", "٣", "²", "x"]
    assert positives(digit, pieces) == [" 2", " 10", "4", "٣"]  # Roman numeral Ⅳ and superscript ² are not Nd


def test_capitalized() -> None:
    pieces = [
        "The",
        " quick",
        " Brown",
        " Mc",
        "Coy",
        " don",
        "'T",
        " 'Tis",
        " ROMEO",
        " É",
        " x",
        "Y",
        " _Z",
        " 3D",
        " o",
    ]
    assert positives(capitalized, pieces) == ["The", " Brown", " Mc", " ROMEO", " É", " _Z", " 3D"]


def test_registry_describes_every_builtin() -> None:
    assert set(LABELERS) == {"line_start", "speaker", "punctuation", "digit", "capitalized"}
    for name, (fn, description) in LABELERS.items():
        assert callable(fn) and description and "\n" not in description
        assert fn.__doc__ and resolve_labeler(name).fn is fn and resolve_labeler(name).name == name


# ---- token_spans with a real tokenizer ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE of 300 tokens: few merges, so multi-byte characters span several tokens."""
    return train_tokenizer(iter(make_documents(200, seed=5)), tmp_path_factory.mktemp("tok"), vocab_size=300)


def check_spans(tokenizer, ids: list[int]) -> tuple[str, list[str]]:
    text, offsets = token_spans(tokenizer, ids)
    assert text == tokenizer.decode(ids) and offsets.shape == (len(ids), 2) and offsets.dtype == np.int64
    assert offsets[0, 0] == 0 and offsets[-1, 1] == len(text)
    assert (offsets[1:, 0] == offsets[:-1, 1]).all() and (offsets[:, 1] >= offsets[:, 0]).all()  # contiguous
    return text, [text[a:b] for a, b in offsets]


def test_token_spans_ascii_slices_the_text_into_the_tokens(tokenizer) -> None:
    source = "ROMEO\nBut, soft! what light (through) yonder window breaks? 42 times.\n"
    ids = tokenizer.encode(source)
    text, slices = check_spans(tokenizer, ids)
    assert text == source and slices == [tokenizer.decode([i]) for i in ids]


def test_token_spans_non_ascii_gives_each_character_to_the_token_completing_it(tokenizer) -> None:
    source = "Café naïve — 漢字 🎉 über x ⚘ y.\n"
    ids = tokenizer.encode(source)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the case under test: split characters
    text, slices = check_spans(tokenizer, ids)
    assert text == source and "".join(slices) == source
    assert all("\ufffd" not in s for s in slices)
    assert "🎉" in slices and "漢" in slices and "" in slices
    flower = slices.index("⚘")  # three bytes the tokenizer never saw: three tokens, the last owns the character
    assert [tokenizer.decode([i]) for i in ids[flower - 2 : flower + 1]] == ["\ufffd"] * 3
    assert slices[flower - 2 : flower] == ["", ""]
    # labels land on the right tokens: the capital of 'Café' and the digitless emoji
    labels = label_sequence("capitalized", tokenizer, ids)
    assert [s for s, lab in zip(slices, labels) if lab] == [slices[0]] and slices[0].startswith("C")


def test_token_spans_of_a_sequence_cut_inside_a_character(tokenizer) -> None:
    ids = tokenizer.encode("ab 🎉")[:-1]  # the emoji's last byte cut off
    text, slices = check_spans(tokenizer, ids)
    assert text.startswith("ab ") and "".join(slices) == text


def test_label_sequence_labels_each_document_on_its_own(tokenizer) -> None:
    eod = tokenizer.eod_id
    first, second = tokenizer.encode("ROMEO\nHi there."), tokenizer.encode("JULIET\nYo.")
    ids = np.array(first + [eod] + second)
    speakers = label_sequence("speaker", tokenizer, ids)
    starts = label_sequence("line_start", tokenizer, ids)
    text, offsets = token_spans(tokenizer, ids)
    assert "".join(text[a:b] for (a, b), s in zip(offsets, speakers) if s) == "ROMEOJULIET"
    assert not speakers[len(first)] and not starts[len(first)]  # the end-of-document token
    assert starts[0] and starts[len(first) + 1]  # each document's first token starts a line
    assert starts.sum() == 4  # ROMEO, Hi, JULIET, Yo


# ---- resolving user labelers ------------------------------------------------------------------------


USER_CODE = '''
import numpy as np


def has_e(text, offsets):
    """Tokens holding the letter e."""
    return np.array(["e" in text[a:b] for a, b in offsets], dtype=bool)


def as_ints(text, offsets):
    return np.zeros(len(offsets), dtype=np.int64)


def too_short(text, offsets):
    return np.zeros(len(offsets) - 1, dtype=bool)


def as_list(text, offsets):
    return [False] * len(offsets)


def broken(text, offsets):
    raise RuntimeError("no\\nway")


VALUE = 3
'''


def test_resolve_module_and_file_functions(tmp_path, monkeypatch, tokenizer) -> None:
    (tmp_path / "user_labels_mod.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from_module = resolve_labeler("user_labels_mod:has_e")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.py").write_text(USER_CODE)
    from_file = resolve_labeler(f"{tmp_path / 'sub' / 'mine.py'}:has_e")
    for labeler in (from_module, from_file):
        assert labeler.name == "has_e" and labeler.description == "Tokens holding the letter e."
        ids = tokenizer.encode("see the tree")
        text, offsets = token_spans(tokenizer, ids)
        expected = ["e" in text[a:b] for a, b in offsets]
        assert label_sequence(labeler, tokenizer, ids).tolist() == expected and any(expected)
    assert resolve_labeler(lambda text, offsets: np.ones(len(offsets), bool)).name == "<lambda>"


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("line_starts", ["unknown label 'line_starts'", "did you mean 'line_start'", "speaker", "capitalized"]),
        ("", ["a label is a built-in name"]),
        ("no_such_module_xyz:fn", ["cannot import module 'no_such_module_xyz'"]),
        ("{tmp}/missing.py:fn", ["no such file", "missing.py"]),
        ("{tmp}/user.py:nothing", ["has no function 'nothing'", "has_e"]),
        ("{tmp}/user.py:VALUE", ["is a int, not a function"]),
        ("{tmp}/user.py:as_ints", ["dtype int64, not bool"]),
        ("{tmp}/user.py:too_short", ["shape", "one bool per row"]),
        ("{tmp}/user.py:as_list", ["returned list, not a numpy array"]),
        ("{tmp}/user.py:broken", ["failed on a sample text with RuntimeError: no way"]),
        ("{tmp}/bad.py:fn", ["importing", "SyntaxError"]),
    ],
)
def test_resolve_errors_are_one_line(tmp_path, spec: str, needles: list[str]) -> None:
    (tmp_path / "user.py").write_text(USER_CODE)
    (tmp_path / "bad.py").write_text("def fn(:\n")
    with pytest.raises(LabelError) as caught:
        resolve_labeler(spec.format(tmp=tmp_path))
    message = str(caught.value)
    assert isinstance(caught.value, CrateLMError) and "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_label_sequence_checks_what_the_labeler_returns(tokenizer) -> None:
    """A Labeler is trusted without the sample-text check, so its result is checked on every sequence."""
    short = Labeler("short", lambda text, offsets: np.zeros(1, dtype=bool))
    with pytest.raises(LabelError, match=r"labeler 'short' returned shape \(1,\) for \d+ tokens"):
        label_sequence(short, tokenizer, tokenizer.encode("a longer text"))
