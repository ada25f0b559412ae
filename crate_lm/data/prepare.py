"""Corpus -> token shards: parallel tokenisation, deterministic train/validation split, multi-node
parts, atomic writes. See ``shards.py`` for the format.

One call prepares worker ``worker`` of ``num_workers`` (each node of a cluster runs one) and,
once every part is present, writes ``meta.json``. Running again over finished output is a
no-op; output prepared with other settings is never overwritten.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from crate_lm.data.errors import DataError
from crate_lm.data.shards import FORMAT, SPLITS, ShardWriter, read_meta, token_dtype, write_part_manifest
from crate_lm.data.sources import ReadTask, SourceSpec, dataset_documents, read_task, resolve_files, split_into_tasks
from crate_lm.data.tokenizer import load_tokenizer
from crate_lm.fsutil import atomic_write_json

_worker: dict = {}


def is_validation(text: str, val_fraction: float) -> bool:
    """Deterministic split by document content: the same document always lands in the same split."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


def _init_worker(tokenizer_path: str, spec: SourceSpec, val_fraction: float) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_tokenizer(tokenizer_path)
    _worker.update(
        tokenizer=tokenizer, spec=spec, val_fraction=val_fraction, dtype=token_dtype(tokenizer.vocab_size)
    )  # results come back in the shard dtype: less to send between processes


