"""Corpus -> token shards: exact round trips, deterministic splits, multi-node parts, re-runs,
interrupted runs, and the error messages for bad input and damaged shards."""

from __future__ import annotations

import collections
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.register_assert_rewrite("tests.data_fixtures")

from crate_lm.data import DataError, SourceSpec, TokenShards, prepare_corpus, read_meta  # noqa: E402
from tests.data_fixtures import (  # noqa: E402
    all_documents,
    check_meta,
    decoded_documents,
    file_bytes,
    make_documents,
    snapshot,
    write_lines,
)

pytest_plugins = ["tests.data_fixtures"]


def prepare(inputs, tokenizer, out, *, spec: dict | None = None, **kwargs):
    kwargs.setdefault("show_progress", False)
    source = SourceSpec(inputs=[str(i) for i in inputs], **(spec or {}))
    return prepare_corpus(source, tokenizer.path if hasattr(tokenizer, "path") else tokenizer, out, **kwargs)


def write_jsonl(path: Path, records: list, *, ensure_ascii: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records), encoding="utf-8")
    return path


def assert_round_trip(out: Path, meta: dict, tokenizer, expected: list[str]) -> dict:
    assert meta is not None
    assert read_meta(out) == meta
    check_meta(meta, out, tokenizer)
    per_split = decoded_documents(out, tokenizer)
    assert per_split["train"] + per_split["validation"] == collections.Counter(expected)
    return per_split


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


# ---------------------------------------------------------------------------------------------
# Round trips: text -> shards -> the same text
# ---------------------------------------------------------------------------------------------


def test_round_trip_txt_file_unit_from_folder(tmp_path, bpe_tokenizer):
    files = {
        "a.txt": "Line one.\nLine two with é.\n",
        "b.txt": "  leading spaces\n\nblank line above\n\n\ntwo blank lines, no final newline",
        "sub/deeper/c.md": "漢字 🎉 emoji\tand a tab\n",
        "e.text": "x",
        "blank.txt": "\n\n   \n",  # no text: not a document
    }
    for k, doc in enumerate(make_documents(40, seed=3)):
        files[f"gen/{k:02d}.txt"] = doc.replace(", ", ",\n") + "\n"
    for name, text in files.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(text, encoding="utf-8")
    (tmp_path / "in" / "notes.csv").write_text("not,a,document\n")  # unsupported type: skipped in a folder
    out = tmp_path / "out"
    meta = prepare([tmp_path / "in"], bpe_tokenizer, out, val_fraction=0.3)
    expected = [t for t in files.values() if t.strip()]
    per_split = assert_round_trip(out, meta, bpe_tokenizer, expected)
    assert sum(per_split["validation"].values()) > 0 and sum(per_split["train"].values()) > 0
    assert meta["splits"]["train"]["documents"] + meta["splits"]["validation"]["documents"] == len(expected)
    assert [s["file"] for s in meta["sources"]] == sorted(str(tmp_path / "in" / n) for n in files)


def test_round_trip_txt_line_unit(tmp_path, bpe_tokenizer):
    docs = make_documents(120, seed=4)
    lines = docs[:60] + ["", "   ", "  indented line é", "\t", docs[0], "漢字🎉 line"] + docs[60:]
    path = write_lines(tmp_path / "lines.txt", lines)
    out = tmp_path / "out"
    meta = prepare([path], bpe_tokenizer, out, spec={"text_unit": "line"}, val_fraction=0.2)
    expected = [line for line in lines if line.strip()]
    assert_round_trip(out, meta, bpe_tokenizer, expected)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["validation"]["documents"] == len(expected)


def test_round_trip_txt_paragraph_unit(tmp_path, bpe_tokenizer):
    docs = make_documents(90, seed=5)
    paragraphs = [docs[i] + "\n" + docs[i + 1] for i in range(0, 60, 2)] + docs[60:]
    paragraphs += ["  indented first line\nsecond line é", "漢字\n🎉\n  end"]
    separators = ["\n\n", "\n\n\n", "\n   \n", "\n\t\n\n"]
    text = "\n\n" + "".join(p + separators[i % len(separators)] for i, p in enumerate(paragraphs))
    path = tmp_path / "paragraphs.txt"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    meta = prepare([path], bpe_tokenizer, out, spec={"text_unit": "paragraph"}, val_fraction=0.2)
    assert_round_trip(out, meta, bpe_tokenizer, paragraphs)


def test_round_trip_paragraph_without_final_newline(tmp_path, bpe_tokenizer):
    path = tmp_path / "p.txt"
    path.write_text("first para\nstill first\n\nsecond para", encoding="utf-8")
    out = tmp_path / "out"
    meta = prepare([path], bpe_tokenizer, out, spec={"text_unit": "paragraph"}, val_fraction=0.0)
    assert_round_trip(out, meta, bpe_tokenizer, ["first para\nstill first", "second para"])
    assert meta["splits"]["validation"] == {"tokens": 0, "documents": 0, "shards": []}


