"""Activation extraction (``crate_lm.interp.extract``) and its store (``crate_lm.interp.store``).

A tiny random-init CRATE checkpoint is written by hand (model.safetensors, config.yaml,
trainer_state.json, tokenizer/, COMPLETE) next to prepared shards. Extracted codes must equal a
direct ``run_with_cache`` on the same input ids exactly, the residual stream within float16
rounding; every stored token traces back to its document and position; an interrupted run leaves
no manifest and a re-run completes; a complete store is never redone nor overwritten; two
processes give the one-process result; a writer never buffers more than a chunk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import crate_lm.interp.extract as extract_module
from crate_lm.checkpoint import load, resolve_run_data
from crate_lm.config import dump_run_config, run_config_from_dict
from crate_lm.data import PackedTokenDataset, SourceSpec, TokenShards, prepare_corpus, train_tokenizer
from crate_lm.errors import CrateLMError
from crate_lm.interp.extract import ExtractError, extract, select_hooks, stop_layer
from crate_lm.interp.store import MANIFEST, ActivationStore, PartWriter, StoreError
from crate_lm.model import build_model
from tests.data_fixtures import make_documents, write_checkpoint, write_lines

ROOT = Path(__file__).resolve().parents[1]
SEQ = 64
HOOKS = "blocks.*.ista.hook_code,blocks.*.hook_resid_post"
NAMES = ["blocks.0.ista.hook_code", "blocks.0.hook_resid_post", "blocks.1.ista.hook_code", "blocks.1.hook_resid_post"]


def have_scipy() -> bool:
    try:
        import scipy.sparse  # noqa: F401
    except ImportError:
        return False
    return True


class Setup:
    def __init__(self, root: Path, checkpoint: Path, shards: Path, corpus: Path) -> None:
        self.root, self.checkpoint, self.shards, self.corpus = root, checkpoint, shards, corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    """Tokenizer, shards with ~9k validation tokens, and a checkpoint folder carrying its tokenizer."""
    root = tmp_path_factory.mktemp("extract")
    docs = make_documents(600, seed=3)
    write_lines(root / "corpus.txt", docs)
    tokenizer = train_tokenizer(iter(docs), root / "tok", vocab_size=300)
    prepare_corpus(SourceSpec(inputs=[str(root / "corpus.txt")], text_unit="line"), root / "tok", root / "shards",
                   val_fraction=0.5, show_progress=False)  # fmt: skip
    cfg = run_config_from_dict(
        {
            "model": {
                "vocab_size": tokenizer.vocab_size,
                "max_seq_len": SEQ,
                "d_model": 32,
                "n_layers": 2,
                "n_heads": 4,
            },  # fmt: skip
            "data": {"path": [str(root / "shards")], "num_workers": 0},
        }
    )
    torch.manual_seed(0)
    folder = write_checkpoint(root / "run" / "checkpoints" / "step_00000001", cfg, build_model(cfg.model),
                              tokenizer=tokenizer)  # fmt: skip
    return Setup(root, folder, root / "shards", root / "corpus.txt")


def run_extract(setup: Setup, out: Path, **kwargs) -> dict:
    args = dict(hooks=HOOKS, tokens=2000, out=str(out), batch_size=5, chunk_tokens=512, show_progress=False)
    return extract(str(setup.checkpoint), **(args | kwargs))


@pytest.fixture(scope="module")
def store(setup: Setup, tmp_path_factory) -> ActivationStore:
    out = tmp_path_factory.mktemp("stores") / "acts"
    summary = run_extract(setup, out, quiet=True)
    assert not summary["skipped"] and summary["tokens"] == 2048  # ceil(2000 / 64) = 32 whole sequences
    return ActivationStore(out)


def direct(setup: Setup, ids: torch.Tensor, batch_size: int = 5) -> dict[str, torch.Tensor]:
    """``run_with_cache`` on ``ids`` (S, T) in the extraction's batches, as (S * T, ...) rows."""
    model = load(str(setup.checkpoint)).model
    out: dict[str, list[torch.Tensor]] = {n: [] for n in NAMES}
    for start in range(0, len(ids), batch_size):
        _, cache = model.run_with_cache(ids[start : start + batch_size], names_filter=NAMES)
        for n in NAMES:
            out[n].append(cache[n].reshape(-1, cache[n].shape[-1]))
    return {n: torch.cat(v) for n, v in out.items()}


