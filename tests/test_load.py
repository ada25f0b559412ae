"""Opening a trained model: ``crate_lm.load`` on a run folder, a checkpoint folder or an exported
folder, from any working directory. Checkpoints carry their tokenizer (``tokenizer/``); older
ones find it through the run's relative data paths, from the current directory or a folder
above the run. Checkpoint folders are written by hand in the layout ``save_checkpoint`` writes
(no DeepSpeed), except the one end-to-end test on a real training run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import crate_lm
from crate_lm.checkpoint import (
    CheckpointError,
    LoadedModel,
    load,
    load_model,
    load_run_tokenizer,
    weights_metadata,
    write_tokenizer,
)
from crate_lm.config import RunConfig, dump_run_config, run_config_from_dict
from crate_lm.data import SourceSpec, Tokenizer, load_tokenizer, prepare_corpus, train_tokenizer
from crate_lm.model import build_model
from tests.data_fixtures import make_documents, write_lines
from tests.test_train import corpus, single  # noqa: F401 - fixtures of the end-to-end test

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 64
STEP = "step_00000001"
TEXTS = ["The river runs.", "A", "Café by the old bridge, 東京 at night!"]


def env() -> dict:
    e = dict(os.environ)
    e.update(WANDB_MODE="disabled", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    return e


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crate_lm.cli", *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=120
    )


class Repo:
    """A project folder as a user has it: ``data/tok`` and ``data/shards`` prepared from inside
    it, so the data's meta.json and run configs hold paths relative to it."""

    def __init__(self, root: Path, tokenizer: Tokenizer, other: Tokenizer) -> None:
        self.root, self.tokenizer, self.other = root, tokenizer, other


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    root = tmp_path_factory.mktemp("load") / "repo"
    root.mkdir()
    before = Path.cwd()
    os.chdir(root)
    try:
        docs = make_documents(200, seed=5)
        write_lines(Path("data/corpus.txt"), docs)
        tokenizer = train_tokenizer(iter(docs), "data/tok", vocab_size=300)
        prepare_corpus(SourceSpec(inputs=["data/corpus.txt"], text_unit="line"), "data/tok", "data/shards",
                       val_fraction=0.1, show_progress=False)  # fmt: skip
        other = train_tokenizer(iter(make_documents(200, seed=9, prefix="Other")), "other_tok", vocab_size=300)
    finally:
        os.chdir(before)
    meta = json.loads((root / "data/shards/meta.json").read_text())
    assert meta["tokenizer"]["path"] == "data/tok/tokenizer.json"  # relative: the premise of walking up
    assert tokenizer.fingerprint != other.fingerprint
    return Repo(root, load_tokenizer(root / "data/tok"), load_tokenizer(root / "other_tok"))


def run_config(vocab_size: int, **data: object) -> RunConfig:
    return run_config_from_dict(
        {
            "model": {"vocab_size": vocab_size, "max_seq_len": CONTEXT, "d_model": 32, "n_layers": 2, "n_heads": 4},
            "data": {"path": ["data/shards"], "num_workers": 0} | data,
        }
    )


def write_run(
    run: Path, cfg: RunConfig, fingerprint: str | None, tokenizer: Tokenizer | None = None, *, name: str = STEP
) -> Path:
    """``run/checkpoints/<name>`` as ``save_checkpoint`` writes it (``tokenizer/`` only when
    ``tokenizer`` is given: without it, a checkpoint from before checkpoints carried one)."""
    folder = run / "checkpoints" / name
    folder.mkdir(parents=True)
    write_weights(folder, cfg)
    state = {"step": 1, "sound": True} | ({"tokenizer_fingerprint": fingerprint} if fingerprint else {})
    (folder / "trainer_state.json").write_text(json.dumps(state))
    if tokenizer is not None:
        write_tokenizer(folder, tokenizer)
    (folder / "COMPLETE").write_text("")
    return folder


def write_weights(folder: Path, cfg: RunConfig) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata=weights_metadata(cfg))
    (folder / "config.yaml").write_text(dump_run_config(cfg))
    return state