def test_round_trip_jsonl_custom_text_field(tmp_path, bpe_tokenizer):
    docs = make_documents(80, seed=6)
    docs[3] = "multi-line body\nwith é and 漢字 🎉\n"
    records = [{"id": i, "body": d, "text": "not this field", "meta": {"n": i}} for i, d in enumerate(docs)]
    records[10:10] = [{"id": -1, "body": ""}, {"id": -2, "body": "   \n"}]  # no text: skipped
    a = write_jsonl(tmp_path / "in" / "a.jsonl", records[:40])
    b = write_jsonl(tmp_path / "in" / "b.ndjson", records[40:], ensure_ascii=True)
    with open(a, "a") as f:
        f.write("\n   \n")  # blank lines: skipped
    out = tmp_path / "out"
    meta = prepare([a, b], bpe_tokenizer, out, spec={"text_field": "body"}, val_fraction=0.2)
    assert_round_trip(out, meta, bpe_tokenizer, docs)
    assert meta["settings"]["text_field"] == "body"


def test_round_trip_parquet(tmp_path, bpe_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_documents(70, seed=7) + ["é 漢字 🎉\nsecond line", "  leading"]
    texts = docs[:35] + [None, "", "  "] + docs[35:]
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=9)  # several row groups
    out = tmp_path / "out"
    meta = prepare([path], bpe_tokenizer, out, val_fraction=0.2)
    assert_round_trip(out, meta, bpe_tokenizer, docs)


def test_round_trip_glob_and_deduplicated_inputs(tmp_path, bpe_tokenizer):
    docs = make_documents(60, seed=8)
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": d} for d in docs[:20]])
    write_jsonl(tmp_path / "in" / "sub" / "b.jsonl", [{"text": d} for d in docs[20:40]])
    write_lines(tmp_path / "in" / "c.txt", docs[40:])
    out = tmp_path / "out"
    meta = prepare([f"{tmp_path}/in/**/*.jsonl"], bpe_tokenizer, out, val_fraction=0.2)
    assert_round_trip(out, meta, bpe_tokenizer, docs[:40])
    assert [s["file"] for s in meta["sources"]] == [str(tmp_path / "in" / "a.jsonl"), str(tmp_path / "in/sub/b.jsonl")]

    # a folder plus a file inside it plus a glob matching it: each file is read once
    out2 = tmp_path / "out2"
    inputs = [tmp_path / "in", tmp_path / "in" / "a.jsonl", f"{tmp_path}/in/*.txt"]
    meta2 = prepare(inputs, bpe_tokenizer, out2, spec={"text_unit": "line"}, val_fraction=0.2)
    assert_round_trip(out2, meta2, bpe_tokenizer, docs)
    assert len(meta2["sources"]) == 3


def test_prepared_fixture_round_trip(prepared):
    """The shared dataset: several shards per split, and still the exact input documents."""
    per_split = assert_round_trip(prepared.root, prepared.meta, prepared.tokenizer, prepared.docs)
    n_val = sum(per_split["validation"].values())
    assert 0.1 * len(prepared.docs) < n_val < 0.3 * len(prepared.docs)
    for split in ("train", "validation"):
        files = [s["file"] for s in prepared.meta["splits"][split]["shards"]]
        assert files == [f"part-00000-of-00001/{split}-{k:05d}.bin" for k in range(len(files))]


@pytest.mark.parametrize("chunk_bytes", [1, 97, 5000])
@pytest.mark.parametrize("num_proc", [1, 2])
def test_files_read_in_pieces_round_trip(tmp_path, bpe_tokenizer, chunk_bytes, num_proc):
    """Line-based files are cut into byte ranges read by separate workers: every line is read
    exactly once whatever the piece size (1 byte: a piece per line), with or without a final newline."""
    docs = make_documents(200, seed=12)
    lines = write_lines(tmp_path / "in" / "lines.txt", docs[:100] + ["", "  spaced é 漢字"])
    records = [{"text": d} for d in docs[100:]]
    jsonl = tmp_path / "in" / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")  # no final \n
    out = tmp_path / "out"
    meta = prepare(
        [lines, jsonl], bpe_tokenizer, out, spec={"text_unit": "line"}, num_proc=num_proc, chunk_bytes=chunk_bytes
    )
    assert_round_trip(out, meta, bpe_tokenizer, docs + ["  spaced é 漢字"])


# ---------------------------------------------------------------------------------------------
# Deterministic split, parallel tokenisation
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def four_files(tmp_path):
    docs = make_documents(300, seed=9)
    files = [write_lines(tmp_path / "in" / f"f{k}.txt", docs[k::4]) for k in range(4)]
    return files, docs


def test_split_is_the_same_for_any_num_proc_and_num_workers(tmp_path, bpe_tokenizer, four_files):
    files, docs = four_files
    common = {"spec": {"text_unit": "line"}, "val_fraction": 0.25, "chunk_bytes": 400, "shard_tokens": 1000}
    reference = prepare(files, bpe_tokenizer, tmp_path / "a", num_proc=1, **common)
    ref_splits = assert_round_trip(tmp_path / "a", reference, bpe_tokenizer, docs)
    assert 30 < sum(ref_splits["validation"].values()) < 120

    prepare(files, bpe_tokenizer, tmp_path / "b", num_proc=2, **common)
    assert prepare(files, bpe_tokenizer, tmp_path / "c", worker=0, num_workers=2, num_proc=1, **common) is None
    prepare(files, bpe_tokenizer, tmp_path / "c", worker=1, num_workers=2, num_proc=2, **common)
    for w in (2, 0, 1):  # any order of workers
        meta = prepare(files, bpe_tokenizer, tmp_path / "d", worker=w, num_workers=3, **common)
    assert meta is not None
    for name in "bcd":
        assert decoded_documents(tmp_path / name, bpe_tokenizer) == ref_splits, name


