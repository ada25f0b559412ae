"""Activation extraction at scale: ``crate-lm extract RUN --data SHARDS_OR_TEXT --hooks GLOBS --tokens N --out DIR``.

Streams packed token sequences through a trained model (``crate_lm.load`` and the hook API's
``run_with_cache``) and writes the chosen hook points' activations to an activation store, chunk
by chunk (format and reader: :mod:`crate_lm.interp.store`). ISTA codes are stored sparsely
(CSR), everything else densely in ``dtype``. Memory is bounded by one batch plus one chunk,
whatever N is.

* **Hooks**: comma-separated glob patterns over ``model.hook_names()``
  (``blocks.*.ista.hook_code``, ``blocks.[03].hook_resid_post``); a pattern that matches
  nothing is an error naming the closest hook points.
* **Data**: a prepared shards folder (its ``split``, packed into ``seq_len`` sequences in order,
  no shuffling), or a text file (each line encoded with its newline, lines concatenated and cut
  into sequences). Default: the run's own data (``data.path[0]``, as written or relative to a
  folder above the checkpoint). N tokens means ceil(N / seq_len) whole sequences (fewer if the
  data runs out).
* **Interruption**: each process writes into a hidden folder renamed into place when its part is
  done, and rank 0 writes ``manifest.json`` last. Running the same extraction again over a
  complete store does nothing; over a store of other settings it refuses, naming them; over an
  unfinished one it finishes it.
* **Several processes** (``torchrun --nproc_per_node G``, or any launcher that sets ``RANK`` and
  ``WORLD_SIZE``; no process group is created): rank r extracts sequences r, r + W, ... into
  ``part-{r:03d}``; rank 0 waits for every part (polling the files, ``wait_timeout`` seconds)
  and writes the manifest.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crate_lm.checkpoint import resolve_run_data
from crate_lm.errors import CrateLMError
from crate_lm.fsutil import atomic_write_json
from crate_lm.interp.store import (
    DTYPE_ALIASES,
    DTYPES,
    FORMAT,
    MANIFEST,
    PART_MARKER,
    PartWriter,
    StoreError,
    incomplete_name,
    part_name,
    read_json,
    remove_tree,
    write_manifest,
)

DEFAULT_HOOKS = "blocks.*.ista.hook_code"
DEFAULT_SPARSE = "*.ista.hook_code"
CHUNK_TOKENS = 8192
WAIT_TIMEOUT = 3600.0
PART_WRITER = PartWriter
DOCUMENT_MEANING = {"shards": "global document number in the split", "text": "line number in the file (0-based)"}
"""The writer class each rank uses (tests substitute an instrumented one)."""
COMPARED = ("checkpoint", "model", "tokenizer_fingerprint", "hooks", "sparse", "dtype", "seq_len", "tokens_requested",
            "data", "data_kind", "split", "reset_at_documents")  # fmt: skip
"""The settings a store's content depends on: running again with any of them changed is refused."""


class ExtractError(CrateLMError):
    """The extraction cannot run as asked; the message says why."""


# ---- arguments -------------------------------------------------------------------------------


def _int(value: Any, flag: str, minimum: int = 1) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or value < minimum:
        raise ExtractError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    return value


def split_patterns(patterns: str | Sequence[str] | None) -> list[str]:
    """Comma-separated glob patterns (or a list of them) as a list, blanks dropped."""
    if patterns is None:
        return []
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]


