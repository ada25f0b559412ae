"""The token shard format, its writer and its memory-mapped reader.

A prepared dataset is a directory::

    meta.json                               written last: its presence means "complete"
    part-00000-of-00002/                    one folder per preparation worker
        part.json                           that worker's shards and counts
        train-00000.bin                     raw token ids, little-endian uint16 (vocab <= 65536) or uint32
        train-00000.idx.npy                 int64 document start offsets into the .bin, plus its length
        validation-00000.bin / .idx.npy
    part-00001-of-00002/ ...

Every document ends with the tokenizer's end-of-document token. ``meta.json`` records the
format version, tokenizer fingerprint and vocabulary size, dtype, per split the token and
document counts and the shard list, and the sources read. A worker writes into a hidden
temporary folder and renames it when done, so a folder that looks complete is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crate_lm.data.errors import DataError
from crate_lm.fsutil import atomic_write_bytes

FORMAT = "crate_lm.token_shards.v1"
SPLITS = ("train", "validation")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Append whole documents to ``{split}-{k:05d}.bin`` files of about ``shard_tokens`` tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._starts: list[np.ndarray] = []
        self._tokens = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")
        self._name, self._starts, self._tokens = name, [], 0

    def write(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Write a run of whole documents (their tokens concatenated)."""
        if len(doc_lengths) == 0:
            return
        if self._file is None:
            self._open()
        starts = self._tokens + np.concatenate([[0], np.cumsum(doc_lengths[:-1])])
        self._starts.append(starts)
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._tokens += int(tokens.size)
        if self._tokens >= self.shard_tokens:
            self._close()

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        index = np.concatenate(self._starts + [np.array([self._tokens])]).astype(np.int64)
        np.save(self.folder / self._name.replace(".bin", ".idx.npy"), index)
        self.shards.append({"file": self._name, "tokens": self._tokens, "documents": len(index) - 1})
        self._file = None

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def read_meta(root: str | Path) -> dict:
    """``meta.json`` of a prepared dataset, with a clear error when it is missing or foreign."""
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        hint = " (a preparation run there did not finish; run it again)" if root.is_dir() else ""
        raise DataError(
            f"no prepared data in {root}: meta.json is missing{hint}; prepare it with tools/prepare_data.py"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{meta_path}: corrupt ({err.msg}); prepare the data again into a new folder") from None
    except UnicodeDecodeError:
        raise DataError(f"{meta_path}: corrupt (not UTF-8 text); prepare the data again into a new folder") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{meta_path}: format '{found}' is not {FORMAT}; prepare the data again")
    _check_meta(meta, meta_path)
    return meta


_REDO = "prepare the data again into a new folder"


def _require(meta_path: Path, value: object, name: str, kind: type, what: str, minimum: int = 0) -> Any:
    """``value`` (the field ``name``) if it is a ``kind``; else a DataError naming the field and the file."""
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < minimum):
        raise DataError(f"{meta_path}: the field '{name}' must be {what}, not {value!r}; the file is damaged; {_REDO}")
    return value


def _get(meta_path: Path, parent: dict, key: str, name: str, kind: type, what: str, minimum: int = 0) -> Any:
    if key not in parent:
        raise DataError(f"{meta_path}: the field '{name}' is missing; the file is incomplete or foreign; {_REDO}")
    return _require(meta_path, parent[key], name, kind, what, minimum)