def test_num_proc_gives_byte_identical_output(tmp_path, bpe_tokenizer, four_files):
    files, _ = four_files
    common = {"spec": {"text_unit": "line"}, "val_fraction": 0.25, "chunk_bytes": 300, "shard_tokens": 800}
    prepare(files, bpe_tokenizer, tmp_path / "one", num_proc=1, **common)
    prepare(files, bpe_tokenizer, tmp_path / "two", num_proc=2, **common)
    one, two = file_bytes(tmp_path / "one"), file_bytes(tmp_path / "two")
    assert sorted(one) == sorted(two)
    assert len([f for f in one if f.endswith(".bin")]) >= 4
    for name in one:
        assert one[name] == two[name], name


# ---------------------------------------------------------------------------------------------
# Multi-node parts, re-runs
# ---------------------------------------------------------------------------------------------


def test_two_workers_write_meta_only_when_both_parts_exist(tmp_path, bpe_tokenizer):
    docs = make_documents(150, seed=10)
    files = [write_lines(tmp_path / "in" / f"f{k}.txt", docs[k::5]) for k in range(5)]
    out = tmp_path / "out"
    common = {"spec": {"text_unit": "line"}, "val_fraction": 0.2, "num_workers": 2}

    assert prepare(files, bpe_tokenizer, out, worker=0, **common) is None
    assert not (out / "meta.json").exists()
    assert (out / "part-00000-of-00002" / "part.json").is_file()
    assert not (out / "part-00001-of-00002").exists()
    with pytest.raises(DataError, match="meta.json is missing"):
        TokenShards(out)

    meta = prepare(files, bpe_tokenizer, out, worker=1, **common)
    assert meta is not None and (out / "meta.json").is_file()
    assert_round_trip(out, meta, bpe_tokenizer, docs)
    parts = {s["file"].split("/")[0] for s in meta["splits"]["train"]["shards"]}
    assert parts == {"part-00000-of-00002", "part-00001-of-00002"}
    for w in (0, 1):
        manifest = json.loads((out / f"part-0000{w}-of-00002" / "part.json").read_text())
        assert manifest["files"] == [str(f) for f in files[w::2]]
    assert sorted(leftovers(out)) == ["meta.json", "part-00000-of-00002", "part-00001-of-00002"]


def test_rerun_over_finished_output_is_a_no_op(tmp_path, bpe_tokenizer, four_files):
    files, docs = four_files
    common = {"spec": {"text_unit": "line"}, "val_fraction": 0.2, "num_workers": 2}
    out = tmp_path / "out"
    prepare(files, bpe_tokenizer, out, worker=0, **common)
    meta = prepare(files, bpe_tokenizer, out, worker=1, **common)
    before = snapshot(out)
    for worker, num_proc in ((0, 1), (1, 1), (1, 2)):
        again = prepare(files, bpe_tokenizer, out, worker=worker, num_proc=num_proc, **common)
        assert again == meta
        assert snapshot(out) == before
    assert_round_trip(out, meta, bpe_tokenizer, docs)


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"val_fraction": 0.3}, "val_fraction"),
        ({"tokenizer": "other"}, "tokenizer"),
        ({"shard_tokens": 12345}, "shard_tokens"),
        ({"spec": {"text_unit": "paragraph"}}, "text_unit"),
        ({"extra_file": True}, "sources"),
    ],
)
def test_rerun_with_other_settings_is_refused(tmp_path, bpe_tokenizer, other_tokenizer, four_files, change, setting):
    files, _ = four_files
    out = tmp_path / "out"
    prepare(files, bpe_tokenizer, out, spec={"text_unit": "line"}, val_fraction=0.2)
    before = snapshot(out)
    kwargs = {"spec": {"text_unit": "line"}, "val_fraction": 0.2}
    tokenizer, inputs = bpe_tokenizer, list(files)
    for key, value in change.items():
        if key == "tokenizer":
            tokenizer = other_tokenizer
        elif key == "extra_file":
            inputs.append(write_lines(tmp_path / "in" / "extra.txt", ["one more document"]))
        else:
            kwargs[key] = value
    with pytest.raises(DataError) as info:
        prepare(inputs, tokenizer, out, **kwargs)
    msg = str(info.value)
    assert f"(differs in: {setting})" in msg
    assert str(out) in msg
    assert "new --out folder" in msg
    assert snapshot(out) == before


def test_rerun_of_a_finished_part_with_other_settings_names_the_setting(tmp_path, bpe_tokenizer, four_files):
    """Worker 0 of 2 finished; running worker 0 again with another val_fraction is refused, the
    message names the setting that differs (as it does once meta.json exists), nothing changes."""
    files, _ = four_files
    out = tmp_path / "out"
    common = {"spec": {"text_unit": "line"}, "worker": 0, "num_workers": 2}
    assert prepare(files, bpe_tokenizer, out, val_fraction=0.2, **common) is None
    before = snapshot(out)
    with pytest.raises(DataError) as info:
        prepare(files, bpe_tokenizer, out, val_fraction=0.3, **common)
    assert "part-00000-of-00002" in str(info.value)
    assert "val_fraction" in str(info.value)
    assert snapshot(out) == before