def by_sequence(store: ActivationStore) -> dict[str, np.ndarray]:
    """Every stored row (index arrays and the dense form of every hook), ordered by sequence."""
    rows: dict[str, list[np.ndarray]] = {}
    for chunk in store.iter_chunks(format="torch"):
        for key, value in chunk.items():
            if isinstance(value, torch.Tensor):
                value = (value.to_dense() if value.layout == torch.sparse_csr else value).float().numpy()
            rows.setdefault(key, []).append(value)
    joined = {k: np.concatenate(v) for k, v in rows.items()}
    order = np.argsort(joined["seq"] * SEQ + np.arange(len(joined["seq"])) % SEQ, kind="stable")
    return {k: v[order] for k, v in joined.items()}


# ---- the round trip ---------------------------------------------------------------------------


def test_round_trip_equals_a_direct_forward_and_traces_back(setup: Setup, store: ActivationStore) -> None:
    m = store.manifest
    assert store.hooks == NAMES and store.num_tokens == 2048 and len(store) == 4  # 512-token chunks
    assert {h: v["storage"] for h, v in m["hooks"].items()} == {n: "csr" if "code" in n else "dense" for n in NAMES}
    assert m["hooks"]["blocks.0.ista.hook_code"]["shape"] == [128] and m["hooks"]["blocks.0.hook_resid_post"][
        "shape"
    ] == [32]
    assert m["settings"]["data"] == str(setup.shards.resolve()) and m["settings"]["split"] == "validation"
    assert m["world_size"] == 1 and m["seq_len"] == SEQ and m["dtype"] == "float16"
    assert m["checkpoint"] == str(setup.checkpoint.resolve())
    shards = TokenShards(setup.shards, "validation")
    documents, dataset = shards.documents(), PackedTokenDataset(shards, SEQ)
    seen = []
    for chunk in store.iter_chunks(format="torch"):
        seqs = chunk["seq"].reshape(-1, SEQ)[:, 0]
        seen += seqs.tolist()
        ids = torch.from_numpy(chunk["tokens"].reshape(-1, SEQ)).long()
        for s, row in zip(seqs, ids):
            assert np.array_equal(row.numpy(), dataset[int(s)]["input_ids"])
        for t, d, p in zip(chunk["tokens"], chunk["doc"], chunk["pos"]):
            assert documents[d][p] == t
        want = direct(setup, ids)
        for name in NAMES:
            got = chunk[name]
            if "code" in name:
                assert got.layout == torch.sparse_csr and got.values().dtype == torch.float32
                assert torch.equal(got.to_dense(), want[name])  # exactly
                assert got.values().ne(0).all()
            else:
                assert got.dtype == torch.float16 and torch.equal(got, want[name].half())
    assert seen == list(range(32))
    # codes(): one matrix, never densified on the way; dense(): one array, or a memory-mapped file
    name = "blocks.1.ista.hook_code"
    whole = store.codes(name, format="torch")
    assert whole.shape == (2048, 128) and whole.values().numel() == m["hooks"][name]["nnz"]
    rows = by_sequence(store)
    assert torch.equal(whole.to_dense(), torch.from_numpy(rows[name]))
    resid = store.dense("blocks.0.hook_resid_post")
    assert resid.dtype == np.float16 and np.array_equal(resid.astype(np.float32), rows["blocks.0.hook_resid_post"])
    mapped = store.dense("blocks.0.hook_resid_post", out=setup.root / "resid.npy")
    assert np.array_equal(np.load(setup.root / "resid.npy", mmap_mode="r"), mapped)
    assert sum(len(b) for b in store.iter_dense("blocks.1.hook_resid_post")) == 2048
    if have_scipy():
        csr = store.codes(name, format="scipy")
        assert np.array_equal(csr.toarray(), rows[name])
    else:
        with pytest.raises(StoreError, match="scipy"):
            store.codes(name, format="scipy")