def new_run(repo: Repo, run: Path, *, carry_tokenizer: bool = True, **data: object) -> Path:
    tok = repo.tokenizer
    return write_run(run, run_config(tok.vocab_size, **data), tok.fingerprint, tok if carry_tokenizer else None)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def lm(repo: Repo, tmp_path: Path) -> LoadedModel:
    return load(new_run(repo, tmp_path / "run"))


# ---- the tokenizer travels with the checkpoint ---------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_write_tokenizer_copies_the_exact_tokenizer(kind: str, tmp_path: Path) -> None:
    docs = make_documents(120, seed=1)
    tok = train_tokenizer(iter(docs), tmp_path / "tok", kind=kind, vocab_size=400)
    source = tok.path
    folder = tmp_path / STEP
    folder.mkdir()
    assert write_tokenizer(folder, tok) == folder / "tokenizer"
    copy = load_tokenizer(folder / "tokenizer")
    assert copy.fingerprint == tok.fingerprint and copy.specials == tok.specials and copy.kind == tok.kind
    assert copy.path == folder / "tokenizer" / ("tokenizer.json" if kind == "bpe" else "tokenizer.model")
    assert copy.encode(docs[0]) == tok.encode(docs[0])
    info = json.loads((folder / "tokenizer" / "tokenizer_info.json").read_text())
    assert info["fingerprint"] == tok.fingerprint and info["copied_from"] == str(source)
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer"]  # no temporary folder left behind
    # the bytes that were fingerprinted are written, even if the file on disk changed since
    source.write_bytes(source.read_bytes() + b" ")
    write_tokenizer(folder, tok)  # replaces the earlier copy
    assert load_tokenizer(folder / "tokenizer").fingerprint == tok.fingerprint


def test_a_foreign_tokenizer_file_name_is_saved_under_the_name_load_tokenizer_finds(repo: Repo, tmp_path) -> None:
    named = tmp_path / "my-vocab.json"
    shutil.copy(repo.tokenizer.path, named)
    folder = tmp_path / STEP
    folder.mkdir()
    write_tokenizer(folder, load_tokenizer(named))
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    assert load_tokenizer(folder / "tokenizer").fingerprint == repo.tokenizer.fingerprint


# ---- where load finds things -------------------------------------------------------------------


def test_load_from_a_run_folder_and_a_checkpoint_folder(repo: Repo, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = new_run(repo, run)
    latest = write_run(run, run_config(repo.tokenizer.vocab_size), repo.tokenizer.fingerprint, repo.tokenizer,
                       name="step_00000002")  # fmt: skip
    for path, folder in ((run, latest), (first, first), (str(first), first)):
        lm = load(path)
        assert isinstance(lm, LoadedModel) and lm.path == folder
        assert lm.tokenizer.fingerprint == repo.tokenizer.fingerprint
        assert lm.tokenizer.path.parent == folder / "tokenizer"
        assert lm.cfg.model.d_model == 32 and not lm.model.training
    assert crate_lm.load is load and crate_lm.LoadedModel is LoadedModel


def test_a_copied_run_loads_from_anywhere_without_its_data(repo: Repo, tmp_path: Path, monkeypatch) -> None:
    project = tmp_path / "project"
    shutil.copytree(repo.root, project)
    original = project / "runs" / "default"
    folder = new_run(repo, original)
    moved = tmp_path / "elsewhere" / "default"
    shutil.copytree(original, moved)
    shutil.rmtree(project)  # the run's data, tokenizer and original folder are gone
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    lm = load(moved)
    assert lm.path == moved / "checkpoints" / folder.name
    assert lm.tokenizer.path == lm.path / "tokenizer" / "tokenizer.json"
    assert lm.tokenizer.fingerprint == repo.tokenizer.fingerprint
    assert lm.to_string(lm.to_tokens(TEXTS[0])[0]) == TEXTS[0]


@pytest.mark.parametrize("via", ["meta", "data.tokenizer"])
def test_an_old_checkpoint_finds_the_run_tokenizer_by_relative_paths(
    via: str, repo: Repo, tmp_path: Path, monkeypatch
) -> None:
    """A checkpoint without tokenizer/ (saved before they carried one), in repo/runs/<name>,
    trained from repo with data/... paths."""
    data = {"tokenizer": "data/tok"} if via == "data.tokenizer" else {}
    run = repo.root / "runs" / f"old-{via.replace('.', '-')}"
    folder = new_run(repo, run, carry_tokenizer=False, **data)
    try:
        assert not (folder / "tokenizer").exists()
        monkeypatch.chdir(repo.root)  # as today: from the folder the run was trained in
        lm = load(Path("runs") / run.name)
        assert lm.tokenizer.fingerprint == repo.tokenizer.fingerprint
        elsewhere = tmp_path / "cwd"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)  # from anywhere else: walking up from the run finds repo/data
        lm = load(run)
        assert lm.tokenizer.path.resolve() == (repo.root / "data/tok/tokenizer.json").resolve()
        assert load_run_tokenizer(run).fingerprint == repo.tokenizer.fingerprint
    finally:
        shutil.rmtree(run)


