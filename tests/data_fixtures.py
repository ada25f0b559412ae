"""Shared fixtures and helpers for the data-pipeline tests (tests/test_data_*.py).

Test modules load this file with ``pytest_plugins = ["tests.data_fixtures"]`` and import the
plain helpers from it. Everything here is small, synthetic and built in temporary folders: no
network, no downloads. The session fixtures train one tokenizer and prepare one dataset, once.
"""

from __future__ import annotations

import collections
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from crate_lm.data import SourceSpec, Tokenizer, TokenShards, prepare_corpus, train_tokenizer

os.environ["TOKENIZERS_PARALLELISM"] = "false"

WORDS = (
    "the of and to in is was that for on with as by at from his her they this which one all were when "
    "river mountain garden window morning evening silver golden quiet ancient winter summer letter story "
    "merchant captain village harbor lantern forest meadow candle thunder whisper journey stranger "
    "café naïve façade über 漢字 東京 🎉 👍🏽"
).split()

TOKENIZER_VOCAB = 512


def make_documents(n: int, seed: int = 0, *, prefix: str = "Doc") -> list[str]:
    """``n`` distinct one-line English-like documents (with a little non-ASCII), deterministic in ``seed``."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(1, 3)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
        docs.append(f"{prefix} {i}: " + " ".join(sentences))
    return docs


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def decoded_documents(root: Path, tokenizer: Tokenizer, splits: tuple[str, ...] = ("train", "validation")) -> dict:
    """{split: Counter of decoded documents}; asserts every document ends with (and only with) the eod id."""
    eod = tokenizer.eod_id
    out = {}
    for split in splits:
        docs = TokenShards(root, split).documents()
        for doc in docs:
            assert len(doc) >= 2, "a document holds at least one text token and the end-of-document token"
            assert doc[-1] == eod, f"document does not end with eod ({eod}): {doc[-5:]}"
            assert eod not in doc[:-1].tolist(), "eod inside a document"
        out[split] = collections.Counter(tokenizer.decode(doc[:-1]) for doc in docs)
    return out


def all_documents(root: Path, tokenizer: Tokenizer) -> collections.Counter:
    per_split = decoded_documents(root, tokenizer)
    return per_split["train"] + per_split["validation"]


def check_meta(meta: dict, root: Path, tokenizer: Tokenizer) -> None:
    """meta.json agrees with the tokenizer and with the shards it lists."""
    assert meta["format"] == "crate_lm.token_shards.v1"
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"]["fingerprint"] == tokenizer.fingerprint
    assert meta["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    assert meta["settings"]["tokenizer"] == tokenizer.fingerprint
    for split in ("train", "validation"):
        entry = meta["splits"][split]
        assert entry["tokens"] == sum(s["tokens"] for s in entry["shards"])
        assert entry["documents"] == sum(s["documents"] for s in entry["shards"])
        for shard in entry["shards"]:
            assert (root / shard["file"]).stat().st_size == 2 * shard["tokens"]
        shards = TokenShards(root, split)
        assert shards.num_tokens == entry["tokens"]
        assert shards.num_documents == entry["documents"]
        docs = shards.documents()
        assert len(docs) == entry["documents"]
        assert sum(len(d) for d in docs) == entry["tokens"]


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root``: relative path -> (mtime in ns, bytes)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()
    }


def file_bytes(root: Path) -> dict[str, bytes]:
    return {k: v[1] for k, v in snapshot(root).items()}


@dataclass
class Prepared:
    root: Path
    meta: dict
    docs: list[str]
    tokenizer: Tokenizer


@pytest.fixture(scope="session")
def tokenizer_corpus() -> list[str]:
    return make_documents(400, seed=1)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory, tokenizer_corpus) -> Tokenizer:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    out = tmp_path_factory.mktemp("bpe_tokenizer")
    return train_tokenizer(iter(tokenizer_corpus), out, kind="bpe", vocab_size=TOKENIZER_VOCAB)


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory, tokenizer_corpus) -> Tokenizer:
    """A second, different byte-level BPE (smaller vocabulary) for mismatch tests."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    out = tmp_path_factory.mktemp("other_tokenizer")
    return train_tokenizer(tokenizer_corpus, out, kind="bpe", vocab_size=400)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, bpe_tokenizer) -> Prepared:
    """400 one-line documents in 3 text files, prepared with a 20% validation split and small
    shards (so a split spans several shard files)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    base = tmp_path_factory.mktemp("prepared")
    docs = make_documents(400, seed=2)
    for k in range(3):
        write_lines(base / "inputs" / f"part{k}.txt", docs[k::3])
    spec = SourceSpec(inputs=[str(base / "inputs")], text_unit="line")
    root = base / "shards"
    meta = prepare_corpus(
        spec, bpe_tokenizer.path, root, val_fraction=0.2, shard_tokens=1500, chunk_bytes=1000, show_progress=False
    )
    assert meta is not None
    assert len(meta["splits"]["train"]["shards"]) >= 3
    return Prepared(root=root, meta=meta, docs=docs, tokenizer=bpe_tokenizer)


def concatenated(root: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(the split's whole token stream, each token's document number), built from documents()."""
    docs = TokenShards(root, split).documents()
    stream = np.concatenate(docs)
    doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    return stream, doc_of


def write_token_shards(root: Path, shard_doc_lengths: list[np.ndarray], *, vocab_size: int = 512) -> Path:
    """A prepared ``train`` split written directly (no tokenizer): shard k holds documents of the
    given lengths, token j of the split being j % vocab_size. For large synthetic corpora."""
    folder = root / "part-00000-of-00001"
    folder.mkdir(parents=True)
    dtype = np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)
    entries, first = [], 0
    for k, lengths in enumerate(shard_doc_lengths):
        lengths = np.asarray(lengths, dtype=np.int64)
        tokens = int(lengths.sum())
        (np.arange(first, first + tokens) % vocab_size).astype(dtype).tofile(folder / f"train-{k:05d}.bin")
        np.save(folder / f"train-{k:05d}.idx.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        entries.append({"file": f"{folder.name}/train-{k:05d}.bin", "tokens": tokens, "documents": len(lengths)})
        first += tokens
    meta = {
        "format": "crate_lm.token_shards.v1",
        "dtype": dtype.name,
        "tokenizer": {"fingerprint": "synthetic", "vocab_size": vocab_size},
        "splits": {
            "train": {
                "tokens": first,
                "documents": sum(e["documents"] for e in entries),
                "shards": entries,
            }
        },
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def write_checkpoint(folder: Path, cfg, model, *, tokenizer=None, fingerprint: str | None = None, step: int = 1) -> Path:
    """A checkpoint folder in the trainer's layout, written by hand (no DeepSpeed): weights,
    config.yaml, trainer_state.json, the tokenizer (when given) and the COMPLETE marker."""
    from safetensors.torch import save_file

    from crate_lm.checkpoint import write_tokenizer
    from crate_lm.config import dump_run_config

    folder = Path(folder)
    folder.mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.yaml").write_text(dump_run_config(cfg))
    fingerprint = fingerprint or tokenizer.fingerprint
    (folder / "trainer_state.json").write_text(json.dumps({"tokenizer_fingerprint": fingerprint, "step": step}))
    if tokenizer is not None:
        write_tokenizer(folder, tokenizer)
    (folder / "COMPLETE").write_text("")
    return folder