def test_parts_prepared_with_different_settings_are_never_merged(tmp_path, bpe_tokenizer, four_files):
    """Two nodes launched with different val_fraction: no meta.json may claim one setting for both."""
    files, _ = four_files
    out = tmp_path / "out"
    common = {"spec": {"text_unit": "line"}, "num_workers": 2}
    assert prepare(files, bpe_tokenizer, out, worker=0, val_fraction=0.2, **common) is None
    with pytest.raises(DataError, match="val_fraction"):
        prepare(files, bpe_tokenizer, out, worker=1, val_fraction=0.3, **common)
    assert not (out / "meta.json").exists()


def test_parts_with_different_tokenizers_are_never_merged(tmp_path, bpe_tokenizer, other_tokenizer, four_files):
    files, _ = four_files
    out = tmp_path / "out"
    common = {"spec": {"text_unit": "line"}, "num_workers": 2, "val_fraction": 0.2}
    assert prepare(files, bpe_tokenizer, out, worker=0, **common) is None
    with pytest.raises(DataError, match=r"differs in: tokenizer"):
        prepare(files, other_tokenizer, out, worker=1, **common)
    assert not (out / "meta.json").exists()


# ---------------------------------------------------------------------------------------------
# Interrupted and failed runs
# ---------------------------------------------------------------------------------------------


def test_leftover_temp_folder_of_an_interrupted_run_is_discarded(tmp_path, bpe_tokenizer, four_files):
    files, docs = four_files
    out = tmp_path / "out"
    tmp = out / ".part-00000-of-00001.tmp"
    tmp.mkdir(parents=True)
    (tmp / "train-00000.bin").write_bytes(np.arange(1000, dtype=np.uint16).tobytes())
    (tmp / "junk.txt").write_text("junk")
    (tmp / "part.json").write_text("{}")
    meta = prepare(files, bpe_tokenizer, out, spec={"text_unit": "line"}, val_fraction=0.2)
    assert not tmp.exists()
    assert leftovers(out) == ["meta.json", "part-00000-of-00001"]
    assert not any(p.name == "junk.txt" for p in out.rglob("*"))
    assert_round_trip(out, meta, bpe_tokenizer, docs)


def _part_without_manifest(out: Path) -> Path:
    """A part folder that holds a shard but no part.json (an incomplete copy from another node)."""
    part = out / "part-00001-of-00002"
    part.mkdir(parents=True)
    (part / "train-00000.bin").write_bytes(np.full(500, 7, dtype=np.uint16).tobytes())
    np.save(part / "train-00000.idx.npy", np.array([0, 500], dtype=np.int64))
    return part


def test_a_part_without_manifest_is_never_read(tmp_path, bpe_tokenizer, four_files):
    files, _ = four_files
    out = tmp_path / "out"
    common = {"spec": {"text_unit": "line"}, "num_workers": 2, "val_fraction": 0.2}
    assert prepare(files, bpe_tokenizer, out, worker=0, **common) is None
    _part_without_manifest(out)
    assert prepare(files, bpe_tokenizer, out, worker=0, **common) is None  # part 0 done, part 1 is not
    assert not (out / "meta.json").exists()
    with pytest.raises(DataError, match="meta.json is missing"):
        TokenShards(out)


def test_preparing_over_a_part_without_manifest_replaces_it(tmp_path, bpe_tokenizer, four_files):
    files, docs = four_files
    out = tmp_path / "out"
    common = {"spec": {"text_unit": "line"}, "num_workers": 2, "val_fraction": 0.2}
    assert prepare(files, bpe_tokenizer, out, worker=0, **common) is None
    part = _part_without_manifest(out)
    meta = prepare(files, bpe_tokenizer, out, worker=1, **common)
    assert (part / "part.json").is_file()
    assert leftovers(out) == ["meta.json", "part-00000-of-00002", "part-00001-of-00002"]
    assert_round_trip(out, meta, bpe_tokenizer, docs)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_failure_mid_preparation_leaves_nothing(tmp_path, bpe_tokenizer, num_proc):
    docs = make_documents(60, seed=11)
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": d} for d in docs[:25]])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": d} for d in docs[25:50]])
    bad = write_jsonl(
        tmp_path / "in" / "c.jsonl",
        [{"text": docs[50]}, {"text": docs[51]}, {"title": "no text here"}] + [{"text": d} for d in docs[52:]],
    )
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        # small chunks and shards: shards of a.jsonl and b.jsonl are written before c.jsonl fails
        prepare([tmp_path / "in"], bpe_tokenizer, out, num_proc=num_proc, chunk_bytes=200, shard_tokens=100)
    msg = str(info.value)
    assert f"{bad}:3" in msg
    assert "no 'text' field (found: title)" in msg
    assert "--text_field" in msg
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# Bad input: a DataError naming the file and the fix
# ---------------------------------------------------------------------------------------------


def test_missing_input_file(tmp_path, bpe_tokenizer):
    missing = tmp_path / "missing.txt"
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare([missing], bpe_tokenizer, out)
    assert str(missing) in str(info.value)
    assert "input not found" in str(info.value) and "check the path" in str(info.value)
    assert not out.exists()


def test_glob_without_matches(tmp_path, bpe_tokenizer):
    pattern = f"{tmp_path}/*.jsonl"
    with pytest.raises(DataError) as info:
        prepare([pattern], bpe_tokenizer, tmp_path / "out")
    assert f"no file matches {pattern}" in str(info.value)