def test_walking_up_passes_over_a_wrong_tokenizer_at_the_same_relative_path(repo: Repo, tmp_path, monkeypatch):
    run = repo.root / "runs" / "old-shadowed"
    new_run(repo, run, carry_tokenizer=False, tokenizer="data/tok")
    try:
        cwd = tmp_path / "cwd"
        shutil.copytree(repo.root / "other_tok", cwd / "data" / "tok")  # another tokenizer at data/tok
        monkeypatch.chdir(cwd)
        assert load(run).tokenizer.fingerprint == repo.tokenizer.fingerprint
        moved = tmp_path / "moved"
        shutil.copytree(run, moved)  # away from repo: only the wrong one is found
        with pytest.raises(CheckpointError) as err:
            load(moved)
        message = one_line(err)
        assert f"trained with tokenizer {repo.tokenizer.fingerprint}" in message and "tokenizer=" in message
    finally:
        shutil.rmtree(run)


def test_no_tokenizer_anywhere_is_a_one_line_error_naming_tokenizer_arg(repo: Repo, tmp_path, monkeypatch) -> None:
    run = tmp_path / "lonely"
    folder = new_run(repo, run, carry_tokenizer=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load(run)
    message = one_line(err)
    assert "tokenizer=" in message and str(folder) in message and "data/shards/meta.json" in message
    lm = load(run, tokenizer=repo.root / "data" / "tok")  # the way out the message names
    assert lm.tokenizer.fingerprint == repo.tokenizer.fingerprint


def test_the_tokenizer_argument_overrides(repo: Repo, lm: LoadedModel, tmp_path: Path) -> None:
    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    shutil.copy(repo.tokenizer.path, copy)
    for given in (copy, str(copy), copy.parent):
        assert load(lm.path, tokenizer=given).tokenizer.path == copy
    tok = load_tokenizer(copy)
    assert load(lm.path, tokenizer=tok).tokenizer is tok
    assert load_run_tokenizer(lm.path, tokenizer=copy).path == copy


@pytest.mark.parametrize("where", ["argument", "object", "checkpoint"])
def test_a_tokenizer_of_another_fingerprint_is_refused(where: str, repo: Repo, lm: LoadedModel) -> None:
    if where == "checkpoint":
        write_tokenizer(lm.path, repo.other)  # the checkpoint's tokenizer/ replaced
        given = None
    else:
        given = repo.other if where == "object" else repo.other.path
    with pytest.raises(CheckpointError) as err:
        load(lm.path, tokenizer=given)
    message = one_line(err)
    assert f"trained with tokenizer {repo.tokenizer.fingerprint}" in message
    assert repo.other.fingerprint in message and "tokenizer=" in message


def test_an_exported_folder_loads(repo: Repo, tmp_path: Path, monkeypatch) -> None:
    export = tmp_path / "export"
    export.mkdir()
    state = write_weights(export, run_config(repo.tokenizer.vocab_size))
    write_tokenizer(export, repo.tokenizer)
    monkeypatch.chdir(tmp_path)
    lm = load("export")
    assert lm.path == Path("export") and lm.tokenizer.fingerprint == repo.tokenizer.fingerprint
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())
    shutil.rmtree(export / "tokenizer")  # without one, and its data paths lead nowhere
    with pytest.raises(CheckpointError, match="tokenizer="):
        load(export)
    # a tokenizer larger than the model's embedding cannot be the one it was trained with
    big = train_tokenizer(iter(make_documents(200, seed=2)), tmp_path / "big", vocab_size=400)
    with pytest.raises(CheckpointError, match="more than the model's embedding"):
        load(export, tokenizer=big)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a crate_lm checkpoint"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load(tmp_path / "nowhere")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load(tmp_path)


