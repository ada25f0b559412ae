"""Tokenizers: training, special tokens, exact round trips, loading, fingerprints, errors."""

from __future__ import annotations

import json
import os

import pytest

pytest.register_assert_rewrite("tests.data_fixtures")

from crate_lm.data import (  # noqa: E402
    SPECIAL_TOKENS,
    DataError,
    SourceSpec,
    load_tokenizer,
    prepare_corpus,
    train_tokenizer,
)
from tests.data_fixtures import write_lines  # noqa: E402

pytest_plugins = ["tests.data_fixtures"]

KINDS = ("bpe", "unigram", "sp-bpe")
VOCAB = 500

ROUND_TRIP_TEXTS = [
    "Hello world.",
    "first line\nsecond line\n",
    "\n\nstarts with newlines and ends with two\n\n",
    "  two leading spaces",
    " one leading space, trailing spaces   ",
    "\ttab\tseparated\tvalues",
    "café naïve façade über é É",
    "漢字 and 東京 in the middle",
    "emoji 🎉👍🏽 and 🦀 (never seen in training)",
    "mixed:\n  indented é\n\t漢字🎉\n",
    "numbers 0123456789 and punctuation !?.,;:'\"()[]{}",
    "a",
]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tokenizer_corpus):
    """One tokenizer of each kind, trained once from a plain iterable (a generator)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(f"tok_{kind}")
        out[kind] = train_tokenizer((t for t in tokenizer_corpus), folder, kind=kind, vocab_size=VOCAB)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_trained_files_and_sizes(trained, tokenizer_corpus, kind):
    tok = trained[kind]
    expected_file = "tokenizer.json" if kind == "bpe" else "tokenizer.model"
    assert tok.path.name == expected_file
    assert tok.kind == ("huggingface" if kind == "bpe" else "sentencepiece")
    if kind == "unigram":
        assert 300 <= tok.vocab_size <= VOCAB  # sentencepiece may stop short of the target (soft limit)
    else:
        assert tok.vocab_size == VOCAB
    info = json.loads((tok.path.parent / "tokenizer_info.json").read_text())
    assert info["fingerprint"] == tok.fingerprint
    assert info["vocab_size"] == tok.vocab_size
    assert info["trained_on_documents"] == len(tokenizer_corpus)


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_exist_with_distinct_ids(trained, kind):
    tok = trained[kind]
    ids = {role: tok.special_id(role) for role in SPECIAL_TOKENS}
    assert set(ids) == {"eod", "pad", "mask", "cls", "sep"}
    assert len(set(ids.values())) == 5
    assert all(0 <= i < tok.vocab_size for i in ids.values())
    assert tok.eod_id == ids["eod"]
    assert tok.all_special_ids == sorted(ids.values())
    for role, i in ids.items():
        assert tok.decode([i]) == SPECIAL_TOKENS[role]
    # reserved at the lowest ids (sentencepiece keeps id 0 for <unk>)
    first = 0 if kind == "bpe" else 1
    assert sorted(ids.values()) == list(range(first, first + 5))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_encode_is_exact(trained, kind, text):
    tok = trained[kind]
    ids = tok.encode(text)
    assert ids, "non-empty text encodes to at least one token"
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
def test_encode_batch_matches_encode(trained, kind):
    tok = trained[kind]
    assert tok.encode_batch(ROUND_TRIP_TEXTS) == [tok.encode(t) for t in ROUND_TRIP_TEXTS]
    assert tok.decode(tok.encode_batch(["x y z"])[0]) == "x y z"


@pytest.mark.parametrize("kind", KINDS)
def test_trained_tokenizer_compresses(trained, tokenizer_corpus, kind):
    """The merges were learned: corpus text takes clearly fewer tokens than bytes."""
    tok = trained[kind]
    text = tokenizer_corpus[0]
    assert len(tok.encode(text)) < 0.6 * len(text.encode("utf-8"))


@pytest.mark.parametrize("kind", KINDS)
def test_load_from_directory_and_file(trained, kind):
    tok = trained[kind]
    from_dir = load_tokenizer(tok.path.parent)
    from_file = load_tokenizer(tok.path)
    from_str = load_tokenizer(str(tok.path))
    for loaded in (from_dir, from_file, from_str):
        assert loaded.path == tok.path
        assert loaded.fingerprint == tok.fingerprint
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.specials == tok.specials
        assert loaded.encode(ROUND_TRIP_TEXTS[-3]) == tok.encode(ROUND_TRIP_TEXTS[-3])


def test_load_directory_with_only_a_named_model(trained, tmp_path):
    """A folder holding some ``*.model`` (not tokenizer.model) is found too."""
    data = trained["unigram"].path.read_bytes()
    (tmp_path / "spm_32k.model").write_bytes(data)
    tok = load_tokenizer(tmp_path)
    assert tok.path == tmp_path / "spm_32k.model"
    assert tok.fingerprint == trained["unigram"].fingerprint


def test_fingerprint_stable_across_loads_and_distinct_between_tokenizers(trained, other_tokenizer):
    for kind in KINDS:
        fp = trained[kind].fingerprint
        assert len(fp) == 16
        assert load_tokenizer(trained[kind].path).fingerprint == fp
        assert load_tokenizer(trained[kind].path.parent).fingerprint == fp
    fingerprints = [trained[k].fingerprint for k in KINDS] + [other_tokenizer.fingerprint]
    assert len(set(fingerprints)) == len(fingerprints)


def test_load_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(DataError) as info:
        load_tokenizer(missing)
    msg = str(info.value)
    assert str(missing) in msg
    assert "not found" in msg
    assert "train_tokenizer" in msg  # the hint


def test_load_empty_directory(tmp_path):
    with pytest.raises(DataError) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "no tokenizer.json or .model" in str(info.value)


def test_load_txt_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("hello\nworld\n")
    with pytest.raises(DataError) as info:
        load_tokenizer(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "tokenizer.json" in msg and ".model" in msg


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("tokenizer.json", b"{not json", "not a valid tokenizers file"),
    ("tokenizer.model", b"garbage\x00\x01", "not a valid sentencepiece model"),
])  # fmt: skip
def test_load_corrupt_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_tokenizer_without_eod_is_refused_by_prepare(tmp_path, tokenizer_corpus):
    """A plain BPE (built with ``tokenizers`` directly, no special tokens) loads, but preparing data
    with it fails early, before writing anything, naming the missing end-of-document token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        tokenizer_corpus,
        trainers.BpeTrainer(vocab_size=350, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    path = tmp_path / "plain" / "tokenizer.json"
    path.parent.mkdir()
    hf.save(str(path))

    tok = load_tokenizer(path)
    assert tok.specials["eod"] is None
    assert tok.decode(tok.encode("plain text é")) == "plain text é"
    with pytest.raises(DataError, match="no eod token"):
        tok.eod_id  # noqa: B018

    inputs = write_lines(tmp_path / "in.txt", tokenizer_corpus[:5])
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare_corpus(SourceSpec(inputs=[str(inputs)], text_unit="line"), path, out, show_progress=False)
    msg = str(info.value)
    assert "eod" in msg or "end-of-document" in msg
    assert "<|endoftext|>" in msg
    assert str(path) in msg
    assert not out.exists()


def test_unknown_kind(tmp_path):
    with pytest.raises(DataError) as info:
        train_tokenizer(["some text"], tmp_path, kind="wordpiece", vocab_size=400)
    msg = str(info.value)
    assert "wordpiece" in msg
    assert "bpe" in msg and "unigram" in msg and "sp-bpe" in msg
    assert list(tmp_path.iterdir()) == []


def test_vocab_too_small(tmp_path):
    with pytest.raises(DataError, match="vocab_size 100 is too small"):
        train_tokenizer(["some text"], tmp_path, kind="bpe", vocab_size=100)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_corpus(tmp_path, kind):
    with pytest.raises(DataError, match="corpus is empty"):
        train_tokenizer(iter([]), tmp_path, kind=kind, vocab_size=400)
    assert not (tmp_path / "tokenizer.json").exists()
    assert not (tmp_path / "tokenizer.model").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_corpus_of_blank_documents_is_empty(tmp_path, kind):
    """Documents that hold no text are no corpus either: the same clear error as no documents."""
    with pytest.raises(DataError, match="corpus is empty"):
        train_tokenizer(["", "   ", "\n\n"], tmp_path, kind=kind, vocab_size=400)
    assert not (tmp_path / "tokenizer.json").exists()
    assert not (tmp_path / "tokenizer.model").exists()