def select_hooks(names: Sequence[str], patterns: str | Sequence[str]) -> list[str]:
    """The hook points matching any pattern (fnmatch), in the model's order; a pattern that
    matches nothing is an error naming the closest hook points."""
    wanted = split_patterns(patterns)
    if not wanted:
        raise ExtractError("--hooks is empty; give glob patterns such as 'blocks.*.ista.hook_code'")
    for pattern in wanted:
        if not fnmatch.filter(names, pattern):
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else f"hook points: {', '.join(names[:8])}"
            more = f", ... ({len(names)} in all, see model.hook_names())" if not close and len(names) > 8 else ""
            raise ExtractError(f"--hooks pattern '{pattern}' matches no hook point of this model; {hint}{more}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in wanted)]


def resolve_dtype(dtype: str) -> str:
    name = DTYPE_ALIASES.get(str(dtype), str(dtype).removeprefix("torch."))
    if name not in DTYPES:
        raise ExtractError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def rank_and_world() -> tuple[int, int]:
    """RANK and WORLD_SIZE from the environment (torchrun sets them); 0 and 1 without them."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ExtractError(f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
                           "not integers") from None  # fmt: skip
    if world < 1 or not 0 <= rank < world:
        raise ExtractError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world


def process_device(device: str, world: int) -> str:
    """One GPU per process: a bare 'cuda' becomes cuda:LOCAL_RANK when several processes run."""
    if device == "cuda" and world > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', '0')))}"
    return device


def stop_layer(hooks: Sequence[str], n_layers: int) -> int | None:
    """The number of blocks the hooks need (``run_with_cache(stop_at_layer=...)``), or None for
    the whole model (a hook after the last block, or every block needed)."""
    layers = []
    for name in hooks:
        found = re.match(r"blocks\.(\d+)\.", name)
        if found:
            layers.append(int(found.group(1)))
        elif name != "hook_embed":
            return None
    stop = max(layers, default=0) + 1
    return stop if stop < n_layers else None


def forward_stop(hooks: Sequence[str], n_layers: int) -> int | None:
    """Where the extraction's forward stops (``run_with_cache(stop_at_layer=...)``): after the
    blocks the hooks need (``stop_layer``), also when that is every block, so the final norm and
    the output head, whose results extraction never reads, are not computed; None (the whole
    model) only for a hook after the last block."""
    stop = stop_layer(hooks, n_layers)
    if stop is None and all(name == "hook_embed" or re.match(r"blocks\.(\d+)\.", name) for name in hooks):
        return n_layers
    return stop


# ---- data ------------------------------------------------------------------------------------


@dataclass
class Sequences:
    """Where the sequences come from and how many are planned (the exact count for shards;
    an upper bound for a text file, which is read until it runs out)."""

    kind: str  # "shards" or "text"
    path: Path
    split: str | None
    seq_len: int
    planned: int
    available: int | None  # sequences the data holds (shards), None when unknown (text)
    shards: Any = None
    tokenizer: Any = None

    def iter(self, rank: int = 0, world: int = 1) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(sequence index, tokens, doc, pos) for sequences rank, rank + world, ... of the plan."""
        if self.kind == "shards":
            seq = self.seq_len
            for i in range(rank, self.planned, world):
                start = i * seq
                doc, doc_start = self.shards.document_bounds(start, seq)
                yield i, self.shards.read(start, seq), doc, np.arange(start, start + seq) - doc_start
        else:
            for i, tokens, doc, pos in text_sequences(self.path, self.tokenizer, self.seq_len, self.planned):
                if i % world == rank:
                    yield i, tokens, doc, pos


def text_sequences(
    path: Path, tokenizer: Any, seq_len: int, limit: int, lines_per_batch: int = 512
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """A text file cut into sequences: each line (newline kept) encoded, lines concatenated;
    doc = line number, pos = position in the line's encoding. Reads the file as it goes."""
    empty = np.zeros(0, dtype=np.int64)
    carry = (empty, empty, empty)
    made = line_no = 0
    try:
        with open(path, encoding="utf-8") as f:
            while made < limit:
                lines = [line for _, line in zip(range(lines_per_batch), f)]
                if not lines:
                    return
                encoded = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(lines)]
                tokens = np.concatenate([carry[0], *encoded])
                doc = np.concatenate(
                    [carry[1], *(np.full(len(e), line_no + j, dtype=np.int64) for j, e in enumerate(encoded))]
                )
                pos = np.concatenate([carry[2], *(np.arange(len(e), dtype=np.int64) for e in encoded)])
                line_no += len(lines)
                full = min(len(tokens) // seq_len, limit - made)
                for k in range(full):
                    cut = slice(k * seq_len, (k + 1) * seq_len)
                    yield made, tokens[cut], doc[cut], pos[cut]
                    made += 1
                rest = slice(full * seq_len, None)
                carry = (tokens[rest], doc[rest], pos[rest])
    except UnicodeDecodeError as err:
        raise ExtractError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); pass a UTF-8 file") from None


def open_sequences(loaded: Any, data: str | None, split: str, seq_len: int, tokens: int) -> Sequences:
    """The data to extract from, checked (it exists, matches the tokenizer, holds a sequence)."""
    from crate_lm.data import TokenShards

    wanted = math.ceil(tokens / seq_len)
    if data is None:
        path = resolve_run_data(Path(loaded.path), loaded.cfg.data.path[0])
    else:
        path = Path(str(data)).expanduser()
        if not path.exists():
            raise ExtractError(f"--data {path}: no such file or folder; pass a prepared shards folder or a text file")
    path = path.resolve()
    tokenizer = loaded.tokenizer
    if path.is_file():
        sequences = Sequences("text", path, None, seq_len, wanted, None, tokenizer=tokenizer)
        if next(sequences.iter(), None) is None:
            raise ExtractError(f"--data {path} holds fewer tokens than one sequence of {seq_len}; "
                               "pass more text or a smaller --seq_len")  # fmt: skip
        return sequences
    shards = TokenShards(
        path, split, tokenizer_fingerprint=tokenizer.fingerprint, model_vocab_size=loaded.cfg.model.vocab_size
    )
    available = shards.num_tokens // seq_len
    if available < 1:
        raise ExtractError(f"the {split} split of {path} holds {shards.num_tokens} tokens, fewer than one sequence of "
                           f"{seq_len}; use a smaller --seq_len or more data")  # fmt: skip
    shards.check_document_indexes()  # damage shows up now, not after writing
    return Sequences("shards", path, split, seq_len, min(wanted, available), available, shards=shards)


# ---- the store folder ------------------------------------------------------------------------

_OURS = re.compile(r"^(part-\d{3,}|\.incomplete-part-\d{3,}-\d+|\.failed-part-\d{3,}|\.manifest\.json\.tmp-\d+)$")
"""What an unfinished extraction leaves in its folder (anything else there is refused)."""


def differing(old: dict, new: dict) -> list[str]:
    """The compared settings that differ, each as 'name (there: a, now: b)'."""
    out = []
    for key in COMPARED:
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                out += [f"{key}.{k} (there: {a.get(k)!r}, now: {b.get(k)!r})" for k in keys]
            else:
                out.append(f"{key} (there: {a!r}, now: {b!r})")
    return out


def existing_store(out: Path, settings: dict) -> dict | None:
    """The manifest of a complete store at ``out`` made with ``settings``; None when ``out`` holds
    no complete store (absent, empty or unfinished). Refuses a store of other settings, and a
    folder holding anything else."""
    if out.exists() and not out.is_dir():
        raise ExtractError(f"--out {out} is a file; choose a folder")
    if (out / MANIFEST).is_file():
        manifest = read_json(out / MANIFEST, "remove the folder or choose another --out")
        if manifest.get("format") != FORMAT:
            raise ExtractError(f"{out} holds a {manifest.get('format')!r} manifest, not {FORMAT}; choose another --out")
        diff = differing(manifest.get("settings", {}), settings)
        if diff:
            raise ExtractError(f"{out} holds an extraction with other settings: {'; '.join(diff)}; "
                               "choose another --out (a complete store is never overwritten)")  # fmt: skip
        return manifest
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _OURS.match(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ExtractError(f"--out {out} exists and holds files that are not an unfinished extraction ({shown}); "
                               "choose a new or empty folder")  # fmt: skip
    return None


def _part_matches(part: dict, settings: dict, world: int, chunk_tokens: int) -> bool:
    return (
        part.get("format") == FORMAT
        and not differing(part.get("settings", {}), settings)
        and part.get("world_size") == world
        and part.get("chunk_tokens") == chunk_tokens
    )


def row_positions(doc: np.ndarray) -> np.ndarray:
    """Position ids as PackedTokenDataset gives them with reset_at_documents: per row of (B, T)
    document numbers, counting from 0 at the row's start and at every new document."""
    t = np.broadcast_to(np.arange(doc.shape[1]), doc.shape)
    new = np.ones(doc.shape, dtype=bool)
    new[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return t - np.maximum.accumulate(np.where(new, t, 0), axis=1)


def _batches(items: Iterator[tuple], size: int) -> Iterator[list[tuple]]:
    batch: list[tuple] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def forward_cache(
    model: Any, ids: torch.Tensor, hooks: list[str], stop: int | None, inputs: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The hooks' activations for one batch (the output is not kept). ``inputs``: more forward
    arguments (``position_ids``, ``document_ids``)."""
    kwargs: dict[str, Any] = {"stop_at_layer": stop} if stop is not None else {}
    _, cache = model.run_with_cache(ids, names_filter=hooks, **kwargs, **(inputs or {}))
    return {name: cache[name] for name in hooks}


def extract_part(
    model: Any,
    sequences: Sequences,
    out: Path,
    *,
    hooks: list[str],
    sparse: list[str],
    settings: dict,
    rank: int,
    world: int,
    batch_size: int,
    chunk_tokens: int,
    dtype: torch.dtype,
    show_progress: bool,
    reset_at_documents: bool = False,
) -> dict:
    """Extract this rank's sequences into ``out/part-{rank}`` (via a hidden folder renamed when
    done); returns the part's record (``part.json``). A finished part of the same settings is
    kept as it is."""
    final = out / part_name(rank)
    if (final / PART_MARKER).is_file():
        try:
            part = read_json(final / PART_MARKER, "")
        except StoreError:
            part = {}
        if _part_matches(part, settings, world, chunk_tokens):
            return part
    for stale in out.glob(f".incomplete-{part_name(rank)}-*"):
        remove_tree(stale)
    failed = out / f".failed-{part_name(rank)}"
    failed.unlink(missing_ok=True)
    tmp = out / incomplete_name(rank)
    tmp.mkdir()
    writer: PartWriter | None = None
    try:
        writer = PART_WRITER(tmp, sparse, [h for h in hooks if h not in sparse], sequences.seq_len, chunk_tokens,
                              dtype, prefix=f"{part_name(rank)}/")  # fmt: skip
        device = next(model.parameters()).device
        stop = forward_stop(hooks, len(model.blocks)) if hasattr(model, "blocks") else None
        share = len(range(rank, sequences.planned, world)) * sequences.seq_len
        from tqdm import tqdm

        desc = "extract" if world == 1 else f"extract (rank 0 of {world})"
        with tqdm(total=share, unit="tok", unit_scale=True, desc=desc, disable=not show_progress or rank != 0) as bar:
            with torch.inference_mode():
                for batch in _batches(sequences.iter(rank, world), batch_size):
                    seq = np.array([b[0] for b in batch], dtype=np.int64)
                    tokens, doc, pos = (np.stack([b[k] for b in batch]) for k in (1, 2, 3))
                    ids = torch.from_numpy(tokens).to(device=device, dtype=torch.long)
                    inputs = None
                    if reset_at_documents:  # as the run trained: positions and attention restart at documents
                        inputs = {"position_ids": torch.from_numpy(row_positions(doc)).to(device),
                                  "document_ids": torch.from_numpy(doc - doc[:, :1]).to(device)}  # fmt: skip
                    writer.add(tokens, doc, pos, seq, forward_cache(model, ids, hooks, stop, inputs))
                    bar.update(tokens.size)
        chunks = writer.finish()
        part = {
            "format": FORMAT,
            "rank": rank,
            "world_size": world,
            "chunk_tokens": chunk_tokens,
            "settings": settings,
            "tokens": writer.tokens,
            "sequences": sum(c["sequences"] for c in chunks),
            "bytes": writer.bytes,
            "hooks": {name: layout.to_json() for name, layout in writer.layouts.items()},
            "chunks": chunks,
            "max_buffered_rows": writer.max_buffered_rows,
        }
        atomic_write_json(tmp / PART_MARKER, part)
        if final.exists():
            remove_tree(final)
        os.rename(tmp, final)
        return part
    except BaseException as err:
        if writer is not None:
            try:
                writer.close()  # no file is still being written into the folder removed next
            except BaseException:  # the first error is the one to report
                pass
        remove_tree(tmp)
        if world > 1:  # tell rank 0 not to wait (best effort)
            try:
                failed.write_text(f"{type(err).__name__}: {' '.join(str(err).split())}"[:500])
            except OSError:
                pass
        raise


def wait_for_parts(
    out: Path, world: int, settings: dict, chunk_tokens: int, started: float, timeout: float
) -> dict[int, dict]:
    """Rank 0: every other rank's finished part record, polling their files."""
    parts: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while True:
        for r in range(1, world):
            if r in parts:
                continue
            marker = out / part_name(r) / PART_MARKER
            if marker.is_file():
                try:
                    part = read_json(marker, "")
                except StoreError:
                    part = {}
                if _part_matches(part, settings, world, chunk_tokens):
                    parts[r] = part
                    continue
            failed = out / f".failed-{part_name(r)}"
            try:
                if failed.stat().st_mtime >= started - 1.0:
                    raise ExtractError(f"rank {r} of {world} failed ({failed.read_text().strip()}); fix that, "
                                       "then run the extraction again (finished parts are kept)")  # fmt: skip
            except FileNotFoundError:
                pass
        if len(parts) == world - 1:
            return parts
        if time.monotonic() > deadline:
            missing = [part_name(r) for r in range(1, world) if r not in parts]
            raise ExtractError(f"waited {timeout:.0f} s for {', '.join(missing)} of {out}: those ranks did not finish; "
                               "check their logs and run again (finished parts are kept)")  # fmt: skip
        time.sleep(0.2)


def build_manifest(parts: list[dict], settings: dict, sequences: Sequences, world: int, chunk_tokens: int) -> dict:
    """The manifest from every rank's part, after checking they cover each sequence once."""
    total = sum(p["sequences"] for p in parts)
    expected = [len(range(r, total, world)) for r in range(world)]
    if [p["sequences"] for p in parts] != expected or (sequences.kind == "shards" and total != sequences.planned):
        raise ExtractError(f"the parts hold {[p['sequences'] for p in parts]} sequences, not a split of "
                           f"{sequences.planned}; remove the part-* folders and run again")  # fmt: skip
    hooks: dict[str, dict] = {}
    for name in settings["hooks"]:
        layouts = [p["hooks"][name] for p in parts if name in p["hooks"]]
        hooks[name] = dict(layouts[0])
        if hooks[name]["storage"] == "csr":
            hooks[name]["nnz"] = sum(layout["nnz"] for layout in layouts)
    tokens = sum(p["tokens"] for p in parts)
    return {
        "format": FORMAT,
        "settings": settings,
        "checkpoint": settings["checkpoint"],
        "model": settings["model"],
        "tokenizer_fingerprint": settings["tokenizer_fingerprint"],
        "dtype": settings["dtype"],
        "seq_len": settings["seq_len"],
        "data": {
            "source": settings["data"],
            "kind": settings["data_kind"],
            "split": settings["split"],
            "document": DOCUMENT_MEANING[sequences.kind],
        },
        "hooks": hooks,
        "tokens": tokens,
        "sequences": total,
        "world_size": world,
        "chunk_tokens": chunk_tokens,
        "bytes": sum(p["bytes"] for p in parts),
        "chunks": [
            {k: v for k, v in c.items() if k != "bytes"} | {"rank": p["rank"]} for p in parts for c in p["chunks"]
        ],
    }


def summarize(manifest: dict, out: Path, *, skipped: bool, seconds: float | None = None) -> dict:
    """The summary dict returned to the CLI, with its one-line ``line``."""
    tokens, names = manifest["tokens"], manifest["settings"]["hooks"]  # the settings keep the model's order
    hooks = {name: manifest["hooks"][name] for name in names}
    mean_l0 = {h: v["nnz"] / max(tokens, 1) for h, v in hooks.items() if v["storage"] == "csr"}
    width = {h: v["shape"][0] for h, v in hooks.items() if v["storage"] == "csr"}
    mb = manifest["bytes"] / 1e6
    if skipped:
        line = f"extract: {out} is complete ({tokens:,} tokens); nothing to do"
    else:
        detail = f"{mb:,.1f} MB"
        if mean_l0:
            widths = set(width.values())
            of = f" of {widths.pop()}" if len(widths) == 1 else ""
            lo, hi = min(mean_l0.values()), max(mean_l0.values())
            mean = sum(mean_l0.values()) / len(mean_l0)
            spread = f" (per hook {lo:.1f} to {hi:.1f})" if len(mean_l0) > 1 else ""
            detail += f"; codes sparse: mean L0 {mean:.1f}{of}{spread}"
        line = f"extract: {tokens:,} tokens x {len(hooks)} hook points -> {out} ({detail})"
    out_dict = {
        "out": str(out),
        "tokens": tokens,
        "sequences": manifest["sequences"],
        "hooks": names,
        "bytes": manifest["bytes"],
        "mean_l0": mean_l0,
        "width": width,
        "world_size": manifest["world_size"],
        "skipped": skipped,
        "line": line,
    }
    if seconds is not None:
        out_dict |= {"seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}
    return out_dict


def extract(
    run: str,
    data: str | None = None,
    hooks: str | Sequence[str] = DEFAULT_HOOKS,
    tokens: int = 100_000,
    out: str | None = None,
    split: str = "validation",
    batch_size: int = 8,
    seq_len: int | None = None,
    dtype: str = "float16",
    device: str = "cpu",
    *,
    sparse: str | Sequence[str] | None = DEFAULT_SPARSE,
    chunk_tokens: int = CHUNK_TOKENS,
    show_progress: bool = True,
    quiet: bool = False,
    wait_timeout: float = WAIT_TIMEOUT,
) -> dict:
    """Extract ``hooks`` of the model at ``run`` over about ``tokens`` tokens of ``data`` into the
    activation store ``out`` (default ``<checkpoint>/activations``); prints one summary line
    (rank 0, unless ``quiet``) and returns the summary. Everything is checked before anything is
    written. ``sparse``: glob patterns of the hooks stored as CSR (ISTA codes by default; add
    ``*.mlp.hook_post`` for the GPT baseline's neurons). ``chunk_tokens``: tokens per chunk file
    (whole sequences; at least one)."""
    started_wall, started = time.time(), time.monotonic()
    tokens = _int(tokens, "--tokens")
    batch_size = _int(batch_size, "--batch_size")
    chunk_tokens = _int(chunk_tokens, "--chunk_tokens")
    if seq_len is not None:
        seq_len = _int(seq_len, "--seq_len")
    dtype = resolve_dtype(dtype)
    if not isinstance(split, str) or not split:
        raise ExtractError(f"--split must be a split name such as validation or train, got {split!r}")
    patterns = split_patterns(hooks)
    if not patterns:
        raise ExtractError("--hooks is empty; give glob patterns such as 'blocks.*.ista.hook_code'")
    rank, world = rank_and_world()

    from crate_lm.checkpoint import load
    from crate_lm.config import to_dict

    loaded = load(run, device=process_device(str(device), world))
    model, cfg = loaded.model, loaded.cfg
    selected = select_hooks(list(model.hook_names()), patterns)
    sparse_patterns = split_patterns(sparse)
    sparse_hooks = [h for h in selected if any(fnmatch.fnmatchcase(h, p) for p in sparse_patterns)]
    limit = cfg.model.max_seq_len
    seq = seq_len or min(cfg.data.seq_len or limit, limit)
    if seq > limit:
        raise ExtractError(f"--seq_len {seq} exceeds the model's context (model.max_seq_len = {limit})")
    sequences = open_sequences(loaded, data, split, seq, tokens)
    reset = bool(cfg.data.reset_at_documents) and sequences.kind == "shards"
    target = Path(out) if out is not None else Path(loaded.path) / "activations"
    target = target.expanduser().absolute()
    settings = json.loads(json.dumps({
        "checkpoint": str(Path(loaded.path).resolve()),
        "model": to_dict(cfg.model),
        "tokenizer_fingerprint": loaded.tokenizer.fingerprint,
        "hooks": selected,
        "sparse": sparse_hooks,
        "dtype": dtype,
        "seq_len": seq,
        "tokens_requested": tokens,
        "data": str(sequences.path),
        "data_kind": sequences.kind,
        "split": sequences.split,
        "reset_at_documents": reset,
    }))  # fmt: skip
    done = existing_store(target, settings)
    if done is not None:
        summary = summarize(done, target, skipped=True)
        if rank == 0 and not quiet:
            print(summary["line"], flush=True)
        return summary | {"rank": rank}
    if rank == 0 and not quiet and sequences.available is not None and sequences.available * seq < tokens:
        print(f"note: the {split} split of {sequences.path} holds {sequences.available} sequences of {seq} tokens, "
              f"fewer than --tokens {tokens:,}; extracting them all", file=sys.stderr, flush=True)  # fmt: skip

    target.mkdir(parents=True, exist_ok=True)
    part = extract_part(model, sequences, target, hooks=selected, sparse=sparse_hooks, settings=settings, rank=rank,
                        world=world, batch_size=batch_size, chunk_tokens=chunk_tokens, dtype=DTYPES[dtype],
                        show_progress=show_progress, reset_at_documents=reset)  # fmt: skip
    if rank != 0:
        return {"out": str(target), "rank": rank, "world_size": world, "tokens": part["tokens"],
                "sequences": part["sequences"], "skipped": False}  # fmt: skip
    others = wait_for_parts(target, world, settings, chunk_tokens, started_wall, wait_timeout)
    manifest = build_manifest([part] + [others[r] for r in range(1, world)], settings, sequences, world, chunk_tokens)
    write_manifest(target, manifest)
    for stale in target.glob(".failed-part-*"):
        stale.unlink(missing_ok=True)
    summary = summarize(manifest, target, skipped=False, seconds=time.monotonic() - started)
    if not quiet:
        print(summary["line"], flush=True)
    return summary | {"rank": 0, "max_buffered_rows": part["max_buffered_rows"]}