def test_summary_line(setup: Setup, tmp_path: Path, capsys) -> None:
    summary = run_extract(setup, tmp_path / "acts", hooks="blocks.0.ista.hook_code", tokens=100)
    line = capsys.readouterr().out.strip()
    assert line == summary["line"] and "\n" not in line
    l0 = summary["mean_l0"]["blocks.0.ista.hook_code"]
    assert 0 < l0 < 128
    assert line.startswith(f"extract: 128 tokens x 1 hook points -> {tmp_path / 'acts'} (")
    assert f"codes sparse: mean L0 {l0:.1f} of 128" in line


def test_head_major_hooks_are_stored_per_token(setup: Setup, tmp_path: Path) -> None:
    """attn.hook_q (B, K, T, p) and attn.hook_pattern (B, K, T, T) come back as (tokens, K, p), (tokens, K, T)."""
    hooks = "blocks.0.attn.hook_q,blocks.0.attn.hook_pattern"
    run_extract(setup, tmp_path / "acts", hooks=hooks, tokens=SEQ * 2, dtype="float32", quiet=True)
    store = ActivationStore(tmp_path / "acts")
    assert store.manifest["hooks"]["blocks.0.attn.hook_q"]["shape"] == [4, 8]
    assert store.manifest["hooks"]["blocks.0.attn.hook_pattern"]["shape"] == [4, SEQ]
    chunk = next(store.iter_chunks(format="torch"))
    ids = torch.from_numpy(chunk["tokens"].reshape(-1, SEQ)).long()
    _, cache = load(str(setup.checkpoint)).model.run_with_cache(ids, names_filter=hooks.split(","))
    for name in hooks.split(","):
        want = cache[name].movedim(1, 2).reshape(ids.numel(), 4, -1)
        assert torch.equal(chunk[name], want), name


def test_text_file_traces_to_lines(setup: Setup, tmp_path: Path) -> None:
    lines = setup.corpus.read_text().splitlines(keepends=True)[:80]
    text = tmp_path / "sample.txt"
    text.write_text("".join(lines))
    run_extract(setup, tmp_path / "acts", data=str(text), hooks="blocks.1.hook_resid_post", tokens=300, quiet=True)
    store = ActivationStore(tmp_path / "acts")
    assert store.num_tokens == 320 and store.settings["data_kind"] == "text" and store.settings["split"] is None
    tok = load(str(setup.checkpoint)).tokenizer
    index = store.index()
    encoded = [tok.encode(line) for line in lines]
    assert [encoded[d][p] for d, p in zip(index["doc"], index["pos"])] == index["tokens"].tolist()
    flat = [i for e in encoded for i in e]
    assert index["tokens"].tolist() == flat[:320]


# ---- settings, re-runs and interruption ------------------------------------------------------------


def test_rerun_is_a_no_op_and_other_settings_are_refused(setup: Setup, store: ActivationStore, capsys) -> None:
    manifest = store.root / MANIFEST
    before = (manifest.stat().st_mtime_ns, sorted(p.name for p in store.root.rglob("*")))
    summary = run_extract(setup, store.root)
    assert summary["skipped"] and summary["tokens"] == 2048
    assert capsys.readouterr().out.strip() == f"extract: {store.root} is complete (2,048 tokens); nothing to do"
    assert (manifest.stat().st_mtime_ns, sorted(p.name for p in store.root.rglob("*"))) == before
    # layout-only settings do not matter
    assert run_extract(setup, store.root, batch_size=3, chunk_tokens=64, quiet=True)["skipped"]
    for change, name in [
        (dict(tokens=3000), "tokens_requested"),
        (dict(hooks="blocks.0.ista.hook_code"), "hooks"),
        (dict(dtype="bfloat16"), "dtype"),
        (dict(seq_len=32), "seq_len"),
        (dict(split="train"), "data"),  # another split: named as the split
    ]:
        with pytest.raises(ExtractError) as err:
            run_extract(setup, store.root, **change)
        message = str(err.value)
        assert "\n" not in message and "never overwritten" in message
        assert (name if name != "data" else "split (there: 'validation', now: 'train')") in message
    assert manifest.stat().st_mtime_ns == before[0]