def test_load_model_and_load_run_tokenizer_keep_working(repo: Repo, lm: LoadedModel) -> None:
    model, cfg = load_model(lm.path.parent.parent)
    assert cfg == lm.cfg and not model.training
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert load_run_tokenizer(lm.path, cfg).fingerprint == repo.tokenizer.fingerprint


# ---- the model and its text ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float64"])
def test_the_model_is_in_eval_mode_on_the_requested_dtype(dtype, lm: LoadedModel) -> None:
    loaded = load(lm.path, dtype=dtype, device="cpu")
    want = torch.bfloat16 if dtype is torch.bfloat16 else torch.float64
    assert not loaded.model.training and not any(m.training for m in loaded.model.modules())
    assert {p.dtype for p in loaded.model.parameters()} == {want}
    assert loaded.device == torch.device("cpu")
    assert loaded(loaded.to_tokens("The river")).logits.dtype == want
    with pytest.raises(CheckpointError, match="not a torch dtype"):
        load(lm.path, dtype="float77")


def test_to_tokens_of_a_string(lm: LoadedModel) -> None:
    tok = lm.tokenizer
    ids = lm.to_tokens(TEXTS[0])
    assert ids.dtype == torch.long and ids.shape == (1, len(tok.encode(TEXTS[0])))
    assert ids[0].tolist() == tok.encode(TEXTS[0])
    with_eod = lm.to_tokens(TEXTS[0], prepend_eod=True)
    assert with_eod[0].tolist() == [tok.eod_id, *tok.encode(TEXTS[0])]
    ids, mask = lm.to_tokens(TEXTS[0], return_mask=True)
    assert mask.dtype == torch.bool and bool(mask.all()) and mask.shape == ids.shape
    assert lm.to_string(ids[0]) == TEXTS[0] and lm.to_string(ids[0].tolist()) == TEXTS[0]
    assert lm.to_string(ids) == [TEXTS[0]]  # 2-D: a list


@pytest.mark.parametrize("prepend_eod", [False, True])
def test_to_tokens_of_a_batch_pads_on_the_right(prepend_eod: bool, lm: LoadedModel) -> None:
    tok = lm.tokenizer
    pad = tok.special_id("pad")
    rows = [([tok.eod_id] if prepend_eod else []) + tok.encode(t) for t in TEXTS]
    ids, mask = lm.to_tokens(TEXTS, prepend_eod=prepend_eod, return_mask=True)
    width = max(map(len, rows))
    assert ids.shape == mask.shape == (len(TEXTS), width)
    for i, row in enumerate(rows):
        assert ids[i].tolist() == row + [pad] * (width - len(row))
        assert mask[i].tolist() == [True] * len(row) + [False] * (width - len(row))
    assert torch.equal(lm.to_tokens(TEXTS, prepend_eod=prepend_eod), ids)
    eod = tok.decode([tok.eod_id]) if prepend_eod else ""
    assert lm.to_string(ids, mask) == [eod + t for t in TEXTS]  # round trip, padding dropped by the mask
    assert lm.to_string(ids) == [eod + t for t in TEXTS]  # and without it: pad tokens are dropped
    assert lm.to_string([r for r in rows]) == [eod + t for t in TEXTS]  # ragged lists
    logits = lm(ids, attention_mask=mask).logits
    assert logits.shape == (len(TEXTS), width, lm.cfg.model.vocab_size)
    alone = lm(ids[:1, : len(rows[0])]).logits
    torch.testing.assert_close(logits[0, : len(rows[0])], alone[0], rtol=1e-4, atol=1e-5)  # right padding is inert


def test_to_tokens_and_to_string_reject_what_they_cannot_take(lm: LoadedModel) -> None:
    with pytest.raises(TypeError):
        lm.to_tokens([])
    with pytest.raises(ValueError):
        lm.to_string(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        lm.to_string(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool))


