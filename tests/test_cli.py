"""The ``crate-lm`` command line run as a subprocess: user errors are one ``error: ...`` line and
exit code 2, the prompt is always text (with ``\\n``, ``\\t``, ``\\\\`` escapes), and generation
stops at the model's context with a note."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crate_lm.cli import unescape_prompt
from crate_lm.config import RunConfig, run_config_from_dict
from crate_lm.data import SourceSpec, Tokenizer, prepare_corpus, train_tokenizer
from tests import data_fixtures
from tests.data_fixtures import make_documents, write_lines

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 32


def env() -> dict:
    e = dict(os.environ)
    e.update(WANDB_MODE="disabled", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return e


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crate_lm.cli", *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The command's one stderr line, ``error: ...``, with exit code 2 and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def write_checkpoint(run: Path, cfg: RunConfig, fingerprint: str, *, weights_cfg: RunConfig | None = None) -> Path:
    """``run/checkpoints/step_00000001`` in the layout ``checkpoint.load_model`` reads."""
    from crate_lm.model import build_model

    torch.manual_seed(0)
    model = build_model((weights_cfg or cfg).model)
    return data_fixtures.write_checkpoint(run / "checkpoints" / "step_00000001", cfg, model, fingerprint=fingerprint)


def run_config(shards: Path, vocab_size: int, **model: object) -> RunConfig:
    return run_config_from_dict(
        {
            "model": {"vocab_size": vocab_size, "max_seq_len": CONTEXT, "d_model": 32, "n_layers": 2, "n_heads": 4}
            | model,
            "data": {"path": [str(shards)], "num_workers": 0},
        }
    )


class Trained:
    def __init__(self, root: Path, run: Path, tokenizer: Tokenizer, shards: Path) -> None:
        self.root, self.run, self.tokenizer, self.shards = root, run, tokenizer, shards


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """A tiny tokenizer, prepared shards and a run folder with one complete (untrained) checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    docs = make_documents(200, seed=5)
    write_lines(root / "corpus.txt", docs)
    tokenizer = train_tokenizer(iter(docs), root / "tok", vocab_size=300)
    prepare_corpus(SourceSpec(inputs=[str(root / "corpus.txt")], text_unit="line"), root / "tok", root / "shards",
                   val_fraction=0.1, show_progress=False)  # fmt: skip
    run = root / "run"
    write_checkpoint(run, run_config(root / "shards", tokenizer.vocab_size), tokenizer.fingerprint)
    return Trained(root, run, tokenizer, root / "shards")


# ---- the prompt -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, text",
    [
        ("ROMEO\\n", "ROMEO\n"),
        ("a\\tb", "a\tb"),
        ("C:\\\\new", "C:\\new"),
        ("\\\\n", "\\n"),
        ("x\\y \\u00e9", "x\\y \\u00e9"),
        ("café 東京 🎉\\n", "café 東京 🎉\n"),
        ("no escapes", "no escapes"),
    ],
)
def test_unescape_prompt(raw: str, text: str) -> None:
    assert unescape_prompt(raw) == text


@pytest.mark.parametrize(
    "args, text",
    [
        (["--prompt", "1599"], "1599"),
        (["--prompt", "[ROMEO]"], "[ROMEO]"),
        (["--prompt", "ROMEO\\n"], "ROMEO\n"),
        (["None"], "None"),
    ],
    ids=["int", "list", "newline", "positional-none"],
)
def test_prompt_is_text(trained: Trained, args: list[str], text: str) -> None:
    proc = cli("generate", str(trained.run), *args, "--max_new_tokens", "2", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(text), (proc.stdout, text)
    assert trained.tokenizer.decode(trained.tokenizer.encode(text)) == text


def test_checkpoint_folder_and_no_top_k(trained: Trained) -> None:
    """A checkpoint folder works like its run folder; top_k None samples the whole vocabulary.
    (temperature 0, greedy, is used by the tests above.)"""
    folder = trained.run / "checkpoints" / "step_00000001"
    proc = cli("generate", str(folder), "--prompt=The", "--max_new_tokens", "3", "--top_k", "None")
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr[-3000:]
    assert proc.stdout.startswith("The")


def test_generation_stops_at_the_context_with_a_note(trained: Trained) -> None:
    prompt = "The river"
    fit = CONTEXT - len(trained.tokenizer.encode(prompt))
    proc = cli("generate", str(trained.run), "--prompt", prompt, "--max_new_tokens", "500", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"note: stopped after {fit} new tokens: the model's context is {CONTEXT} tokens"], proc.stderr
    assert proc.stdout.startswith(prompt)


# ---- user errors: one line, exit code 2 --------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    line = error_line(cli("generate", str(tmp_path / "nowhere"), "--prompt", "x"))
    assert "nowhere" in line


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "model.txt").write_text("hi")
    assert "model.txt" in error_line(cli("generate", str(tmp_path / "model.txt")))