def test_unsupported_file_type(tmp_path, bpe_tokenizer):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError) as info:
        prepare([path], bpe_tokenizer, tmp_path / "out")
    assert str(path) in str(info.value)
    assert "unsupported file type '.csv'" in str(info.value)


def _blank_inputs(tmp_path: Path) -> list[Path]:
    return [
        write_lines(tmp_path / "in" / "blank.txt", ["", "   ", "\t"]),
        write_jsonl(tmp_path / "in" / "blank.jsonl", [{"text": ""}, {"text": "  \n "}]),
    ]


def test_empty_corpus_is_refused_and_leaves_nothing(tmp_path, bpe_tokenizer):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="empty corpus") as info:
        prepare(_blank_inputs(tmp_path), bpe_tokenizer, out, spec={"text_unit": "line"})
    assert "--text_field" in str(info.value)
    assert leftovers(out) == []


def test_empty_corpus_message_names_the_files(tmp_path, bpe_tokenizer):
    files = _blank_inputs(tmp_path)
    with pytest.raises(DataError, match="empty corpus") as info:
        prepare(files, bpe_tokenizer, tmp_path / "out", spec={"text_unit": "line"})
    for f in files:
        assert str(f) in str(info.value)


def test_empty_corpus_over_two_workers(tmp_path, bpe_tokenizer):
    files = _blank_inputs(tmp_path)
    out = tmp_path / "out"
    common = {"spec": {"text_unit": "line"}, "num_workers": 2}
    assert prepare(files, bpe_tokenizer, out, worker=0, **common) is None
    with pytest.raises(DataError, match="empty corpus") as info:
        prepare(files, bpe_tokenizer, out, worker=1, **common)
    assert str(out) in str(info.value)
    assert not (out / "meta.json").exists()


@pytest.mark.parametrize(
    ("unit", "where", "expected"),
    [
        ("file", "", ["good line\n\ufffd\ufffd bad\nthird\n"]),
        ("line", ":2", ["good line", "\ufffd\ufffd bad", "third"]),
        ("paragraph", ":2", ["good line\n\ufffd\ufffd bad\nthird"]),
    ],
)
def test_undecodable_bytes(tmp_path, bpe_tokenizer, unit, where, expected):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"good line\n\xff\xfe bad\nthird\n")
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare([path], bpe_tokenizer, out, spec={"text_unit": unit})
    msg = str(info.value)
    assert f"{path}{where}: byte " in msg
    assert "UTF-8" in msg and "--encoding_errors replace" in msg
    assert leftovers(out) == []

    meta = prepare([path], bpe_tokenizer, out, spec={"text_unit": unit, "encoding_errors": "replace"}, val_fraction=0)
    assert_round_trip(out, meta, bpe_tokenizer, expected)
    assert meta["settings"]["encoding_errors"] == "replace"


def test_undecodable_bytes_in_jsonl(tmp_path, bpe_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        prepare([path], bpe_tokenizer, tmp_path / "out")
    assert f"{path}:2: byte " in str(info.value) and "UTF-8" in str(info.value)


def test_jsonl_line_without_text_field(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c", "id": 3}])
    with pytest.raises(DataError) as info:
        prepare([path], bpe_tokenizer, tmp_path / "out")
    msg = str(info.value)
    assert f"{path}:3: no 'text' field (found: body, id)" in msg
    assert "--text_field" in msg


@pytest.mark.parametrize("num_proc", [1, 2])
def test_error_in_a_later_piece_names_the_line_of_the_file(tmp_path, bpe_tokenizer, num_proc):
    docs = make_documents(120, seed=13)
    records = [{"text": d} for d in docs[:100]] + [{"txt": "typo"}] + [{"text": d} for d in docs[100:]]
    path = write_jsonl(tmp_path / "docs.jsonl", records)
    with pytest.raises(DataError) as info:
        prepare([path], bpe_tokenizer, tmp_path / "out", num_proc=num_proc, chunk_bytes=200)
    assert f"{path}:101: no 'text' field (found: txt)" in str(info.value)

    text = tmp_path / "lines.txt"
    text.write_bytes("".join(d + "\n" for d in docs[:76]).encode() + b"bad \xff byte\n" + docs[76].encode() + b"\n")
    with pytest.raises(DataError) as info:
        prepare(
            [text], bpe_tokenizer, tmp_path / "out2", spec={"text_unit": "line"}, num_proc=num_proc, chunk_bytes=200
        )
    assert f"{text}:77: byte 4 is not valid UTF-8" in str(info.value)
    assert leftovers(tmp_path / "out") == [] and leftovers(tmp_path / "out2") == []


def test_jsonl_with_text_field_of_another_name(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a"}])
    with pytest.raises(DataError) as info:
        prepare([path], bpe_tokenizer, tmp_path / "out", spec={"text_field": "content"})
    assert f"{path}:1: no 'content' field (found: text)" in str(info.value)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"text": "unterminated', "not valid JSON"),
        ('["a", "list"]', "no 'text' field (found: list)"),
        ('{"text": 5}', "field 'text' is int, not text"),
    ],
)
def test_invalid_jsonl_line(tmp_path, bpe_tokenizer, line, expected):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "good"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare([path], bpe_tokenizer, tmp_path / "out")
    assert f"{path}:2: " in str(info.value)
    assert expected in str(info.value)


def test_parquet_without_the_column(tmp_path, bpe_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": ["a", "b"], "id": [1, 2]}), path)
    with pytest.raises(DataError) as info:
        prepare([path], bpe_tokenizer, tmp_path / "out")
    msg = str(info.value)
    assert f"{path}: no 'text' column (found: body, id)" in msg
    assert "--text_field" in msg


def test_unreadable_parquet(tmp_path, bpe_tokenizer):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as info:
        prepare([path], bpe_tokenizer, tmp_path / "out")
    assert f"{path}: not a readable parquet file" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"val_fraction": 1.0}, "val_fraction must be in [0, 1)"),
        ({"val_fraction": -0.1}, "val_fraction must be in [0, 1)"),
        ({"worker": 2, "num_workers": 2}, "worker index 2 is outside 0..1"),
    ],
)
def test_invalid_arguments(tmp_path, bpe_tokenizer, kwargs, expected):
    path = write_lines(tmp_path / "a.txt", ["text"])
    with pytest.raises(DataError) as info:
        prepare([path], bpe_tokenizer, tmp_path / "out", **kwargs)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"text_unit": "sentence"}, "text_unit must be one of file, line, paragraph"),
        ({"encoding_errors": "ignore"}, "encoding_errors must be 'strict' or 'replace'"),
        ({"inputs": []}, "no input given"),
    ],
)
def test_invalid_source_spec(kwargs, expected):
    with pytest.raises(DataError, match=expected):
        SourceSpec(**{"inputs": ["x.txt"], **kwargs})


