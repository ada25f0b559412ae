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
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: format '{meta.get('format')}' is not {FORMAT}; prepare the data again")
    return meta


@dataclass
class _Shard:
    path: Path
    tokens: int
    documents: int


class TokenShards:
    """One split of a prepared dataset as a single concatenated, memory-mapped token stream.

    Checks on opening: every shard exists, its size is a whole number of tokens of the recorded
    dtype and equals the count in the metadata; the tokenizer fingerprint matches the one the
    caller expects; the vocabulary fits the model's embedding. Memory maps open lazily, per
    process, so the object can be sent to DataLoader workers.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        tokenizer_fingerprint: str | None = None,
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
        self.num_tokens = int(self.offsets[-1])
        self.num_documents = sum(s.documents for s in self.shards)
        self._maps: list[np.ndarray] | None = None
        self._doc_starts: np.ndarray | None = None

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
        return {**self.__dict__, "_maps": None}  # memory maps reopen in each worker process

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

    def document_starts(self) -> np.ndarray:
        """Global offsets at which each document starts (int64, ascending)."""
        if self._doc_starts is None:
            parts = []
            for shard, offset in zip(self.shards, self.offsets[:-1]):
                index = np.load(shard.path.with_name(shard.path.name.replace(".bin", ".idx.npy")))
                if len(index) != shard.documents + 1 or index[-1] != shard.tokens:
                    raise DataError(f"document index of {shard.path} disagrees with meta.json; prepare the data again")
                parts.append(index[:-1] + offset)
            self._doc_starts = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return self._doc_starts

    def documents(self) -> list[np.ndarray]:
        """Every document's tokens (end-of-document included), for small splits and tests."""
        starts = np.append(self.document_starts(), self.num_tokens)
        return [self.read(int(a), int(b - a)) for a, b in zip(starts[:-1], starts[1:])]


def write_part_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(folder / "part.json", (json.dumps(manifest, indent=2) + "\n").encode())