def test_interrupted_run_leaves_no_manifest_and_a_rerun_completes(
    setup: Setup, store: ActivationStore, tmp_path: Path, monkeypatch
) -> None:
    class Crash(PartWriter):
        def flush(self) -> None:
            if len(self.chunks) == 2:
                raise KeyboardInterrupt  # as if stopped in the middle
            super().flush()

    out = tmp_path / "acts"
    monkeypatch.setattr(extract_module, "PART_WRITER", Crash)
    with pytest.raises(KeyboardInterrupt):
        run_extract(setup, out)
    monkeypatch.undo()
    assert out.is_dir() and not (out / MANIFEST).exists()
    assert not [p for p in out.iterdir()]  # the unfinished part is removed; nothing looks complete
    with pytest.raises(StoreError, match="no manifest.json") as err:
        ActivationStore(out)
    assert "\n" not in str(err.value)
    # a killed process leaves its hidden folder behind: the re-run clears it and finishes
    stale = out / ".incomplete-part-000-999999"
    stale.mkdir()
    (stale / "chunk-00000.npz").write_bytes(b"half")
    summary = run_extract(setup, out, quiet=True)
    assert not summary["skipped"] and not stale.exists()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "part-000"]
    again, reference = by_sequence(ActivationStore(out)), by_sequence(store)
    assert again.keys() == reference.keys()
    assert all(np.array_equal(again[k], reference[k]) for k in reference)