def test_import_crate_lm_stays_light() -> None:
    code = (
        "import sys, crate_lm; assert 'torch' not in sys.modules, 'torch imported'; "
        "from crate_lm.checkpoint import load; assert crate_lm.load is load"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---- crate-lm generate from anywhere ------------------------------------------------------------


def test_generate_a_moved_run_from_another_directory(repo: Repo, tmp_path: Path) -> None:
    run = tmp_path / "somewhere" / "run"
    new_run(repo, run)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = cli("generate", str(run), "--prompt", "The river", "--max_new_tokens", "3", "--temperature", "0", cwd=cwd)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr[-3000:]
    assert proc.stdout.startswith("The river")


def test_generate_an_old_checkpoint_needs_or_takes_a_tokenizer(repo: Repo, tmp_path: Path) -> None:
    run = tmp_path / "old"
    new_run(repo, run, carry_tokenizer=False)
    proc = cli("generate", str(run), "--prompt", "The", "--max_new_tokens", "2", cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "--tokenizer" in lines[0] and "Traceback" not in proc.stderr
    tok = str(repo.root / "data" / "tok")
    proc = cli("generate", str(run), "--prompt", "The", "--max_new_tokens", "2", "--tokenizer", tok, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("The")
    proc = cli("generate", str(run), "--tokenizer", str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --tokenizer"), proc.stderr[-3000:]


# ---- end to end: a real training run -------------------------------------------------------------


@pytest.mark.slow
def test_a_trained_run_carries_its_tokenizer_and_generates_after_a_move(single: Path, tmp_path: Path) -> None:  # noqa: F811
    folders = sorted((single / "checkpoints").glob("step_*"))
    assert folders
    for folder in folders:
        state = json.loads((folder / "trainer_state.json").read_text())
        assert load_tokenizer(folder / "tokenizer").fingerprint == state["tokenizer_fingerprint"]
        assert not list(folder.glob(".tokenizer.tmp*"))
    moved = tmp_path / "moved" / "run"
    shutil.copytree(single, moved)  # the run folder only; its data stays where the fixture made it
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = cli("generate", str(moved), "--prompt", "Doc 5:", "--max_new_tokens", "12", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Doc 5:") and len(proc.stdout.strip()) > len("Doc 5:")
    before = Path.cwd()
    os.chdir(cwd)
    try:
        lm = load(moved)
    finally:
        os.chdir(before)
    assert lm.path == moved / "checkpoints" / folders[-1].name
    assert lm.tokenizer.path == lm.path / "tokenizer" / "tokenizer.json"  # the copy's own, not the data's


@pytest.mark.slow
def test_features_and_probe_work_on_a_moved_trained_run_from_another_directory(single: Path, corpus: Path,  # noqa: F811
                                                                               tmp_path: Path) -> None:
    moved = tmp_path / "moved" / "run"
    shutil.copytree(single, moved)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    text = corpus.parent / "corpus.txt"
    proc = cli("features", str(moved), "--layer", "1", "--data", str(text), "--tokens", "2000", "--cards", "2",
               "--out", "feat", cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("features: 1 hook x 128 units on 2,048 tokens")
    report = json.loads((cwd / "feat" / "features.json").read_text())
    assert report["hooks"] == ["blocks.1.ista.hook_code"] and len(report["per_hook"]["blocks.1.ista.hook_code"]["cards"]) == 2
    assert (cwd / "feat" / "report.md").read_text().count("### unit ") == 2 and (cwd / "feat" / "density.png").is_file()
    proc = cli("probe", str(moved), "--label", "capitalized", "--data", str(text), "--tokens", "3000", "--ks", "1,2",
               "--out", "probe", cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("probe: capitalized on ")
    report = json.loads((cwd / "probe" / "probe.json").read_text())
    entry = report["runs"][0]["labels"]["capitalized"]["layers"]["1"]["code"]
    assert set(entry["k"]) == {"1", "2"} and 0.0 <= entry["k"]["1"]["f1"] <= 1.0
    assert (cwd / "probe" / "probe_capitalized.png").is_file()
    proc = cli("probe", str(moved), "--label", "no_such_label", cwd=cwd)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "line_start" in lines[0]
    proc = cli("features", str(moved), "--layer", "7", cwd=cwd)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--layer" in lines[0], proc.stderr[-2000:]
