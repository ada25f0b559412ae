"""``crate-lm eval`` / ``info`` / ``generate --prompts_file`` (``crate_lm.eval``): figures against a
direct computation, two processes against one, masked-LM accuracy, and one-line user errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crate_lm.checkpoint import load
from crate_lm.config import run_config_from_dict
from crate_lm.data import SourceSpec, TokenShards, prepare_corpus, train_tokenizer
from crate_lm.data.loader import MLMConfig, mask_tokens
from crate_lm.eval import evaluate, info
from crate_lm.model import build_model, param_count
from tests.data_fixtures import make_documents, write_checkpoint, write_lines

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32


class Setup:
    def __init__(self, root: Path, causal: Path, masked: Path, shards: Path, other: Path, text: Path) -> None:
        self.root, self.causal, self.masked, self.shards, self.other, self.text = root, causal, masked, shards, other, text


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    root = tmp_path_factory.mktemp("eval")
    docs = make_documents(300, seed=5)
    write_lines(root / "corpus.txt", docs)
    tokenizer = train_tokenizer(iter(docs), root / "tok", vocab_size=300)
    spec = SourceSpec(inputs=[str(root / "corpus.txt")], text_unit="line")
    prepare_corpus(spec, root / "tok", root / "shards", val_fraction=0.3, show_progress=False)
    train_tokenizer(iter(docs), root / "tok2", vocab_size=320)
    prepare_corpus(spec, root / "tok2", root / "other", val_fraction=0.3, show_progress=False)
    write_lines(root / "heldout.txt", make_documents(40, seed=9))
    folders = {}
    for task in ("causal", "masked"):
        cfg = run_config_from_dict({
            "model": {"vocab_size": tokenizer.vocab_size, "max_seq_len": SEQ, "d_model": 32, "n_layers": 2,
                      "n_heads": 4, "task": task},
            "data": {"path": [str(root / "shards")], "num_workers": 0},
        })  # fmt: skip
        torch.manual_seed(0)
        folders[task] = write_checkpoint(root / task / "checkpoints" / "step_00000007", cfg, build_model(cfg.model),
                                         tokenizer=tokenizer, step=7)  # fmt: skip
    (root / "causal" / "metrics.jsonl").write_text(json.dumps({"step": 7, "val_loss": 5.5, "val_ppl": 244.7}) + "\n")
    return Setup(root, folders["causal"], folders["masked"], root / "shards", root / "other", root / "heldout.txt")


def test_causal_figures_equal_a_direct_computation(setup: Setup) -> None:
    row = evaluate(str(setup.causal.parent.parent), tokens=300, batch_size=3)["runs"][0]
    lm = load(setup.causal)
    shards = TokenShards(setup.shards, "validation")
    n = math.ceil(300 / SEQ)
    seqs = torch.stack([torch.from_numpy(shards.read(i * (SEQ + 1), SEQ + 1).astype(np.int64)) for i in range(n)])
    with torch.no_grad():
        logits = lm.model(seqs[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1)).item()
    special = set(lm.tokenizer.all_special_ids)
    nbytes = sum(len(lm.tokenizer.decode([t for t in s[1:].tolist() if t not in special]).encode()) for s in seqs)
    assert row["sequences"] == n and row["tokens"] == n * SEQ and row["step"] == 7 and row["task"] == "causal"
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    assert row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert row["bytes"] == nbytes
    assert row["bits_per_byte"] == pytest.approx(loss * n * SEQ / math.log(2) / nbytes, rel=1e-5)
    accuracy = (logits.argmax(-1) == seqs[:, 1:]).float().mean().item()
    assert row["accuracy"] == pytest.approx(accuracy)
    # a text file: its lines packed the same way; runs compared on the same data
    both = evaluate([str(setup.causal), str(setup.causal)], str(setup.text), tokens=200)
    assert both["runs"][0]["data_kind"] == "text" and both["runs"][0]["loss"] == both["runs"][1]["loss"]


def test_masked_model_is_scored_on_the_validation_masking(setup: Setup) -> None:
    row = evaluate(str(setup.masked), tokens=256, batch_size=4)["runs"][0]
    lm = load(setup.masked)
    tok = lm.tokenizer
    cfg = MLMConfig(mask_id=tok.special_id("mask"), vocab_size=tok.vocab_size, special_ids=tok.all_special_ids,
                    mask_prob=0.15)  # fmt: skip
    shards = TokenShards(setup.shards, "validation")
    inputs, labels = zip(*(mask_tokens(shards.read(g * SEQ, SEQ), cfg, np.random.default_rng([0, g])) for g in range(8)))
    x, y = torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(labels))
    with torch.no_grad():
        logits = lm.model(x).logits
    scored = y != -100
    loss = F.cross_entropy(logits[scored], y[scored]).item()
    assert row["task"] == "masked" and row["tokens"] == int(scored.sum()) and 0 < row["tokens"] < 256 * 0.3
    assert row["loss"] == pytest.approx(loss, rel=1e-5) and row["bits_per_byte"] is None
    assert row["accuracy"] == pytest.approx((logits.argmax(-1)[scored] == y[scored]).float().mean().item())


def env() -> dict:
    e = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             DS_ACCELERATOR="cpu", WANDB_MODE="disabled")  # fmt: skip
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def test_two_processes_equal_one(setup: Setup, tmp_path: Path) -> None:
    one = evaluate(str(setup.causal), tokens=600, batch_size=2)["runs"][0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "crate_lm.cli", "eval", str(setup.causal), "--tokens", "600", "--batch_size", "2", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout[proc.stdout.index("{"):])["runs"][0]  # rank 0 alone prints
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("sequences", "tokens", "bytes"):
        assert two[key] == one[key]
    for key in ("loss", "perplexity", "bits_per_byte", "accuracy"):
        assert two[key] == pytest.approx(one[key], rel=1e-6)


def test_info(setup: Setup) -> None:
    result = info(str(setup.causal.parent.parent))
    cfg = load(setup.causal).cfg
    assert result["checkpoint"] == str(setup.causal) and result["params"] == param_count(cfg.model)
    assert result["training"]["step"] == 7 and result["validation"] == {"step": 7, "val_loss": 5.5, "val_ppl": 244.7}
    assert result["tokenizer"]["vocab_size"] == cfg.model.vocab_size and result["tokenizer"]["kind"] == "huggingface"
    assert result["weights"]["dtype"] == "float32" and result["weights"]["bytes"] > 4 * param_count(cfg.model)
    assert result["model"]["d_model"] == 32


def eod_checkpoint(setup: Setup) -> Path:
    """A causal model whose every next token is end-of-document (greedy)."""
    folder = setup.root / "eod" / "checkpoints" / "step_00000001"
    if folder.exists():
        return folder
    lm = load(setup.causal)
    model, eod = lm.model, lm.tokenizer.eod_id
    with torch.no_grad():
        model.tok_emb.weight[eod] *= 50
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(model.tok_emb.weight[eod])
    return write_checkpoint(folder, lm.cfg, model, tokenizer=lm.tokenizer)


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "crate_lm.cli", *args], cwd=cwd, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def test_cli_generate_batch_seed_eod_and_info(setup: Setup, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The river\\nbank\nA doc\n")
    run = str(setup.causal.parent.parent)
    common = ["--max_new_tokens", "6", "--seed", "3"]
    jobs = {
        "batch": cli("generate", run, "--prompts_file", str(prompts), *common, cwd=tmp_path),
        "first": cli("generate", run, "--prompt", "The river\\nbank", *common, cwd=tmp_path),
        "eod": cli("generate", str(eod_checkpoint(setup)), "--prompt", "The river", "--temperature", "0", cwd=tmp_path),
        "info": cli("info", run, cwd=tmp_path),
    }
    out = {}
    for name, proc in jobs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, (name, stderr[-3000:])
        out[name] = stdout
    first, second = out["batch"].split("=== prompt 2 ===\n")
    assert first == f"=== prompt 1 ===\n{out['first']}"  # the same text alone and in a batch: a generator per prompt
    assert out["first"].startswith("The river\nbank") and second.startswith("A doc")
    assert out["eod"] == "The river\n"  # stopped at once at the end of document, which is not printed
    assert "parameters" in out["info"] and "step 7" in out["info"] and "fingerprint" in out["info"]


def test_cli_user_errors_are_one_line(setup: Setup, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cases = [
        (["eval", str(tmp_path / "nowhere")], "no such run or checkpoint folder"),
        (["eval", str(tmp_path / "empty")], "is not a crate_lm checkpoint"),
        (["eval", str(setup.causal), "--tokens", "0"], "--tokens must be a whole number >= 1"),
        (["eval", str(setup.causal), "--data", str(tmp_path / "missing.txt")], "no such file or folder"),
        (["eval", str(setup.causal), "--data", str(setup.other)], "another tokenizer"),
        (["info", str(tmp_path / "nowhere")], "no such run or checkpoint folder"),
        (["generate", str(setup.causal), "--prompts_file", str(tmp_path / "none.txt")], "--prompts_file"),
    ]
    procs = [(cli(*args, cwd=tmp_path), message) for args, message in cases]
    for proc, message in procs:
        _, stderr = proc.communicate(timeout=180)
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
        if message == "another tokenizer":
            assert "pass shards prepared with the run's tokenizer" in lines[0]  # the fix