def test_arguments_are_checked_before_anything_is_written(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "acts"
    cases = [
        (dict(tokens=0), "--tokens must be an integer >= 1"),
        (dict(tokens="many"), "--tokens"),
        (dict(batch_size=0), "--batch_size"),
        (dict(dtype="int8"), "--dtype must be one of float16, bfloat16, float32"),
        (dict(hooks="blocks.*.ista.hook_cod"), "blocks.0.ista.hook_code"),
        (dict(hooks="blocks.0.hook_resid_post, nothing_like_it"), "'nothing_like_it' matches no hook point"),
        (dict(data=str(tmp_path / "nowhere")), "no such file or folder"),
        (dict(data=str(tmp_path)), "no prepared data"),
        (dict(split="test"), "no 'test' split"),
        (dict(seq_len=SEQ * 2), "exceeds the model's context"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CrateLMError) as err:
            run_extract(setup, out, **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), (kwargs, str(err.value))
        assert not out.exists()
    foreign = tmp_path / "used"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ExtractError, match="not an unfinished extraction"):
        run_extract(setup, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_hook_selection() -> None:
    names = build_model(run_config_from_dict({"model": {"vocab_size": 50, "max_seq_len": 8, "d_model": 16,
                                                        "n_layers": 3, "n_heads": 2}}).model).hook_names()  # fmt: skip
    assert select_hooks(names, "blocks.*.ista.hook_code") == [f"blocks.{i}.ista.hook_code" for i in range(3)]
    assert select_hooks(names, "blocks.[02].hook_resid_post,hook_embed") == [
        "hook_embed", "blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]  # fmt: skip
    assert select_hooks(names, ("blocks.1.attn.hook_q", "blocks.1.*")) == [
        n for n in names if n.startswith("blocks.1.")
    ]
    assert stop_layer(["blocks.0.ista.hook_code", "hook_embed"], 3) == 1
    assert stop_layer(["blocks.2.ista.hook_code"], 3) is None and stop_layer(["hook_final"], 3) is None


def test_run_data_found_above_the_checkpoint(setup: Setup, tmp_path: Path, monkeypatch) -> None:
    """A run trained from its project root with data.path 'shards', read from elsewhere."""
    monkeypatch.chdir(tmp_path)
    assert resolve_run_data(setup.checkpoint, "shards") == setup.root / "shards"
    assert resolve_run_data(setup.checkpoint, str(setup.shards)) == setup.shards
    with pytest.raises(CrateLMError, match="pass --data SHARDS_OR_TEXT"):
        resolve_run_data(setup.checkpoint, "elsewhere/shards")


def test_documents_reset_as_the_run_trained(setup: Setup, tmp_path: Path) -> None:
    """A run with data.reset_at_documents: positions restart and attention stops at documents."""
    from crate_lm.config import load_run_config

    folder = tmp_path / "reset" / "step_00000001"
    shutil.copytree(setup.checkpoint, folder)
    cfg = load_run_config(folder / "config.yaml")
    cfg.data.reset_at_documents = True
    (folder / "config.yaml").write_text(dump_run_config(cfg))
    summary = extract(str(folder), hooks="blocks.1.ista.hook_code", tokens=SEQ * 3, out=str(tmp_path / "acts"),
                      show_progress=False, quiet=True)  # fmt: skip
    store = ActivationStore(summary["out"])
    assert store.settings["reset_at_documents"] is True
    chunk = next(store.iter_chunks(format="torch"))
    ids, pos, doc = (torch.from_numpy(chunk[k].reshape(-1, SEQ)).long() for k in ("tokens", "pos", "doc"))
    model = load(str(folder)).model
    assert (pos >= SEQ).any()  # a document longer than the context: positions restart with each sequence
    data = PackedTokenDataset(TokenShards(setup.shards, "validation"), SEQ, reset_at_documents=True)
    trained_positions = torch.stack([torch.from_numpy(data[i]["position_ids"]) for i in range(3)])
    _, cache = model.run_with_cache(ids, names_filter="blocks.1.ista.hook_code", position_ids=trained_positions,
                                    document_ids=doc - doc[:, :1])  # fmt: skip
    want = cache["blocks.1.ista.hook_code"].reshape(-1, 128)
    assert torch.equal(chunk["blocks.1.ista.hook_code"].to_dense(), want)
    _, plain = model.run_with_cache(ids, names_filter="blocks.1.ista.hook_code")
    assert not torch.equal(plain["blocks.1.ista.hook_code"].reshape(-1, 128), want)


def test_gpt_baseline_neurons_sparse_on_request(setup: Setup, tmp_path: Path) -> None:
    """The GPT baseline's mlp.hook_post: dense by default, CSR with --sparse '*.mlp.hook_post'."""
    from crate_lm.config import load_run_config

    folder = tmp_path / "gpt" / "step_00000001"
    shutil.copytree(setup.checkpoint, folder)
    cfg = load_run_config(folder / "config.yaml")
    cfg.model.arch = "gpt"
    torch.manual_seed(0)
    model = build_model(cfg.model)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    (folder / "config.yaml").write_text(dump_run_config(cfg))
    common = dict(hooks="blocks.1.mlp.hook_post", tokens=SEQ, show_progress=False, quiet=True)
    dense = ActivationStore(extract(str(folder), out=str(tmp_path / "dense"), **common)["out"])
    sparse = ActivationStore(
        extract(str(folder), out=str(tmp_path / "sparse"), sparse="*.mlp.hook_post", **common)["out"]
    )
    assert not dense.is_sparse("blocks.1.mlp.hook_post") and sparse.is_sparse("blocks.1.mlp.hook_post")
    assert sparse.manifest["hooks"]["blocks.1.mlp.hook_post"]["shape"] == [128]
    ids = torch.from_numpy(sparse.index()["tokens"].reshape(1, SEQ)).long()
    _, cache = load(str(folder)).model.run_with_cache(ids, names_filter="blocks.1.mlp.hook_post")
    want = cache["blocks.1.mlp.hook_post"].reshape(SEQ, 128)
    assert torch.equal(sparse.codes("blocks.1.mlp.hook_post", format="torch").to_dense(), want)
    assert np.array_equal(dense.dense("blocks.1.mlp.hook_post"), want.half().numpy())
    with pytest.raises(ExtractError, match="other settings: sparse"):
        extract(str(folder), out=str(tmp_path / "dense"), sparse="*.mlp.hook_post", **common)


# ---- several processes -------------------------------------------------------------------------


SCRIPT = """
import sys
from crate_lm.interp.extract import extract
extract(sys.argv[1], hooks={hooks!r}, tokens=2000, out=sys.argv[2], batch_size=1, chunk_tokens=512,
        show_progress=False, wait_timeout=120)
"""


def test_two_processes_equal_one(setup: Setup, tmp_path: Path) -> None:
    single = tmp_path / "one"
    run_extract(setup, single, batch_size=1, quiet=True)  # batches of one: numerics independent of the split
    out = tmp_path / "two"
    env = dict(os.environ, WORLD_SIZE="2", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    script = SCRIPT.format(hooks=HOOKS)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(setup.checkpoint), str(out)],
            env=env | {"RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in (1, 0)
    ]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    rank0_out, rank1_out = results[1][0], results[0][0]
    assert rank0_out.startswith("extract: 2,048 tokens x 4 hook points") and rank1_out == ""
    two = ActivationStore(out)
    assert two.manifest["world_size"] == 2 and sorted(p.name for p in out.iterdir()) == [
        MANIFEST,
        "part-000",
        "part-001",
    ]
    parts = {r: [c["file"] for c in two.chunks if c["rank"] == r] for r in (0, 1)}
    assert all(f.startswith(f"part-00{r}/") for r in (0, 1) for f in parts[r]) and parts[0] and parts[1]
    for chunk in two.iter_chunks(hook=[]):  # rank r holds sequences r, r + 2, ...
        rank = int(chunk["seq"][0] % 2)
        assert (chunk["seq"] % 2 == rank).all()
    a, b = by_sequence(two), by_sequence(ActivationStore(single))
    assert np.array_equal(np.unique(a["seq"]), np.arange(32)) and len(a["seq"]) == 2048  # each sequence once
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)
    # the same extraction with one process now has nothing to do
    assert run_extract(setup, out, batch_size=1, quiet=True)["skipped"]


def test_rank0_waits_and_keeps_finished_parts(setup: Setup, tmp_path: Path, monkeypatch) -> None:
    """In-process ranks: rank 0 alone times out (no manifest), rank 1 then finishes its part, and
    rank 0 run again keeps its finished part and writes the manifest."""
    out = tmp_path / "acts"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ExtractError, match="waited 0 s for part-001"):
        run_extract(setup, out, wait_timeout=0.0, quiet=True)
    assert (out / "part-000" / "part.json").is_file() and not (out / MANIFEST).exists()
    kept = (out / "part-000" / "part.json").stat().st_mtime_ns
    monkeypatch.setenv("RANK", "1")
    assert run_extract(setup, out)["rank"] == 1 and not (out / MANIFEST).exists()
    monkeypatch.setenv("RANK", "0")
    summary = run_extract(setup, out, wait_timeout=5.0, quiet=True)
    assert summary["tokens"] == 2048 and (out / "part-000" / "part.json").stat().st_mtime_ns == kept
    # a rank that fails tells rank 0, which stops waiting at once
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / ".failed-part-001").write_text("RuntimeError: out of memory")
    with pytest.raises(ExtractError, match="rank 1 of 2 failed .RuntimeError: out of memory"):
        run_extract(setup, failed, wait_timeout=60.0, quiet=True)