def _check_meta(meta: dict, meta_path: Path) -> None:
    """Every field the readers use is present and of the right type, and the dtype fits the vocabulary."""
    dtype = _get(meta_path, meta, "dtype", "dtype", str, "a string")
    tokenizer = _get(meta_path, meta, "tokenizer", "tokenizer", dict, "an object")
    _get(meta_path, tokenizer, "fingerprint", "tokenizer.fingerprint", str, "a string")
    vocab = _get(meta_path, tokenizer, "vocab_size", "tokenizer.vocab_size", int, "a positive integer", 1)
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"{meta_path}: dtype '{dtype}' is not uint16 or uint32; the file is damaged; {_REDO}")
    if dtype != token_dtype(vocab).name:
        raise DataError(
            f"{meta_path}: dtype {dtype} disagrees with tokenizer.vocab_size={vocab}, which is stored as "
            f"{token_dtype(vocab).name}; the file is damaged or edited; {_REDO}"
        )
    splits = _get(meta_path, meta, "splits", "splits", dict, "an object")
    for split, entry in splits.items():
        _require(meta_path, entry, f"splits.{split}", dict, "an object")
        shards = _get(meta_path, entry, "shards", f"splits.{split}.shards", list, "a list")
        for k, shard in enumerate(shards):
            name = f"splits.{split}.shards[{k}]"
            _require(meta_path, shard, name, dict, "an object")
            _get(meta_path, shard, "file", f"{name}.file", str, "a string")
            _get(meta_path, shard, "tokens", f"{name}.tokens", int, "a non-negative integer")
            _get(meta_path, shard, "documents", f"{name}.documents", int, "a non-negative integer")


@dataclass
class _Shard:
    path: Path
    tokens: int
    documents: int