# ---------------------------------------------------------------------------------------------
# Damaged or mismatched shards
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path, prepared) -> Path:
    """A private copy of the shared prepared dataset, free to damage."""
    root = tmp_path / "data"
    shutil.copytree(prepared.root, root)
    return root


def _shard(root: Path, split: str = "train", k: int = 0) -> tuple[Path, int]:
    entry = read_meta(root)["splits"][split]["shards"][k]
    return root / entry["file"], entry["tokens"]


def test_copy_opens_like_the_original(data, prepared):
    for split in ("train", "validation"):
        copy, original = TokenShards(data, split), TokenShards(prepared.root, split)
        assert copy.num_tokens == original.num_tokens > 0
        assert np.array_equal(copy.read(0, copy.num_tokens), original.read(0, original.num_tokens))


def test_shard_not_a_whole_number_of_tokens(data):
    path, tokens = _shard(data, "train", 1)
    with open(path, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(DataError) as info:
        TokenShards(data, "train")
    msg = str(info.value)
    assert f"shard {path} is {2 * tokens + 1} bytes" in msg
    assert "uint16" in msg and "truncated or corrupt" in msg
    assert TokenShards(data, "validation").num_tokens > 0  # the other split is intact


def test_shard_size_disagrees_with_meta(data):
    path, tokens = _shard(data, "validation", 0)
    with open(path, "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError) as info:
        TokenShards(data, "validation")
    msg = str(info.value)
    assert f"shard {path} holds {tokens + 1} tokens but meta.json says {tokens}" in msg


def test_truncated_shard_disagrees_with_meta(data):
    path, tokens = _shard(data, "train", 0)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(DataError, match=f"holds {tokens - 2} tokens but meta.json says {tokens}"):
        TokenShards(data, "train")


def test_missing_shard(data):
    path, _ = _shard(data, "train", 2)
    path.unlink()
    with pytest.raises(DataError) as info:
        TokenShards(data, "train")
    assert f"shard missing: {path}" in str(info.value)


def test_missing_meta(data):
    (data / "meta.json").unlink()
    with pytest.raises(DataError) as info:
        TokenShards(data)
    msg = str(info.value)
    assert f"no prepared data in {data}: meta.json is missing" in msg
    assert "did not finish" in msg and "prepare_data.py" in msg


def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as info:
        TokenShards(tmp_path / "nowhere")
    assert f"no prepared data in {tmp_path / 'nowhere'}: meta.json is missing;" in str(info.value)


def test_corrupt_and_foreign_meta(data):
    meta_path = data / "meta.json"
    text = meta_path.read_text()
    meta_path.write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match="corrupt"):
        TokenShards(data)
    meta = json.loads(text)
    meta["format"] = "something.else"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format 'something.else' is not crate_lm.token_shards.v1"):
        TokenShards(data)


def test_tokenizer_fingerprint_mismatch(data, prepared, other_tokenizer):
    fp = prepared.tokenizer.fingerprint
    assert TokenShards(data, tokenizer_fingerprint=fp).fingerprint == fp
    for wrong in ("abc", other_tokenizer.fingerprint):
        with pytest.raises(DataError) as info:
            TokenShards(data, tokenizer_fingerprint=wrong)
        msg = str(info.value)
        assert f"tokenized with tokenizer {fp}" in msg
        assert f"not {wrong}" in msg
        assert str(prepared.tokenizer.path) in msg


def test_model_vocab_smaller_than_data_vocab(data, prepared):
    vocab = prepared.tokenizer.vocab_size
    assert TokenShards(data, model_vocab_size=vocab).vocab_size == vocab
    for small in (10, vocab - 1):
        with pytest.raises(DataError) as info:
            TokenShards(data, model_vocab_size=small)
        msg = str(info.value)
        assert f"model.vocab_size={small}" in msg
        assert f"set model.vocab_size >= {vocab}" in msg


def test_unknown_split(data):
    with pytest.raises(DataError, match="no 'test' split"):
        TokenShards(data, "test")


def test_document_index_disagrees_with_meta(data):
    path, tokens = _shard(data, "train", 0)
    np.save(path.with_name(path.name.replace(".bin", ".idx.npy")), np.array([0, tokens - 1], dtype=np.int64))
    shards = TokenShards(data, "train")
    with pytest.raises(DataError, match="document index of .* disagrees with meta.json"):
        shards.document_starts()


@pytest.mark.parametrize("corrupt", ["first_entry", "count"])
def test_document_index_start_or_count_disagrees_with_meta(data, corrupt):
    path, tokens = _shard(data, "train", 1)
    idx = path.with_name(path.name.replace(".bin", ".idx.npy"))
    index = np.load(idx)
    np.save(idx, np.concatenate([[1], index[1:]]) if corrupt == "first_entry" else index[1:])
    with pytest.raises(DataError, match=f"document index of {re.escape(str(path))}.* disagrees with meta.json"):
        TokenShards(data, "train").document_starts()


def _damage_index(idx: Path, how: str) -> None:
    if how == "half":
        idx.write_bytes(idx.read_bytes()[: idx.stat().st_size // 2])
    elif how == "header_only":
        idx.write_bytes(idx.read_bytes()[:100])
    elif how == "garbage":
        idx.write_bytes(bytes(range(256)) * 3)
    elif how == "empty":
        idx.write_bytes(b"")
    elif how == "float":
        np.save(idx, np.load(idx).astype(np.float64))
    elif how == "missing":
        idx.unlink()


@pytest.mark.parametrize("how", ["half", "header_only", "garbage", "empty", "float", "missing"])
def test_truncated_or_corrupt_document_index(data, how):
    from crate_lm.data import PackedTokenDataset

    path, _ = _shard(data, "train", 1)
    idx = path.with_name(path.name.replace(".bin", ".idx.npy"))
    _damage_index(idx, how)
    shards = TokenShards(data, "train")
    assert shards.read(0, 10).shape == (10,)  # the tokens themselves are still readable
    for use in (
        shards.document_starts,
        lambda: TokenShards(data, "train").document_bounds(0, shards.num_tokens),
        lambda: PackedTokenDataset(TokenShards(data, "train"), 16, reset_at_documents=True),
    ):
        with pytest.raises(DataError) as info:
            use()
        msg = str(info.value)
        assert str(idx) in msg and "prepare" in msg and "again" in msg
        assert "\n" not in msg
    assert len(PackedTokenDataset(TokenShards(data, "train"), 16)) > 0  # plain packing needs no index


# meta.json: every field the readers use, removed one at a time
META_FIELDS = [
    ("dtype",),
    ("tokenizer",),
    ("tokenizer", "fingerprint"),
    ("tokenizer", "vocab_size"),
    ("splits",),
    ("splits", "train", "shards"),
    ("splits", "validation", "shards"),
    ("splits", "train", "shards", 1, "file"),
    ("splits", "train", "shards", 0, "tokens"),
    ("splits", "validation", "shards", 0, "documents"),
]


def _field_name(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


@pytest.mark.parametrize("path", META_FIELDS, ids=_field_name)
def test_meta_missing_a_field(data, path):
    meta_path = data / "meta.json"
    meta = json.loads(meta_path.read_text())
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    meta_path.write_text(json.dumps(meta))
    for read in (read_meta, TokenShards):
        with pytest.raises(DataError) as info:
            read(data)
        msg = str(info.value)
        assert f"{meta_path}: the field '{_field_name(path)}' is missing" in msg
        assert "prepare the data again" in msg


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("dtype",), 16, "'dtype' must be a string, not 16"),
        (("tokenizer",), "bpe", "'tokenizer' must be an object"),
        (("tokenizer", "vocab_size"), "512", "'tokenizer.vocab_size' must be a positive integer, not '512'"),
        (("tokenizer", "vocab_size"), 0, "'tokenizer.vocab_size' must be a positive integer, not 0"),
        (("splits", "train"), [], "'splits.train' must be an object"),
        (("splits", "train", "shards"), {}, "'splits.train.shards' must be a list"),
        (("splits", "train", "shards", 0), "train-00000.bin", "'splits.train.shards[0]' must be an object"),
        (("splits", "train", "shards", 0, "tokens"), -1, "'splits.train.shards[0].tokens' must be a non-negative"),
        (("splits", "train", "shards", 0, "documents"), 2.5, "'splits.train.shards[0].documents' must be a non-neg"),
        (("splits", "train", "shards", 0, "tokens"), True, "'splits.train.shards[0].tokens' must be a non-negative"),
    ],
)
def test_meta_field_of_the_wrong_type(data, path, value, expected):
    meta_path = data / "meta.json"
    meta = json.loads(meta_path.read_text())
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError) as info:
        read_meta(data)
    assert f"{meta_path}: the field {expected}" in str(info.value)