# ---- storage on synthetic tensors ------------------------------------------------------------------


class Counting(PartWriter):
    """Counts the token rows actually held: in the buffers being filled (``peak``, measured when
    they become a chunk) and, in addition, in the chunk being written in the background
    (``peak_held``, measured after every batch and around every write)."""

    peak = peak_held = writing = 0
    lock = threading.Lock()

    def buffered(self) -> int:
        held = [sum(len(a) for a in self._meta["tokens"])]
        held += [sum(len(a) for a in pieces) for pieces in self._dense.values()]
        held += [sum(len(p[0]) for p in pieces) for pieces in self._csr.values()]
        return max(held)

    def note(self) -> None:
        with Counting.lock:
            Counting.peak_held = max(Counting.peak_held, self.buffered() + Counting.writing)

    def add(self, *args, **kwargs) -> None:
        super().add(*args, **kwargs)
        self.note()

    def flush(self) -> None:
        Counting.peak = max(Counting.peak, self.buffered())
        super().flush()

    def _write(self, path, entry, meta, csr, dense) -> None:
        rows = sum(len(a) for a in meta["tokens"])
        with Counting.lock:
            Counting.writing += rows
        self.note()
        try:
            super()._write(path, entry, meta, csr, dense)
        finally:
            with Counting.lock:
                Counting.writing -= rows