def _encode(item: ReadTask | list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read (a piece of a file, or given texts), tokenise, append end-of-document, group by split."""
    texts = list(read_task(item, _worker["spec"])) if isinstance(item, ReadTask) else item
    tok, val_fraction = _worker["tokenizer"], _worker["val_fraction"]
    eod = tok.eod_id
    out = {}
    groups = {"train": [], "validation": []}
    for text in texts:
        groups["validation" if is_validation(text, val_fraction) else "train"].append(text)
    for split, docs in groups.items():
        flat: list[int] = []
        lengths = []
        for ids in tok.encode_batch(docs) if docs else []:
            flat.extend(ids)
            flat.append(eod)
            lengths.append(len(ids) + 1)
        out[split] = (np.array(flat, dtype=_worker["dtype"]), np.array(lengths, dtype=np.int64))
    return out


def _chunks(docs: Iterator[str], chunk_bytes: int) -> Iterator[list[str]]:
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _parallel_map(fn, items: Iterator, num_proc: int, init_args: tuple) -> Iterator:
    """Ordered map with at most 8 * num_proc tasks in flight (bounded memory on huge inputs; enough
    slack that a slow task at the head of the line does not leave workers idle)."""
    if num_proc <= 1:
        _init_worker(*init_args)
        yield from map(fn, items)
        return
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 8 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _changed(old: dict, new: dict) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def part_name(worker: int, num_workers: int) -> str:
    return f"part-{worker:05d}-of-{num_workers:05d}"


def prepare_corpus(
    spec: SourceSpec,
    tokenizer_path: str | Path,
    out: str | Path,
    *,
    val_fraction: float = 0.01,
    num_proc: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    shard_tokens: int = 100_000_000,
    chunk_bytes: int = 1 << 16,
    show_progress: bool = True,
) -> dict | None:
    """Prepare this worker's part of the corpus; returns the merged metadata once all parts exist."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= worker < num_workers:
        raise DataError(f"worker index {worker} is outside 0..{num_workers - 1}")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes give the parallelism; no threads inside each
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.eod_id  # noqa: B018 - fails early, with the fix, if there is no end-of-document token
    out = Path(out)
    files = resolve_files(spec.inputs) if spec.inputs else []
    sources = [{"file": str(f), "bytes": f.stat().st_size} for f in files]
    if spec.dataset:
        sources.append({"dataset": spec.dataset, "config": spec.dataset_config, "split": spec.dataset_split})
    dtype = token_dtype(tokenizer.vocab_size)
    settings = {
        "tokenizer": tokenizer.fingerprint,
        "val_fraction": val_fraction,
        "text_field": spec.text_field,
        "text_unit": spec.text_unit,
        "encoding_errors": spec.encoding_errors,
        "shard_tokens": shard_tokens,
        "num_workers": num_workers,
        "dtype": dtype.name,
        "sources": sources,
    }

    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = read_meta(out)
        if meta.get("settings") != settings:
            changed = _changed(meta.get("settings", {}), settings)
            raise DataError(
                f"{out} already holds data prepared with other settings (differs in: {', '.join(changed)}); "
                "choose a new --out folder, or delete that one to prepare it again"
            )
        print(f"prepare: {out} is already prepared with these settings; nothing to do")
        return meta

    out.mkdir(parents=True, exist_ok=True)
    name = part_name(worker, num_workers)
    final = out / name
    for other in sorted(out.glob("part-*/part.json")):  # parts of other workers must agree too
        prior = json.loads(other.read_text()).get("settings", {})
        changed = _changed(prior, settings)
        if changed:
            raise DataError(
                f"{other.parent} was prepared with other settings (differs in: {', '.join(changed)}); "
                "run every worker with the same settings, or choose a new --out folder"
            )
    if (final / "part.json").is_file():
        print(f"prepare: {name} is already complete")
    else:
        _prepare_part(
            spec, tokenizer, files[worker::num_workers], out, settings, worker, num_proc, chunk_bytes, show_progress
        )
    return merge_parts(out, num_workers)


def _prepare_part(spec, tokenizer, files, out, settings, worker, num_proc, chunk_bytes, show_progress) -> None:
    """Tokenise this worker's share into a hidden folder, then rename it into place."""
    num_workers, val_fraction = settings["num_workers"], settings["val_fraction"]
    name = part_name(worker, num_workers)
    tmp = out / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run: never taken for data
    tmp.mkdir()
    dtype = np.dtype(settings["dtype"])
    writers = {split: ShardWriter(tmp, split, dtype, settings["shard_tokens"]) for split in SPLITS}

    def work_items() -> Iterator[ReadTask | list[str]]:
        for f in files:  # workers read these pieces themselves
            yield from split_into_tasks(f, spec, chunk_bytes)
        if spec.dataset:  # a dataset streams through this process, in chunks of documents
            yield from _chunks(dataset_documents(spec, worker, num_workers), chunk_bytes)

    start = time.perf_counter()
    counts = {split: [0, 0] for split in SPLITS}
    bar = tqdm(desc=f"tokenizing {name}", unit="tok", unit_scale=True, disable=not show_progress)
    try:
        init_args = (str(tokenizer.path), spec, val_fraction)
        for result in _parallel_map(_encode, work_items(), num_proc, init_args):
            for split, (tokens, lengths) in result.items():
                writers[split].write(tokens, lengths)
                counts[split][0] += int(tokens.size)
                counts[split][1] += len(lengths)
                bar.update(int(tokens.size))
        bar.close()
        splits = {
            split: {"tokens": counts[split][0], "documents": counts[split][1], "shards": writers[split].finish()}
            for split in SPLITS
        }
        if num_workers == 1 and counts["train"][1] + counts["validation"][1] == 0:
            listed = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            raise DataError(
                f"empty corpus: {listed or spec.dataset} hold(s) no document with text; "
                "check the paths, --text_field and --text_unit"
            )
        write_part_manifest(
            tmp,
            {
                "settings": settings,
                "tokenizer": tokenizer.describe(),
                "files": [str(f) for f in files],
                "splits": splits,
            },
        )
        final = out / name
        if final.exists():  # a folder without part.json is never data: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        bar.close()
        for w in writers.values():
            w.finish()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - start
    total = counts["train"][0] + counts["validation"][0]
    print(
        f"prepare: {name}: {counts['train'][1]} train / {counts['validation'][1]} validation documents, "
        f"{total:,} tokens in {elapsed:.1f}s ({total / max(elapsed, 1e-9):,.0f} tokens/s, {num_proc} process(es))"
    )


def merge_parts(out: str | Path, num_workers: int) -> dict | None:
    """Write ``meta.json`` from the parts' manifests once all ``num_workers`` parts are complete."""
    out = Path(out)
    manifests = []
    for w in range(num_workers):
        path = out / part_name(w, num_workers) / "part.json"
        if not path.is_file():
            done = sum((out / part_name(i, num_workers) / "part.json").is_file() for i in range(num_workers))
            print(f"prepare: {done} of {num_workers} parts complete; meta.json is written when the last one finishes")
            return None
        manifests.append(json.loads(path.read_text()))
    settings = manifests[0]["settings"]
    for w, m in enumerate(manifests[1:], 1):
        changed = _changed(settings, m["settings"])
        if changed:
            raise DataError(
                f"{out / part_name(w, num_workers)} was prepared with other settings than part 0 "
                f"(differs in: {', '.join(changed)}); prepare every part with the same settings"
            )
    splits = {}
    for split in SPLITS:
        shards = [
            {**s, "file": f"{part_name(w, num_workers)}/{s['file']}"}
            for w, m in enumerate(manifests)
            for s in m["splits"][split]["shards"]
        ]
        splits[split] = {
            "tokens": sum(m["splits"][split]["tokens"] for m in manifests),
            "documents": sum(m["splits"][split]["documents"] for m in manifests),
            "shards": shards,
        }
    if splits["train"]["documents"] + splits["validation"]["documents"] == 0:
        raise DataError(f"empty corpus: no part in {out} holds any document; check the inputs and --text_field")
    meta = {
        "format": FORMAT,
        "dtype": settings["dtype"],
        "tokenizer": manifests[0]["tokenizer"],
        "splits": splits,
        "sources": settings["sources"],
        "settings": settings,
    }
    atomic_write_json(out / "meta.json", meta)
    print(
        f"prepare: {out}: {splits['train']['tokens']:,} train tokens in {splits['train']['documents']:,} documents, "
        f"{splits['validation']['tokens']:,} validation tokens; dtype {settings['dtype']}"
    )
    return meta
