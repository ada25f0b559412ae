"""White-box read-outs: the coding-rate measures against closed forms and a direct log-det,
and the read-out of a model against its own computation."""

from __future__ import annotations

import math

import pytest
import torch

from crate_lm.interp.whitebox import EPS2, coding_rate, compression_term, lasso_objective


def direct_rate(z: torch.Tensor, eps2: float = EPS2) -> float:
    """1/2 logdet(I_d + d / (N eps^2) Z^T Z), straight from the definition."""
    n, d = z.shape
    return 0.5 * math.log(torch.det(torch.eye(d, dtype=torch.float64) + d / (n * eps2) * z.double().T @ z.double()).item())


def test_orthonormal_rows_have_the_closed_form():
    """Z = sqrt(N / d) * (d orthonormal columns): Z^T Z = (N / d) I, so R = d/2 log(1 + 1/eps^2)."""
    n, d = 64, 8
    q, _ = torch.linalg.qr(torch.randn(n, d, dtype=torch.float64))
    z = q * math.sqrt(n / d)
    assert coding_rate(z) == pytest.approx(d / 2 * math.log(1 + 1 / EPS2), rel=1e-10)


def test_rank_deficient_input_counts_only_its_rank():
    """Rank r with equal singular values s: R = r/2 log(1 + d s^2 / (N eps^2))."""
    n, d, r, s = 50, 10, 3, 2.0
    u, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))
    z = s * u @ v.T
    assert coding_rate(z) == pytest.approx(r / 2 * math.log(1 + d * s**2 / (n * EPS2)), rel=1e-9)
    assert coding_rate(torch.zeros(n, d)) == 0.0


@pytest.mark.parametrize("n,d", [(40, 6), (5, 12)])  # more tokens than dims, and fewer (Sylvester)
def test_agrees_with_a_direct_logdet(n, d):
    z = torch.randn(n, d, dtype=torch.float64) * 0.3
    assert coding_rate(z) == pytest.approx(direct_rate(z), rel=1e-9)
    assert coding_rate(z, eps2=0.5) == pytest.approx(direct_rate(z, 0.5), rel=1e-9)


def test_compression_sums_the_heads():
    q = torch.randn(3, 20, 4, dtype=torch.float64)
    assert compression_term(q) == pytest.approx(sum(direct_rate(q[k]) for k in range(3)), rel=1e-9)
    # tokens packed into one direction per head compress better than spread ones
    packed = torch.ones(3, 20, 4, dtype=torch.float64)
    assert compression_term(packed) < compression_term(q)


def test_lasso_objective():
    y = torch.tensor([[1.0, 2.0]])
    d = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    a = torch.tensor([[1.0, 0.0, 0.5]])
    # y - D a = (1 - 1 - 0.5, 2 - 0 - 0.5) = (-0.5, 1.5): 1/2 (0.25 + 2.25) + 0.1 * 1.5
    assert lasso_objective(y, a, d, 0.1).item() == pytest.approx(1.25 + 0.15)


# ---- the read-out of a model --------------------------------------------------------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny CRATE-alpha trained for 150 plain AdamW steps on a small corpus, saved as a
    checkpoint folder the way the trainer lays it out (with its tokenizer inside)."""

    from crate_lm.config import load_run_config
    from crate_lm.data import (
        PackedTokenDataset,
        SourceSpec,
        TokenShards,
        load_tokenizer,
        prepare_corpus,
        train_tokenizer,
    )
    from crate_lm.model import build_model
    from tests.data_fixtures import make_documents, write_checkpoint, write_lines

    root = tmp_path_factory.mktemp("whitebox")
    docs = make_documents(1500, seed=5)
    write_lines(root / "corpus.txt", docs)
    train_tokenizer(iter(docs), root / "tok", vocab_size=384)
    prepare_corpus(SourceSpec(inputs=[str(root / "corpus.txt")], text_unit="line"), root / "tok", root / "shards",
                   val_fraction=0.2, show_progress=False)  # fmt: skip
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"vocab_size": 384, "max_seq_len": 64, "d_model": 32, "n_layers": 2, "n_heads": 4},
        "data": {"path": str(root / "shards")}, "train": {"seed": 3},
    }))  # fmt: skip
    cfg = load_run_config(config)
    tokenizer = load_tokenizer(root / "tok")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    data = PackedTokenDataset(TokenShards(root / "shards", "train"), 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = [data[(step * 16 + i) % len(data)] for i in range(16)]
        x = torch.stack([torch.from_numpy(b["input_ids"]) for b in batch])
        y = torch.stack([torch.from_numpy(b["labels"]) for b in batch])
        model(x, y).loss.backward()
        opt.step()
        opt.zero_grad()
    write_checkpoint(root / "run" / "checkpoints" / "step_00000150", cfg, model, tokenizer=tokenizer, step=150)
    return root / "run"


def test_readout_of_a_trained_model_against_its_initialisation(trained_run, tmp_path):
    from crate_lm.interp.whitebox import whitebox

    report = whitebox(str(trained_run), tokens=3000, compare_init=True, out=str(tmp_path / "wb"))
    assert json.loads((tmp_path / "wb" / "whitebox.json").read_text())["tokens"] == report["tokens"] >= 2900
    assert (tmp_path / "wb" / "whitebox.png").stat().st_size > 5000
    trained, init = report["trained"], report["init"]
    assert [r["layer"] for r in trained] == [0, 1]
    for row in trained + init:
        assert 0 <= row["zero_fraction"] <= 1 and row["mean_l0"] == pytest.approx(128 * (1 - row["zero_fraction"]))
        assert row["lasso_after"] < row["lasso_before"], "one ISTA step descends the LASSO objective"
    # training compresses: the tokens sit in fewer directions of each head's subspace than at init
    assert sum(r["compression"] for r in trained) < sum(r["compression"] for r in init)


def test_readout_matches_a_direct_computation(trained_run):
    """Layer 1's R^c recomputed by hand from the weights: LN1, U_k, per-token normalisation."""
    from crate_lm.checkpoint import load
    from crate_lm.interp.whitebox import compression_term, measure

    loaded = load(trained_run)
    ids = torch.randint(0, 384, (2, 64), generator=torch.Generator().manual_seed(0))
    rows = measure(loaded.model, [(ids, None)])
    model = loaded.model
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter="blocks.1.hook_resid_pre")
        y = model.blocks[1].attn.ln(cache["blocks.1.hook_resid_pre"])
        u = model.blocks[1].attn.proj_u.weight  # rows of head k: U_k^T
        expected = []
        for b in range(2):
            q = torch.stack([y[b] @ u[k * 8 : (k + 1) * 8].T for k in range(4)])
            expected.append(compression_term(torch.nn.functional.normalize(q.double(), dim=-1)))
    # Q_k comes out of fp32 matmuls done two ways (one d x d projection vs K slices): ~1e-9 apart
    assert rows[1]["compression"] == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_whitebox_command_from_another_directory(trained_run, tmp_path):
    cmd = [sys.executable, "-m", "crate_lm.cli", "whitebox", str(trained_run), "--tokens", "1000", "--compare_init"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "whitebox: 2 layers on" in proc.stdout
    assert (trained_run / "checkpoints" / "step_00000150" / "whitebox" / "whitebox.png").is_file()
    for args, message in [(["/nowhere"], "no such run"), ([str(trained_run), "--tokens", "0"], "--tokens must be >= 1")]:
        proc = subprocess.run([sys.executable, "-m", "crate_lm.cli", "whitebox", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().startswith("error: ") and message in proc.stderr