def test_buffered_rows_stay_within_one_chunk(setup: Setup, tmp_path: Path, monkeypatch) -> None:
    """Memory is bounded by the chunk size, whatever the number of tokens: a chunk filling
    (<= C rows) plus at most one being written (<= C rows)."""
    monkeypatch.setattr(extract_module, "PART_WRITER", Counting)
    Counting.peak = Counting.peak_held = 0
    summary = run_extract(setup, tmp_path / "acts", tokens=4000, batch_size=8, chunk_tokens=192, quiet=True)
    assert summary["tokens"] == 4032 and summary["max_buffered_rows"] <= 192 and 0 < Counting.peak <= 192
    assert 192 <= Counting.peak_held <= 2 * 192 and Counting.writing == 0
    store = ActivationStore(tmp_path / "acts")
    assert all(c["tokens"] <= 192 for c in store.chunks) and len(store) == 21  # 63 sequences, 3 a chunk
    # a chunk never splits a sequence, so a chunk smaller than a sequence holds one
    Counting.peak = 0
    run_extract(setup, tmp_path / "small", hooks="blocks.0.hook_resid_post", tokens=256, chunk_tokens=10, quiet=True)
    assert Counting.peak == SEQ and len(ActivationStore(tmp_path / "small")) == 4


def write_synthetic(folder: Path, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], ActivationStore]:
    """Two batches through a PartWriter, then a manifest by hand: a store of known tensors."""
    from crate_lm.interp.extract import build_manifest, summarize

    torch.manual_seed(1)
    s, t = 6, 4
    code = torch.relu(torch.randn(s, t, 10)) * (torch.rand(s, t, 10) > 0.7)
    acts = {"blocks.0.ista.hook_code": code, "blocks.0.attn.hook_q": torch.randn(s, 2, t, 3),
            "blocks.0.hook_resid_post": torch.randn(s, t, 5)}  # fmt: skip
    part_dir = folder / "part-000"
    part_dir.mkdir(parents=True)
    writer = PartWriter(part_dir, ["blocks.0.ista.hook_code"], ["blocks.0.attn.hook_q", "blocks.0.hook_resid_post"],
                        t, chunk_tokens=12, dtype=dtype, prefix="part-000/")  # fmt: skip
    tokens = np.arange(s * t).reshape(s, t)
    for rows in (slice(0, 5), slice(5, 6)):  # 5 sequences straddle the 3-sequence chunks
        writer.add(
            tokens[rows], tokens[rows] // 7, tokens[rows] % 7, np.arange(s)[rows], {k: v[rows] for k, v in acts.items()}
        )
    chunks = writer.finish()
    part = {"rank": 0, "sequences": s, "tokens": writer.tokens, "bytes": writer.bytes, "chunks": chunks,
            "hooks": {k: v.to_json() for k, v in writer.layouts.items()}}  # fmt: skip

    class Plan:
        kind, planned = "text", s

    settings = {"hooks": list(acts), "checkpoint": "x", "model": {}, "tokenizer_fingerprint": "f", "dtype": str(dtype),
                "seq_len": t, "data": "d", "data_kind": "text", "split": None}  # fmt: skip
    manifest = build_manifest([part], settings, Plan(), 1, 12)  # type: ignore[arg-type]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert summarize(manifest, folder, skipped=False)["tokens"] == s * t
    return acts, ActivationStore(folder)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_storage_of_synthetic_tensors(tmp_path: Path, dtype: torch.dtype) -> None:
    acts, store = write_synthetic(tmp_path / "store", dtype)
    assert [c["tokens"] for c in store.chunks] == [12, 12]
    layout = store.manifest["hooks"]
    assert layout["blocks.0.attn.hook_q"]["shape"] == [2, 3]  # stored token-major
    assert layout["blocks.0.hook_resid_post"]["stored_as"] == ("uint16" if dtype == torch.bfloat16 else str(dtype)[6:])
    code = acts["blocks.0.ista.hook_code"]
    assert layout["blocks.0.ista.hook_code"]["nnz"] == int((code != 0).sum())
    assert layout["blocks.0.ista.hook_code"]["index_dtype"] == "uint16"
    torch_rows = by_sequence_synthetic(store, "torch")
    q = acts["blocks.0.attn.hook_q"].movedim(2, 1).reshape(24, 2, 3).to(dtype)
    assert torch.equal(torch_rows["blocks.0.attn.hook_q"], q)  # bf16 kept exactly as bf16
    assert torch.equal(
        torch_rows["blocks.0.hook_resid_post"], acts["blocks.0.hook_resid_post"].reshape(24, 5).to(dtype)
    )
    assert torch.equal(store.codes("blocks.0.ista.hook_code", format="torch").to_dense(), code.reshape(24, 10))
    resid = store.dense("blocks.0.hook_resid_post")  # numpy: bf16 widened to float32, exactly
    assert np.array_equal(
        resid.astype(np.float32), acts["blocks.0.hook_resid_post"].reshape(24, 5).to(dtype).float().numpy()
    )
    index = store.index()
    assert np.array_equal(index["tokens"], np.arange(24)) and np.array_equal(index["pos"], np.arange(24) % 7)
    assert np.array_equal(index["seq"], np.repeat(np.arange(6), 4))
    with pytest.raises(StoreError, match="stored sparse"):
        store.dense("blocks.0.ista.hook_code")
    with pytest.raises(StoreError, match="no hook point 'nope'"):
        next(store.iter_chunks("nope"))