def test_meta_that_is_not_an_object(data):
    (data / "meta.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="is not crate_lm.token_shards.v1"):
        read_meta(data)
    (data / "meta.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataError, match="corrupt"):
        read_meta(data)


@pytest.mark.parametrize(
    "vocab, dtype, expected",
    [
        (70000, "uint16", "dtype uint16 disagrees with tokenizer.vocab_size=70000, which is stored as uint32"),
        (512, "uint32", "dtype uint32 disagrees with tokenizer.vocab_size=512, which is stored as uint16"),
        (512, "int32", "dtype 'int32' is not uint16 or uint32"),
        (512, "float16", "dtype 'float16' is not uint16 or uint32"),
        (512, "no-such-type", "dtype 'no-such-type' is not uint16 or uint32"),
    ],
)
def test_meta_vocab_size_disagrees_with_dtype(data, vocab, dtype, expected):
    meta_path = data / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"]["vocab_size"], meta["dtype"] = vocab, dtype
    meta_path.write_text(json.dumps(meta))
    for read in (read_meta, TokenShards):
        with pytest.raises(DataError) as info:
            read(data)
        msg = str(info.value)
        assert msg.startswith(f"{meta_path}: {expected}")
        assert "prepare the data again" in msg


def test_tokenizer_vocab_size_mismatch(data, prepared):
    vocab = prepared.tokenizer.vocab_size
    assert TokenShards(data, tokenizer_vocab_size=vocab).vocab_size == vocab
    for wrong in (vocab - 1, vocab + 1, 70000):
        with pytest.raises(DataError) as info:
            TokenShards(data, "validation", tokenizer_vocab_size=wrong)
        msg = str(info.value)
        assert f"{data} was prepared with a tokenizer of {vocab} tokens but the tokenizer given has {wrong};" in msg
        assert "use the tokenizer the data was prepared with" in msg


def test_only_files_listed_in_meta_are_read(data, prepared):
    """Stray shards (an extra file in a part, a part folder meta.json does not list) change nothing."""
    before = {s: TokenShards(data, s).documents() for s in ("train", "validation")}
    junk = np.full(300, 9, dtype=np.uint16).tobytes()
    (data / "part-00000-of-00001" / "train-00999.bin").write_bytes(junk)
    (data / "part-00003-of-00004").mkdir()
    (data / "part-00003-of-00004" / "train-00000.bin").write_bytes(junk)
    for split, docs in before.items():
        after = TokenShards(data, split).documents()
        assert len(after) == len(docs)
        assert all(np.array_equal(a, b) for a, b in zip(after, docs))


def test_a_datasets_dataset_saved_to_disk_prepares_like_files(tmp_path, bpe_tokenizer, monkeypatch):
    """The --dataset path (a folder written by save_to_disk; hub names go through the same code),
    with a split chosen from a DatasetDict and the dataset sharded over two workers."""
    import datasets

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = make_documents(120, seed=21, prefix="Set")
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"content": docs}), "test": datasets.Dataset.from_dict({"content": ["x"]})}
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    spec = SourceSpec(dataset=str(tmp_path / "saved"), dataset_split="train", text_field="content")
    out = tmp_path / "out"
    assert prepare_corpus(spec, bpe_tokenizer.path, out, worker=0, num_workers=2, show_progress=False) is None
    meta = prepare_corpus(spec, bpe_tokenizer.path, out, worker=1, num_workers=2, show_progress=False)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["validation"]["documents"] == len(docs)
    assert all_documents(out, bpe_tokenizer) == collections.Counter(docs)
    with pytest.raises(DataError, match=r"no split 'validation' .*--dataset_split"):
        prepare_corpus(SourceSpec(dataset=str(tmp_path / "saved"), dataset_split="validation", text_field="content"),
                       bpe_tokenizer.path, tmp_path / "o2", show_progress=False)  # fmt: skip
    with pytest.raises(DataError, match=r"no 'text' column .*set --text_field"):
        prepare_corpus(
            SourceSpec(dataset=str(tmp_path / "saved")), bpe_tokenizer.path, tmp_path / "o3", show_progress=False
        )