def test_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    assert "not a crate_lm checkpoint" in error_line(cli("generate", str(tmp_path)))


def test_run_folder_without_a_complete_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)  # no COMPLETE marker
    assert "no complete checkpoint" in error_line(cli("generate", str(tmp_path)))


@pytest.mark.parametrize("broken", ["weights", "trainer_state", "shapes", "masked"])
def test_broken_checkpoint(trained: Trained, tmp_path: Path, broken: str) -> None:
    vocab, fp = trained.tokenizer.vocab_size, trained.tokenizer.fingerprint
    cfg = run_config(trained.shards, vocab, task="masked" if broken == "masked" else "causal")
    other = run_config(trained.shards, vocab, d_model=64) if broken == "shapes" else None
    folder = write_checkpoint(tmp_path / "run", cfg, fp, weights_cfg=other)
    if broken == "weights":
        (folder / "model.safetensors").write_bytes(b"not safetensors")
    if broken == "trainer_state":
        (folder / "trainer_state.json").unlink()
    line = error_line(cli("generate", str(tmp_path / "run"), "--prompt", "x"))
    assert str(folder) in line


def test_prompt_longer_than_the_context(trained: Trained) -> None:
    prompt = " ".join(["river"] * CONTEXT * 2)
    line = error_line(cli("generate", str(trained.run), "--prompt", prompt))
    assert f"context (model.max_seq_len) is {CONTEXT} tokens" in line


@pytest.mark.parametrize(
    "args, name",
    [
        (["--max_new_tokens", "0"], "--max_new_tokens"),
        (["--max_new_tokens", "-5"], "--max_new_tokens"),
        (["--max_new_tokens", "many"], "--max_new_tokens"),
        (["--top_k", "0"], "--top_k"),
        (["--top_k", "-1"], "--top_k"),
        (["--temperature", "-0.5"], "--temperature"),
        (["--temperature", "hot"], "--temperature"),
    ],
)
def test_bad_sampling_arguments(trained: Trained, args: list[str], name: str) -> None:
    line = error_line(cli("generate", str(trained.run), "--prompt", "x", *args))
    assert name in line


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--preset", "nope"], "unknown model preset 'nope'"),
        (["--preset", "tiny", "--n_heads", "3"], "n_heads"),
        (["--preset", "tiny", "--d_modle", "64"], "d_modle"),
        (["--preset", "tiny", "--d_model", "wide"], "d_model"),
        (["--preset", "tiny", "--ista", "nope"], "ista"),
    ],
)
def test_size_user_errors(args: list[str], needle: str) -> None:
    assert needle in error_line(cli("size", *args))


@pytest.mark.parametrize(
    "args,message",
    [
        (["generat", "runs/x"], "unknown command 'generat' (did you mean generate?)"),
        (["generate", "runs/x", "--promt", "hi"], "unknown option --promt for crate-lm generate (did you mean --prompt?)"),
        (["whitebox", "runs/x", "--compare-int"], "unknown option --compare_int"),
    ],
)
def test_unknown_commands_and_options_are_one_line(args, message):
    proc = cli(*args)
    assert proc.returncode == 2
    assert message in error_line(proc)


def test_help_still_works():
    proc = cli("--help")
    assert proc.returncode == 0 and "generate" in proc.stdout + proc.stderr