def by_sequence_synthetic(store: ActivationStore, fmt: str) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for chunk in store.iter_chunks(format=fmt):
        for k in store.hooks:
            parts.setdefault(k, []).append(chunk[k])
    return {k: torch.cat(v) if v[0].layout == torch.strided else v for k, v in parts.items()}


def test_store_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    for folder in (tmp_path, tmp_path / "absent"):
        with pytest.raises(StoreError) as err:
            ActivationStore(folder)
        assert "\n" not in str(err.value) and "not a complete activation store" in str(err.value)


def test_extract_command_from_another_directory_and_its_errors(setup: Setup, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "crate_lm.cli", "extract", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    out = tmp_path / "acts"
    proc = cli(str(setup.checkpoint), "--data", str(setup.shards), "--tokens", "512", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "extract: " in proc.stdout and (out / MANIFEST).is_file()
    for args, message in [
        (["/nowhere"], "no such run"),
        ([str(setup.checkpoint), "--hooks", "blocks.*.isat", "--out", str(tmp_path / "x")], "matches no hook point"),
        ([str(setup.checkpoint), "--data", str(setup.shards), "--tokens", "1024", "--out", str(out)], "other settings"),
    ]:
        proc = cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors
    assert not (tmp_path / "x").exists(), "nothing written for a refused command"