# ---------------------------------------------------------------------------------------------
# The command-line tools: any user error is one "error: ..." line and exit code 2
# ---------------------------------------------------------------------------------------------

TOOLS_DIR = Path(__file__).resolve().parent.parent / "tools"


def _load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_tool_{name}", TOOLS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tool, work", [("prepare_data", "prepare_corpus"), ("train_tokenizer", "train_tokenizer")])
def test_tools_report_any_crate_lm_error_as_one_line(tmp_path, bpe_tokenizer, monkeypatch, capsys, tool, work):
    from crate_lm.errors import CrateLMError

    module = _load_tool(tool)

    def fail(*args, **kwargs):
        raise CrateLMError("something is wrong\nwith this setting; fix it")

    monkeypatch.setattr(module, work, fail)
    inputs = write_lines(tmp_path / "in.txt", make_documents(5))
    argv = ["--inputs", str(inputs), "--out", str(tmp_path / "out")]
    if tool == "prepare_data":
        argv += ["--tokenizer", str(bpe_tokenizer.path), "--num_proc", "1"]
    assert module.main(argv) == 2
    assert capsys.readouterr().err == "error: something is wrong with this setting; fix it\n"


@pytest.mark.parametrize("tool", ["prepare_data", "train_tokenizer"])
def test_tools_report_a_data_error_as_one_line(tmp_path, bpe_tokenizer, capsys, tool):
    missing = tmp_path / "missing.txt"
    argv = ["--inputs", str(missing), "--out", str(tmp_path / "out")]
    if tool == "prepare_data":
        argv += ["--tokenizer", str(bpe_tokenizer.path), "--num_proc", "1"]
    assert _load_tool(tool).main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(missing) in err