class TokenShards:
    """One split of a prepared dataset as a single concatenated, memory-mapped token stream.

    Checks on opening: every shard exists, its size is a whole number of tokens of the recorded
    dtype and equals the count in the metadata; the tokenizer fingerprint and vocabulary size
    match the caller's tokenizer; the vocabulary fits the model's embedding. Token files and
    document indexes are memory-mapped lazily, per process, so the object can be sent to
    DataLoader workers and its memory does not grow with the corpus.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        tokenizer_fingerprint: str | None = None,
        tokenizer_vocab_size: int | None = None,
        model_vocab_size: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.meta = meta = read_meta(self.root)
        if split not in meta["splits"]:
            raise DataError(f"{self.root}: no '{split}' split (has: {', '.join(meta['splits'])})")
        self.split = split
        self.dtype = np.dtype(meta["dtype"])
        data_fp = meta["tokenizer"]["fingerprint"]
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != data_fp:
            raise DataError(
                f"{self.root} was tokenized with tokenizer {data_fp} ({meta['tokenizer'].get('path')}), "
                f"not {tokenizer_fingerprint}; use the tokenizer the data was prepared with, or prepare it again"
            )
        vocab = meta["tokenizer"]["vocab_size"]
        if tokenizer_vocab_size is not None and tokenizer_vocab_size != vocab:
            raise DataError(
                f"{self.root} was prepared with a tokenizer of {vocab} tokens but the tokenizer given has "
                f"{tokenizer_vocab_size}; use the tokenizer the data was prepared with, or prepare it again"
            )
        if model_vocab_size is not None and vocab > model_vocab_size:
            raise DataError(
                f"{self.root}: the data's vocabulary ({vocab} tokens) is larger than the model's embedding "
                f"(model.vocab_size={model_vocab_size}); set model.vocab_size >= {vocab}"
            )
        self.shards: list[_Shard] = []
        for entry in meta["splits"][split]["shards"]:
            path = self.root / entry["file"]
            if not path.is_file():
                raise DataError(f"shard missing: {path}; the prepared data is incomplete, prepare it again")
            size = path.stat().st_size
            if size % self.dtype.itemsize:
                raise DataError(
                    f"shard {path} is {size} bytes, not a whole number of {self.dtype.name} tokens: "
                    "it is truncated or corrupt; prepare the data again into a new folder"
                )
            if size // self.dtype.itemsize != entry["tokens"]:
                raise DataError(
                    f"shard {path} holds {size // self.dtype.itemsize} tokens but meta.json says {entry['tokens']}: "
                    "it is corrupt or from another run; prepare the data again into a new folder"
                )
            self.shards.append(_Shard(path, entry["tokens"], entry["documents"]))
        self.offsets = np.concatenate([[0], np.cumsum([s.tokens for s in self.shards], dtype=np.int64)])
        # global number of each shard's first document
        self.doc_offsets = np.concatenate([[0], np.cumsum([s.documents for s in self.shards], dtype=np.int64)])
        self.num_tokens = int(self.offsets[-1])
        self.num_documents = int(self.doc_offsets[-1])
        self._maps: list[np.ndarray] | None = None
        self._index_maps: list[np.ndarray | None] | None = None

    @property
    def vocab_size(self) -> int:
        return self.meta["tokenizer"]["vocab_size"]

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    def _open(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.memmap(s.path, dtype=self.dtype, mode="r") for s in self.shards]
        return self._maps

    def __getstate__(self) -> dict:
        # memory maps reopen in each worker process
        return {**self.__dict__, "_maps": None, "_index_maps": None}

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated split, as int64."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside 0..{self.num_tokens}")
        maps = self._open()
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled = 0
        while filled < length:
            local = start + filled - int(self.offsets[i])
            take = min(length - filled, self.shards[i].tokens - local)
            out[filled : filled + take] = maps[i][local : local + take]
            filled += take
            i += 1
        return out

    def _index(self, i: int) -> np.ndarray:
        """Shard i's document index (local starts, then the shard's length), memory-mapped and checked."""
        if self._index_maps is None:
            self._index_maps = [None] * len(self.shards)
        index = self._index_maps[i]
        if index is None:
            shard = self.shards[i]
            path = shard.path.with_name(shard.path.name.replace(".bin", ".idx.npy"))
            if not path.is_file():
                raise DataError(f"document index missing: {path}; the prepared data is incomplete, prepare it again")
            try:
                with open(path, "rb") as f:
                    if f.read(6) != b"\x93NUMPY":
                        raise ValueError("not a .npy file")
                index = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                reason = " ".join(str(err).split()) or type(err).__name__
                raise DataError(
                    f"document index {path} is truncated or corrupt ({reason}); prepare the data again into a new folder"
                ) from None
            if not isinstance(index, np.ndarray) or index.dtype != np.int64 or index.ndim != 1:
                raise DataError(
                    f"document index {path} is not a list of int64 offsets: it is corrupt; "
                    "prepare the data again into a new folder"
                )
            if len(index) != shard.documents + 1 or index[0] != 0 or index[-1] != shard.tokens:
                raise DataError(
                    f"document index of {shard.path} ({path}) disagrees with meta.json; "
                    "prepare the data again into a new folder"
                )
            self._index_maps[i] = index
        return index

    def check_document_indexes(self) -> None:
        """Open (memory-mapped) and check every shard's document index, so damage shows up front."""
        for i in range(len(self.shards)):
            self._index(i)

    def document_bounds(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """For each token position in [start, start + length): its global document number and the
        global offset at which that document starts (two int64 arrays). Reads only the index
        entries of the documents the range touches."""
        if length < 0 or start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside 0..{self.num_tokens}")
        doc = np.empty(length, dtype=np.int64)
        doc_start = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled = 0
        while filled < length:
            index, offset = self._index(i), int(self.offsets[i])
            lo = start + filled - offset
            take = min(length - filled, self.shards[i].tokens - lo)
            first = int(np.searchsorted(index, lo, side="right")) - 1
            last = int(np.searchsorted(index, lo + take - 1, side="right")) - 1
            starts = np.array(index[first : last + 1], dtype=np.int64)  # only the documents in range
            local = np.searchsorted(starts, np.arange(lo, lo + take), side="right") - 1
            doc[filled : filled + take] = int(self.doc_offsets[i]) + first + local
            doc_start[filled : filled + take] = offset + starts[local]
            filled += take
            i += 1
        return doc, doc_start

    def document_starts(self) -> np.ndarray:
        """Global offsets at which each document starts (int64, ascending), built in memory on each
        call: for tests and tools; the loader uses :meth:`document_bounds`."""
        parts = [np.asarray(self._index(i)[:-1]) + self.offsets[i] for i in range(len(self.shards))]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def documents(self) -> list[np.ndarray]:
        """Every document's tokens (end-of-document included), for small splits and tests."""
        starts = np.append(self.document_starts(), self.num_tokens)
        return [self.read(int(a), int(b - a)) for a, b in zip(starts[:-1], starts[1:])]


def write_part_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(folder / "part.json", (json.dumps(manifest, indent=2) + "\n").encode())
