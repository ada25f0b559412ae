"""Activation stores: what ``crate-lm extract`` writes, and the reader for it.

A store is a directory::

    manifest.json                 written LAST, by rank 0, atomically: its presence means "complete"
    part-000/                     one folder per extracting process (rank), renamed into place when done
        part.json                 that rank's settings, hook layouts and chunk list (its completion marker)
        chunk-00000.npz           uncompressed numpy archives (``np.load(..., allow_pickle=False)``)
        chunk-00001.npz ...
    part-001/ ...                 (several processes: rank r extracts sequences r, r + W, r + 2W, ...)

While a rank works it writes into a hidden ``.incomplete-part-{rank:03d}-{pid}/`` folder; an
interrupted extraction leaves at most such hidden folders and never a manifest, and running it
again cleans them up and finishes (whole parts finished with the same settings are kept).

**A chunk** holds whole sequences of ``seq_len`` tokens, at most ``chunk_tokens`` tokens (or one
sequence, if a sequence is longer), so memory is bounded by the chunk size whatever the number
of tokens: a writer holds the chunk it fills plus the one its background thread is writing; a
reader holds one chunk (``iter_chunks``). Its arrays, one row per token:

* ``tokens`` (int32): the token id;
* ``doc`` (int64), ``pos`` (int64): where the token comes from. Prepared shards: the global
  document number within the split (``TokenShards.document_starts()[doc]`` is where it starts)
  and the position within that document, so ``TokenShards.documents()[doc][pos] == tokens``.
  Text file: the line number (0-based) and the token's position within that line's encoding
  (each line is encoded with its newline);
* ``seq`` (int64): the index of the sequence (row of the packed input) the token belongs to;
  its position within that sequence is ``row % seq_len`` inside the chunk;
* per hook point ``H`` stored **sparsely** (CRATE ISTA codes ``*.ista.hook_code``, or any hook
  given by ``sparse=``), CSR over the chunk's token rows, ``m`` columns (the per-token width):
  ``H.indptr`` (int64, rows + 1), ``H.indices`` (the column of each nonzero: uint16 when
  m <= 65536, else int32; the manifest's ``index_dtype``), ``H.values``
  (the nonzeros, at the model's own precision, so the codes come back exactly);
* per hook point ``H`` stored **densely** (residual stream and everything else): ``H``, shape
  (rows, *per-token shape) in the chosen dtype (float16 / float32, or bfloat16 kept as its bit
  pattern in uint16). Head-major hooks (``attn.hook_q`` (B, K, T, p), ``attn.hook_pattern``)
  are stored token-major: (rows, K, p), (rows, K, T).

**manifest.json** records ``format`` (``crate_lm.activations.v1``); ``settings``, what the
content depends on, compared when the same extraction is run again: ``checkpoint`` (resolved
folder), ``model`` (its config), ``tokenizer_fingerprint``, ``hooks`` (in the model's forward
order), ``sparse`` (the hooks stored as CSR), ``dtype``, ``seq_len``, ``tokens_requested``,
``data`` (resolved path), ``data_kind`` (shards or text), ``split`` (None for text),
``reset_at_documents`` (positions and attention restarted at documents, as the run trained);
the same model, checkpoint, tokenizer, dtype and seq_len again at the top level, and ``data``
(source, kind, split, what ``doc`` means); ``hooks``: per hook ``storage`` (csr or dense),
per-token ``shape``, ``dtype`` of the values, ``stored_as`` on disk, and for csr ``nnz`` and
``index_dtype``; ``tokens`` and ``sequences`` extracted, ``bytes`` of chunk files,
``chunk_tokens``, ``world_size`` (the number of processes), and ``chunks``: every chunk file
(path relative to the store, rank, tokens, sequences, per csr hook its nnz), part 0's first,
then part 1's, ...

Nothing is ever pickled: every file is JSON or a numpy array of numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crate_lm.errors import CrateLMError
from crate_lm.fsutil import atomic_write_json

FORMAT = "crate_lm.activations.v1"
MANIFEST = "manifest.json"
PART_MARKER = "part.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
HEAD_MAJOR = (".attn.hook_q", ".attn.hook_pattern")
"""Hook points whose tensors are (B, K, T, ...): heads before tokens."""


class StoreError(CrateLMError):
    """An activation store cannot be read or written as asked."""


def part_name(rank: int) -> str:
    return f"part-{rank:03d}"


def incomplete_name(rank: int, pid: int | None = None) -> str:
    return f".incomplete-{part_name(rank)}-{os.getpid() if pid is None else pid}"


def chunk_name(k: int) -> str:
    return f"chunk-{k:05d}.npz"


# ---- dtypes: numpy has no bfloat16 -------------------------------------------------------------


def storage_dtype_name(dtype: torch.dtype) -> str:
    """How values of ``dtype`` are written: the numpy dtype name (bfloat16 as its uint16 bits)."""
    return "uint16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU numpy array of ``x``'s values; bfloat16 as its bit pattern (uint16)."""
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32, exactly (bfloat16 is float32's top half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def from_stored(array: np.ndarray, dtype: str, library: str) -> np.ndarray | torch.Tensor:
    """A stored array as numpy (bfloat16 widened to float32) or as torch (bfloat16 kept)."""
    if library == "torch":
        t = torch.from_numpy(np.ascontiguousarray(array))
        return t.view(torch.bfloat16) if dtype == "bfloat16" else t
    return bf16_bits_to_float32(array) if dtype == "bfloat16" else array


# ---- writing ---------------------------------------------------------------------------------


@dataclass
class HookLayout:
    """How one hook point is stored: ``csr`` (per-token rows, ``shape`` = [m]) or ``dense``."""

    storage: str
    shape: list[int]
    dtype: str  # dtype of the values (torch name: float16, bfloat16, float32)
    stored_as: str  # numpy dtype on disk
    nnz: int = 0

    def to_json(self) -> dict:
        out = {"storage": self.storage, "shape": self.shape, "dtype": self.dtype, "stored_as": self.stored_as}
        if self.storage == "csr":
            out |= {"nnz": self.nnz, "index_dtype": index_dtype(self.shape[0]).name}
        return out


def token_major(name: str, x: torch.Tensor, tokens: int) -> torch.Tensor:
    """``x`` as (B, T, ...): head-major hooks (B, K, T, ...) get their token axis moved forward."""
    if name.endswith(HEAD_MAJOR) or (x.ndim >= 3 and x.shape[1] != tokens and x.shape[2] == tokens):
        x = x.movedim(2, 1)
    if x.ndim < 2 or x.shape[1] != tokens:
        raise StoreError(f"hook point {name} gave a tensor of shape {tuple(x.shape)} with no axis of {tokens} tokens")
    return x


def index_dtype(width: int) -> np.dtype:
    """The column index dtype of a CSR hook of ``width`` columns: uint16 when it fits (2 bytes a nonzero less)."""
    return np.dtype(np.uint16) if width <= 2**16 else np.dtype(np.int32)


def to_csr(rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nonzeros per row int64, their column indices (``index_dtype``), their values) of a 2-D
    tensor, row-major.
    On a GPU the nonzeros are found there and only they are copied to the host; on the CPU numpy
    finds them (several times faster than torch's CPU ``nonzero``), once, on the bool mask: the
    per-row counts are read off the sorted flat positions (no second pass over the mask) and the
    columns are taken in the narrow index dtype (a power-of-two width needs no division)."""
    if rows.device.type == "cpu" and rows.dtype != torch.bfloat16:
        dense = np.ascontiguousarray(rows.detach().numpy())
        n, width = dense.shape[0], max(dense.shape[1], 1)
        flat = dense.reshape(-1)
        found = np.flatnonzero(flat != 0)  # on the bool mask: several times faster than on the floats
        bounds = np.searchsorted(found, np.arange(0, (n + 1) * width, width, dtype=found.dtype))
        counts = np.diff(bounds).astype(np.int64, copy=False)
        index = index_dtype(width)
        if width & (width - 1) == 0 and width <= np.iinfo(index).max + 1:  # a power of two: a mask, no division
            cols = found.astype(index) & index.type(width - 1)  # the wrap-around keeps the low bits
        else:
            cols = (found % width).astype(index)
        return counts, cols, np.take(flat, found)
    nonzero = rows != 0
    counts = nonzero.sum(1)
    cols = nonzero.nonzero()[:, 1].to(torch.int32)
    values = rows[nonzero]
    cols_host = to_numpy(cols).astype(index_dtype(rows.shape[1]))
    return to_numpy(counts).astype(np.int64, copy=False), cols_host, to_numpy(values)


def write_npz(file: Any, arrays: dict[str, Sequence[np.ndarray]]) -> None:
    """Write what ``np.savez(file, **{k: np.concatenate(pieces)})`` writes (an uncompressed zip of
    ``k.npy`` members, zip64 forced, in this order), streaming each member's pieces into it: no
    concatenated copy, and no per-member ``tobytes`` copy either. Pieces of one member share a
    dtype and all but the first axis."""
    with zipfile.ZipFile(file, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zipf:
        for key, pieces in arrays.items():
            parts = [np.ascontiguousarray(p) for p in pieces]
            first = parts[0]
            if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in parts):
                raise StoreError(f"{key}: pieces of different dtype or shape; cannot be stacked")
            if first.dtype.hasobject:
                raise StoreError(f"{key}: object arrays are never written")
            header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
                      "shape": (sum(int(p.shape[0]) for p in parts), *(int(k) for k in first.shape[1:]))}  # fmt: skip
            with zipf.open(key + ".npy", "w", force_zip64=True) as member:
                try:
                    np.lib.format.write_array_header_1_0(member, header)
                except ValueError:  # a header too long for format 1.0, as np.save would do
                    np.lib.format.write_array_header_2_0(member, header)
                for part in parts:
                    if part.size:
                        member.write(part.reshape(-1).view(np.uint8))


class PartWriter:
    """One rank's chunks: add batches of sequences; whenever ``chunk_tokens`` tokens (whole
    sequences, at least one) are buffered they become the next chunk file. Activations are
    converted to their stored form (CSR pieces, or dense arrays in the storage dtype) as they
    arrive. A chunk is written by a background thread while the next one fills (``background``),
    so at most two chunks are held: the one filling (``max_buffered_rows``, at most
    ``max(chunk_tokens, seq_len)`` rows) and the one being written."""

    def __init__(
        self,
        folder: Path,
        sparse: Sequence[str],
        dense: Sequence[str],
        seq_len: int,
        chunk_tokens: int,
        dtype: torch.dtype,
        prefix: str = "",
        background: bool = True,
    ) -> None:
        self.folder, self.seq_len, self.dtype, self.prefix = folder, seq_len, dtype, prefix
        self.sparse, self.dense = list(sparse), list(dense)
        self.chunk_sequences = max(1, chunk_tokens // seq_len)
        self.layouts: dict[str, HookLayout] = {}
        self.chunks: list[dict] = []
        self.tokens = 0
        self.bytes = 0
        self.max_buffered_rows = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-writer") if background else None
        self._pending: Future | None = None
        self._reset()

    def _reset(self) -> None:
        self._meta: dict[str, list[np.ndarray]] = {"tokens": [], "doc": [], "pos": [], "seq": []}
        self._csr: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {h: [] for h in self.sparse}
        self._dense: dict[str, list[np.ndarray]] = {h: [] for h in self.dense}
        self._sequences = 0

    @property
    def buffered_rows(self) -> int:
        return self._sequences * self.seq_len

    def add(
        self,
        tokens: np.ndarray,
        doc: np.ndarray,
        pos: np.ndarray,
        seq: np.ndarray,
        activations: dict[str, torch.Tensor],
    ) -> None:
        """A batch of S sequences: ``tokens``, ``doc``, ``pos`` (S, T), ``seq`` (S,), and per hook
        a (S, T, ...) tensor (head-major hooks as the model gives them)."""
        n, t = tokens.shape
        acts = {name: token_major(name, x, t) for name, x in activations.items()}
        start = 0
        while start < n:
            take = min(n - start, self.chunk_sequences - self._sequences)
            rows = slice(start, start + take)
            self._meta["tokens"].append(tokens[rows].reshape(-1).astype(np.int32))
            self._meta["doc"].append(doc[rows].reshape(-1).astype(np.int64))
            self._meta["pos"].append(pos[rows].reshape(-1).astype(np.int64))
            self._meta["seq"].append(np.repeat(np.asarray(seq[rows], dtype=np.int64), t))
            for name in self.sparse:
                x = acts[name][rows]
                self._layout(name, "csr", x, x.dtype)
                self._csr[name].append(to_csr(x.reshape(take * t, -1)))
            for name in self.dense:
                x = acts[name][rows]
                self._layout(name, "dense", x, self.dtype)
                self._dense[name].append(to_numpy(x.to(self.dtype).reshape(take * t, *x.shape[2:])))
            self._sequences += take
            self.max_buffered_rows = max(self.max_buffered_rows, self.buffered_rows)
            start += take
            if self._sequences >= self.chunk_sequences:
                self.flush()

    def _layout(self, name: str, storage: str, x: torch.Tensor, dtype: torch.dtype) -> None:
        per_token = list(x.shape[2:]) if storage == "dense" else [int(np.prod(x.shape[2:], dtype=np.int64))]
        layout = HookLayout(storage, per_token, str(dtype).removeprefix("torch."), storage_dtype_name(dtype))
        known = self.layouts.setdefault(name, layout)
        if (known.shape, known.dtype) != (layout.shape, layout.dtype):
            raise StoreError(f"hook point {name} changed shape or dtype between batches ({known} then {layout})")

    def flush(self) -> None:
        """Make the buffered sequences the next chunk (nothing if none are buffered): its record
        now, its file in the background once the previous chunk's file is written."""
        if self._sequences == 0:
            return
        meta, csr, dense = self._meta, self._csr, self._dense
        nnz = {name: int(sum(int(p[0].sum()) for p in pieces)) for name, pieces in csr.items()}
        for name, count in nnz.items():
            self.layouts[name].nnz += count
        entry = {"file": f"{self.prefix}{chunk_name(len(self.chunks))}", "tokens": self.buffered_rows,
                 "sequences": self._sequences, "nnz": nnz, "bytes": 0}  # fmt: skip
        self.chunks.append(entry)
        self.tokens += self.buffered_rows
        self._reset()
        self._wait()  # at most one chunk is being written while the next fills
        path = self.folder / chunk_name(len(self.chunks) - 1)
        if self._pool is None:
            self._write(path, entry, meta, csr, dense)
        else:
            self._pending = self._pool.submit(self._write, path, entry, meta, csr, dense)

    def _write(self, path: Path, entry: dict, meta: dict, csr: dict, dense: dict) -> None:
        arrays: dict[str, list[np.ndarray]] = dict(meta)
        for name, pieces in csr.items():
            counts = np.concatenate([p[0] for p in pieces])
            arrays[f"{name}.indptr"] = [np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)]
            arrays[f"{name}.indices"] = [p[1] for p in pieces]
            arrays[f"{name}.values"] = [p[2] for p in pieces]
        arrays.update(dense)
        with open(path, "wb") as f:
            write_npz(f, arrays)  # what np.savez writes, without concatenating the pieces first
        entry["bytes"] = path.stat().st_size
        self.bytes += entry["bytes"]

    def _wait(self) -> None:
        """Wait for the chunk being written; its error, if any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def finish(self) -> list[dict]:
        """Write what is buffered, wait for every file; the chunk records."""
        self.flush()
        self.close()
        return self.chunks

    def close(self) -> None:
        """Wait for the chunk being written (its error is raised) and stop the writer thread."""
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def write_manifest(root: Path, manifest: dict) -> None:
    atomic_write_json(root / MANIFEST, manifest)


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: missing; {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{path}: corrupt ({getattr(err, 'msg', err)}); {what}") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: not a JSON object; {what}")
    return data


# ---- reading ---------------------------------------------------------------------------------

FORMATS = ("auto", "torch", "scipy")


def _scipy_available() -> bool:
    try:
        import scipy.sparse  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_format(format: str) -> str:
    if format not in FORMATS:
        raise StoreError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if format == "auto":
        return "scipy" if _scipy_available() else "torch"
    if format == "scipy" and not _scipy_available():
        raise StoreError("format='scipy' needs scipy (pip install scipy); or use format='torch'")
    return format


def make_csr(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, shape: tuple[int, int], dtype: str, fmt: str):
    """A CSR matrix from its arrays: scipy.sparse.csr_matrix, or torch.sparse_csr_tensor."""
    index = np.int32 if len(indices) < 2**31 else np.int64  # both arrays in one index dtype, as torch and scipy want
    indptr, indices = indptr.astype(index, copy=False), indices.astype(index, copy=False)
    if fmt == "torch":
        vals = from_stored(values, dtype, "torch")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                torch.from_numpy(np.ascontiguousarray(indptr)),
                torch.from_numpy(np.ascontiguousarray(indices)),
                vals,
                size=shape,
                check_invariants=False,  # written by PartWriter; checking costs a pass over the data
            )
    import scipy.sparse

    return scipy.sparse.csr_matrix((from_stored(values, dtype, "numpy"), indices, indptr), shape=shape)


class ActivationStore:
    """A complete activation store (see the module docstring for the format).

    ``hooks`` lists the hook points, ``num_tokens`` the tokens; ``iter_chunks`` streams chunk by
    chunk; ``codes`` gives one sparse (tokens x m) matrix of a csr hook, ``dense`` one array of a
    dense hook. Chunks come in manifest order: part 0's sequences first, then part 1's, ...; the
    ``seq`` array says which sequence each row belongs to."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not (self.root / MANIFEST).is_file():
            why = (
                "it does not exist"
                if not self.root.exists()
                else "an extraction there did not finish, or it is not one"
            )
            raise StoreError(
                f"{self.root}: no {MANIFEST}, not a complete activation store ({why}); run crate-lm extract"
            )
        self.manifest = read_json(self.root / MANIFEST, "extract the activations again into a new folder")
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{self.root / MANIFEST}: format {self.manifest.get('format')!r} is not {FORMAT}")

    # ---- what is stored -----------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        """The hook points, in the model's forward order."""
        return list(self.manifest["settings"]["hooks"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["settings"]["seq_len"])

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    def layout(self, hook: str) -> dict:
        if hook not in self.manifest["hooks"]:
            raise StoreError(f"{self.root} holds no hook point {hook!r} (has: {', '.join(self.hooks)})")
        return self.manifest["hooks"][hook]

    def is_sparse(self, hook: str) -> bool:
        return self.layout(hook)["storage"] == "csr"

    @property
    def chunks(self) -> list[dict]:
        return self.manifest["chunks"]

    def __len__(self) -> int:
        return len(self.chunks)

    # ---- reading ------------------------------------------------------------------------
    def _open(self, chunk: dict) -> Any:
        path = self.root / chunk["file"]
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise StoreError(f"{path}: missing; the store is damaged, extract again into a new folder") from None
        except (ValueError, zipfile.BadZipFile):
            raise StoreError(f"{path}: not a numpy .npz archive; the store is damaged, extract again") from None
        except OSError as err:
            raise StoreError(f"{path}: unreadable ({err}); the store is damaged, extract again") from None

    def _hook_array(self, data: Any, hook: str, rows: int, fmt: str) -> Any:
        layout = self.layout(hook)
        if layout["storage"] == "csr":
            shape = (rows, int(layout["shape"][0]))
            parts = (data[f"{hook}.indptr"], data[f"{hook}.indices"], data[f"{hook}.values"])
            return make_csr(*parts, shape, layout["dtype"], fmt)
        return from_stored(data[hook], layout["dtype"], "torch" if fmt == "torch" else "numpy")

    def iter_chunks(self, hook: str | Sequence[str] | None = None, format: str = "auto") -> Iterator[dict]:
        """Per chunk a dict: ``tokens``, ``doc``, ``pos``, ``seq`` (numpy, one per token row) and
        each requested hook (default: all) as a sparse CSR matrix (csr hooks: scipy.sparse or
        torch, by ``format``; 'auto' is scipy when installed) or a dense array (numpy; torch
        tensors with format='torch', bfloat16 kept). One chunk is in memory at a time."""
        fmt = resolve_format(format)
        names = self.hooks if hook is None else [hook] if isinstance(hook, str) else list(hook)
        for name in names:
            self.layout(name)
        for chunk in self.chunks:
            with self._open(chunk) as data:
                out: dict[str, Any] = {k: data[k] for k in ("tokens", "doc", "pos", "seq")}
                rows = len(out["tokens"])
                for name in names:
                    out[name] = self._hook_array(data, name, rows, fmt)
            yield out

    def index(self) -> dict[str, np.ndarray]:
        """``tokens``, ``doc``, ``pos``, ``seq`` of every stored token, concatenated (small: 28 bytes a token)."""
        parts: dict[str, list[np.ndarray]] = {"tokens": [], "doc": [], "pos": [], "seq": []}
        for chunk in self.chunks:
            with self._open(chunk) as data:
                for k in parts:
                    parts[k].append(data[k])
        return {k: np.concatenate(v) for k, v in parts.items()}

    def codes(self, hook: str, format: str = "auto"):
        """The whole csr hook as one (tokens x m) sparse matrix, built from the chunks' CSR arrays
        (never densified): scipy.sparse.csr_matrix or torch sparse CSR."""
        fmt = resolve_format(format)
        layout = self.layout(hook)
        if layout["storage"] != "csr":
            raise StoreError(f"{hook} is stored dense in {self.root}; read it with dense() or iter_chunks()")
        nnz = int(layout["nnz"])
        indptr = np.zeros(self.num_tokens + 1, dtype=np.int64)
        indices = np.empty(nnz, dtype=np.int32 if nnz < 2**31 else np.int64)
        values = np.empty(nnz, dtype=np.dtype(layout["stored_as"]))
        row = at = 0
        for chunk in self.chunks:
            with self._open(chunk) as data:
                ptr = data[f"{hook}.indptr"]
                n, k = len(ptr) - 1, int(ptr[-1])
                indptr[row + 1 : row + n + 1] = ptr[1:] + at
                indices[at : at + k] = data[f"{hook}.indices"]
                values[at : at + k] = data[f"{hook}.values"]
            row, at = row + n, at + k
        if (row, at) != (self.num_tokens, nnz):
            raise StoreError(f"{self.root}: chunks hold {row} tokens, {at} nonzeros of {hook}; the manifest says "
                             f"{self.num_tokens}, {nnz}: the store is damaged")  # fmt: skip
        return make_csr(indptr, indices, values, (self.num_tokens, int(layout["shape"][0])), layout["dtype"], fmt)

    def dense(self, hook: str, out: str | Path | None = None) -> np.ndarray:
        """The whole dense hook as one numpy array (tokens, *shape), filled chunk by chunk; with
        ``out`` a .npy file path, into a memory-mapped file there (so it need not fit in RAM).
        bfloat16 comes back as float32."""
        layout = self.layout(hook)
        if layout["storage"] != "dense":
            raise StoreError(f"{hook} is stored sparse in {self.root}; read it with codes() or iter_chunks()")
        dtype = np.float32 if layout["dtype"] == "bfloat16" else np.dtype(layout["stored_as"])
        shape = (self.num_tokens, *layout["shape"])
        if out is not None:
            result = np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=shape)
        else:
            result = np.empty(shape, dtype=dtype)
        row = 0
        for chunk in self.chunks:
            with self._open(chunk) as data:
                block = from_stored(data[hook], layout["dtype"], "numpy")
            result[row : row + len(block)] = block
            row += len(block)
        if isinstance(result, np.memmap):
            result.flush()
        return result

    def iter_dense(self, hook: str) -> Iterator[np.ndarray]:
        """The dense hook chunk by chunk (numpy; bfloat16 as float32)."""
        layout = self.layout(hook)
        if layout["storage"] != "dense":
            raise StoreError(f"{hook} is stored sparse in {self.root}; read it with codes() or iter_chunks()")
        for chunk in self.chunks:
            with self._open(chunk) as data:
                block = from_stored(data[hook], layout["dtype"], "numpy")
            yield block

    def __repr__(self) -> str:
        return f"ActivationStore({self.root}, {self.num_tokens} tokens, hooks={self.hooks})"
