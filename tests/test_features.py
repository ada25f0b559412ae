"""Feature statistics (``crate_lm.interp.features``): streaming statistics against hand-built
codes, the bottom-k sample, logit effects against a forward with the atom injected, geometry
against a direct computation, and the end-to-end report (contexts trace back to the tokens and
activations they name; the store path equals the direct path; bad input is one line and writes
nothing). A tiny random-init checkpoint is written by hand next to prepared shards."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from crate_lm.checkpoint import load
from crate_lm.config import dump_run_config, load_run_config, run_config_from_dict
from crate_lm.data import SourceSpec, prepare_corpus, train_tokenizer
from crate_lm.errors import CrateLMError
from crate_lm.interp.extract import extract, open_sequences, row_positions
from crate_lm.interp.features import (
    FeaturesError,
    FeatureStats,
    Pieces,
    cosine_summary,
    features,
    logit_effects,
    principal_cosines,
    random_abs_cos,
    rank_units,
    subspace_summary,
    unit_directions,
)
from crate_lm.model import build_model
from tests.conftest import small_config
from tests.data_fixtures import make_documents, write_checkpoint, write_lines

SEQ = 32
TOKENS = 768  # 24 sequences of 32
CODES = ["blocks.0.ista.hook_code", "blocks.1.ista.hook_code"]


# ---- streaming statistics ---------------------------------------------------------------------


def hand_codes() -> torch.Tensor:
    """50 tokens x 6 units whose counts are known by construction."""
    n = 50
    r = torch.arange(n, dtype=torch.float32)
    x = torch.zeros(n, 6)
    x[:, 1] = 1.0 + r / 100  # active everywhere: dense
    x[::5, 2] = 2.0 + r[::5]  # every 5th token: density 0.2
    x[:30, 3] = 0.5  # 30 of 50: dense (0.6)
    x[:, 4] = torch.where(r % 2 == 0, torch.tensor(0.5), torch.tensor(0.25))  # equals / below 0.5
    x[10:20, 4] = 3.0
    x[:, 5] = -0.1 - r / 1000  # negative everywhere (GELU-like): never > 0
    return x  # unit 0 all zero: dead


def stream_in(x: torch.Tensor, cuts: list[int], **kwargs) -> FeatureStats:
    stats = FeatureStats(x.shape[1], **kwargs)
    start = 0
    for size in cuts + [x.shape[0] - sum(cuts)]:
        stats.update(x[start : start + size], torch.arange(start, start + size))
        start += size
    return stats


def test_counts_density_l0_dead_and_dense_against_hand_built_codes():
    x = hand_codes()
    one = stream_in(x, [])
    many = stream_in(x, [7, 13, 1, 20])  # chunks of 7, 13, 1, 20 and 9 rows
    for stats in (one, many):
        assert stats.tokens == 50
        assert stats.count.tolist() == [0, 50, 10, 30, 50, 0]
        assert stats.density().tolist() == pytest.approx([0, 1, 0.2, 0.6, 1, 0])
        s = stats.summary()
        assert (s["dead"]["count"], s["dead"]["ids"], s["dead"]["fraction"]) == (2, [0, 5], 2 / 6)
        assert (s["dense"]["count"], s["dense"]["ids"]) == (3, [1, 3, 4])
        l0 = (x > 0).sum(1).double()
        assert s["l0"]["mean"] == pytest.approx(l0.mean().item())
        assert s["l0"]["std"] == pytest.approx(l0.std(unbiased=False).item())
        assert sum(s["l0"]["hist"]["counts"]) == 50
        assert sum(s["log10_density_hist"]["counts"]) == 6 and s["log10_density_hist"]["counts"][0] == 2
        assert stats.mean().tolist() == pytest.approx(x.double().mean(0).tolist())
        active_mean = [(x[:, j][x[:, j] > 0]).double().mean().item() for j in (1, 2, 3, 4)]
        got = stats.mean_active()
        assert math.isnan(got[0]) and math.isnan(got[5]) and got[1:5].tolist() == pytest.approx(active_mean)
        assert stats.maximum().tolist() == pytest.approx(x.max(0).values.double().tolist())
    for key in ("count", "total", "total_active", "max", "l0_hist", "top_values", "top_rows", "sample_rows"):
        assert torch.equal(getattr(one, key), getattr(many, key)), key
    assert torch.equal(one.sample_values.nan_to_num(-7), many.sample_values.nan_to_num(-7))
    # threshold: active means strictly above it
    high = stream_in(x, [9], threshold=0.5)
    assert high.count.tolist() == [0, 50, 10, 0, 10, 0]
    assert high.mean_active()[4].item() == pytest.approx(3.0)
    low = stream_in(x, [9], threshold=-0.2)  # now the negative unit and the zeros count
    assert low.count.tolist() == [50, 50, 50, 50, 50, 50]


def test_cards_go_to_live_units_in_order():
    stats = stream_in(hand_codes(), [])
    assert rank_units(stats, "max", 10) == [2, 4, 1, 3]  # maxima 47, 3, 1.49, 0.5; units 0 and 5 never active
    assert rank_units(stats, "density", 10) == [1, 4, 3, 2]  # 1, 1 (lower id first), 0.6, 0.2
    means = stats.mean()
    assert rank_units(stats, "mean", 2) == sorted([1, 2, 3, 4], key=lambda j: -means[j].item())[:2]


def test_dead_units_get_no_card_whatever_their_values():
    x = torch.zeros(40, 2)
    x[:, 0] = 0.9  # never above the threshold 1.0, yet its mean and max beat unit 1's mean
    x[7, 1] = 5.0
    stats = stream_in(x, [], threshold=1.0)
    assert rank_units(stats, "mean", 5) == rank_units(stats, "max", 5) == rank_units(stats, "density", 5) == [1]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_half_precision_and_sparse_chunks_give_the_float32_result():
    x = hand_codes().half().float()  # values a float16 holds exactly
    b = hand_codes().bfloat16().float()

    def same(a: FeatureStats, c: FeatureStats) -> bool:
        keys = ("count", "total", "total_active", "max", "l0_hist", "top_values", "top_rows", "sample_rows")
        return all(torch.equal(getattr(a, k), getattr(c, k)) for k in keys)

    for low, exact in ((x.half(), x), (b.bfloat16(), b)):
        stats = FeatureStats(6)
        stats.update(low[:11], torch.arange(11))
        stats.update(low[11:], torch.arange(11, 50))
        assert stats.top_values.dtype == torch.float32 and same(stats, stream_in(exact, [11]))
    sparse = FeatureStats(6)
    sparse.update(x[:11].to_sparse_csr(), torch.arange(11))
    sparse.update(x[11:].to_sparse_csr(), torch.arange(11, 50))
    assert same(sparse, stream_in(x, [11]))
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        sparse.update(torch.zeros(3, 5), torch.arange(3))


def test_top_rows_come_back_exactly_in_order_across_chunks():
    gen = torch.Generator().manual_seed(1)
    n, m = 400, 8
    x = torch.rand(n, m, generator=gen)
    planted = {37: 15.0, 128: 14.0, 129: 13.5, 255: 12.0, 399: 11.0, 3: 10.5}  # row -> value, unit 3
    for row, value in planted.items():
        x[row, 3] = value
    x[:, 6] = 0.0
    x[[5, 300], 6] = torch.tensor([2.0, 4.0])  # fewer active than top_k
    stats = stream_in(x, [30, 100, 70, 1, 150], top_k=5)
    want = sorted(planted.items(), key=lambda kv: -kv[1])[:5]
    assert stats.top(3) == [(v, r) for r, v in want]
    assert stats.top(6) == [(4.0, 300), (2.0, 5)]
    assert stats.top(0) == [(v.item(), int(r)) for v, r in zip(*torch.topk(x[:, 0], 5))]
    # equal values: the earlier row first, whatever the chunking
    y = torch.zeros(20, 1)
    y[[2, 9, 15], 0] = 1.0
    assert stream_in(y, [10], top_k=2).top(0) == [(1.0, 2), (1.0, 9)]
    assert stream_in(y, [3, 3, 3], top_k=2).top(0) == [(1.0, 2), (1.0, 9)]
    z = torch.zeros(3000, 1)
    z[1000:, 0] = 1.0  # 2000 tied values, and one larger after them
    z[2500, 0] = 2.0
    want = [(2.0, 2500), (1.0, 1000), (1.0, 1001), (1.0, 1002)]
    for cuts in ([], [1500], [1001, 700, 1]):
        assert stream_in(z, cuts, top_k=4).top(0) == want


def test_the_reservoir_is_a_uniform_sample_without_replacement():
    n = 80
    x = torch.zeros(n, 2)
    x[::2, 0] = torch.arange(40, dtype=torch.float32) + 1.0  # 40 distinct active values (even rows)
    x[:6, 1] = torch.arange(6, dtype=torch.float32) + 0.5
    inclusion = torch.zeros(40)
    for seed in range(300):
        stats = stream_in(x, [13, 29], reservoir=10, seed=seed)
        values, rows = stats.sample(0)
        assert len(values) == 10 and len(set(rows.tolist())) == 10  # min(count, R), no row twice
        assert torch.equal(x[rows, 0], values) and (values > 0).all()  # real active values at their rows
        inclusion[(values - 1).long()] += 1
        if seed < 3:  # the sample does not depend on the chunking
            other = stream_in(x, [1, 50], reservoir=10, seed=seed)
            assert torch.equal(other.sample(0)[1], rows)
    freq = inclusion / 300
    assert (freq - 0.25).abs().max() < 0.11  # each of the 40 kept with probability 10/40
    assert freq[:20].mean() == pytest.approx(0.25, abs=0.04)  # early rows not favoured
    small_values, small_rows = stats.sample(1)
    assert sorted(small_rows.tolist()) == list(range(6))  # all of them when count <= R
    want = torch.quantile(x[:6, 1].double(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=torch.float64))
    assert stats.quantiles()[1].tolist() == pytest.approx(want.tolist())
    assert torch.isnan(FeatureStats(2).quantiles()).all()


def test_quantile_examples_fall_in_their_bins():
    n = 300
    x = torch.zeros(n, 1)
    x[:, 0] = torch.linspace(0, 10, n)  # row 0 is 0: inactive
    stats = stream_in(x, [100], reservoir=64)
    bins = stats.quantile_examples(0, bins=10, per_bin=2)
    assert len(bins) == 10 and bins[0]["lo"] == 0.0 and bins[-1]["hi"] == pytest.approx(10.0)
    shown = 0
    for b in bins:
        assert b["hi"] - b["lo"] == pytest.approx(1.0)
        assert len(b["examples"]) <= 2
        for value, row in b["examples"]:
            assert b["lo"] <= value <= b["hi"] and x[row, 0].item() == value
            shown += 1
    assert shown >= 15  # 64 samples over 10 equal bins: nearly all bins get 2


def test_the_state_does_not_grow_with_the_tokens():
    stats = FeatureStats(16, top_k=4, reservoir=8)
    stats.update(torch.rand(64, 16), torch.arange(64))
    size = stats.state_numel()
    for k in range(1, 20):
        stats.update(torch.rand(64, 16), torch.arange(64 * k, 64 * (k + 1)))
    assert stats.tokens == 20 * 64 and stats.state_numel() == size
    assert size == 16 * 4 + 17 + 16 * 4 * 2 + 16 * 8 * 3  # count, sums, max; l0 histogram; top; sample


# ---- logit effects -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,ista,hook",
    [
        ("crate", "alpha", "blocks.0.ista.hook_code"),
        ("crate", "overcomplete", "blocks.1.ista.hook_code"),
        ("gpt", "alpha", "blocks.0.mlp.hook_post"),
    ],
)
def test_logit_effects_equal_a_forward_with_the_atom_injected(arch, ista, hook):
    cfg = small_config(arch=arch, ista=ista)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.ln_f.weight.uniform_(0.5, 1.5)
        model.ln_f.bias.normal_(0, 0.3)
    directions = unit_directions(model, hook)
    width = cfg.dict_width if arch == "crate" else cfg.mlp_mult * cfg.d_model
    assert directions.shape == (width, cfg.d_model)
    units = [3, 17]
    effects = logit_effects(model, directions[units])
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"

    def logits_with(stream: torch.Tensor) -> torch.Tensor:
        out = model.run_with_hooks(ids, fwd_hooks=[(last, lambda act, hook: stream.expand_as(act).clone())])
        return out.logits[0].detach()

    zero = logits_with(torch.zeros(cfg.d_model))
    for k, j in enumerate(units):
        c = 2.5
        v = directions[j].detach()
        diff = logits_with(c * v) - zero  # every position sees the same stream
        sigma = math.sqrt((c * v).var(unbiased=False).item() + cfg.ln_eps)
        for t in range(ids.shape[1]):
            assert torch.allclose(diff[t] * sigma / c, effects[k], rtol=1e-4, atol=1e-5)
        assert set(torch.topk(diff[0], 10).indices.tolist()) == set(torch.topk(effects[k], 10).indices.tolist())
    if arch == "crate" and ista == "alpha":
        assert torch.equal(directions, model.blocks[0].ista.dict_out.detach().t())
    masked = build_model(small_config(task="masked")).eval()
    assert logit_effects(masked, unit_directions(masked, "blocks.0.ista.hook_code")) is None


def test_unit_directions_by_hook():
    crate = build_model(small_config(ista="crate")).eval()
    eye = torch.eye(32)
    assert torch.equal(unit_directions(crate, "blocks.0.ista.hook_code"), eye)  # the code is the stream
    assert torch.equal(unit_directions(crate, "blocks.1.hook_resid_post"), eye)
    assert torch.equal(unit_directions(crate, "hook_embed"), eye)
    assert unit_directions(crate, "blocks.0.attn.hook_q") is None
    assert unit_directions(crate, "hook_logits") is None
    over = build_model(small_config(ista="overcomplete")).eval()
    assert torch.equal(unit_directions(over, "blocks.1.ista.hook_code"), over.blocks[1].ista.dict.detach().t())


# ---- geometry ----------------------------------------------------------------------------------


def test_cosine_summary_against_a_direct_computation():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    u = w / w.norm(dim=1, keepdim=True)
    cos = u @ u.T
    i, j = torch.triu_indices(12, 12, offset=1)
    pairs = cos[i, j]
    for block in (None, 5, 1):
        s = cosine_summary(w, block_rows=block)
        assert s["pairs"] == 66 and s["units"] == 12 and s["dim"] == 5 and s["m_over_d"] == 12 / 5
        assert s["mean_abs"] == pytest.approx(pairs.abs().mean().item())
        assert s["median_abs"] == pytest.approx(torch.quantile(pairs.abs(), 0.5).item())
        assert s["q99_abs"] == pytest.approx(torch.quantile(pairs.abs(), 0.99).item())
        assert s["max_abs"] == pytest.approx(pairs.abs().max().item())
        order = torch.argsort(pairs.abs(), descending=True)[:10]
        assert [(p["i"], p["j"]) for p in s["closest"]] == [(int(i[k]), int(j[k])) for k in order]
        assert [p["cos"] for p in s["closest"]] == pytest.approx(pairs[order].tolist())
        assert "cannot be orthogonal" in s["note"] and s["welch_bound"] == pytest.approx(math.sqrt(7 / (5 * 11)))
    assert s["max_abs"] >= s["welch_bound"]
    sampled = cosine_summary(w, exact_pairs=0, samples=20_000)
    assert "random sample" in sampled["quantiles_from"] and sampled["mean_abs"] == pytest.approx(s["mean_abs"])
    assert sampled["median_abs"] == pytest.approx(s["median_abs"], abs=0.05)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    ortho = cosine_summary(q * torch.arange(1, 9)[:, None])  # orthogonal rows of any length
    assert ortho["mean_abs"] == pytest.approx(0, abs=1e-12) and ortho["max_abs"] == pytest.approx(0, abs=1e-12)
    assert "note" not in ortho and ortho["welch_bound"] == 0.0
    assert random_abs_cos(2) == pytest.approx(2 / math.pi) and random_abs_cos(3) == pytest.approx(0.5)
    mc = torch.nn.functional.normalize(torch.randn(20000, 2, 64, generator=gen, dtype=torch.float64), dim=-1)
    assert random_abs_cos(64) == pytest.approx((mc[:, 0] * mc[:, 1]).sum(-1).abs().mean().item(), rel=0.03)


def test_principal_angles_between_subspaces():
    eye = torch.eye(6, dtype=torch.float64)
    a = torch.randn(6, 2, dtype=torch.float64)
    assert principal_cosines(a, a @ torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)).tolist() == \
        pytest.approx([1.0, 1.0])  # fmt: skip
    assert principal_cosines(eye[:, :2], eye[:, 2:4]).tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert principal_cosines(eye[:, [0, 1]], eye[:, [0, 2]]).tolist() == pytest.approx([1.0, 0.0], abs=1e-12)
    model = build_model(small_config()).eval()
    with torch.no_grad():
        model.blocks[0].attn.proj_u.weight.copy_(torch.eye(32))  # heads on disjoint coordinates: orthogonal
        model.blocks[1].attn.proj_u.weight.copy_(torch.randn(8, 32).repeat(4, 1))  # every head the same subspace
    orth, same = subspace_summary(model, 0), subspace_summary(model, 1)
    assert len(orth["pairs"]) == 6 and orth["mean"] == pytest.approx(0, abs=1e-12)
    assert orth["max"] == pytest.approx(0, abs=1e-12)
    assert same["mean"] == pytest.approx(1.0) and all(p["max"] == pytest.approx(1.0) for p in same["pairs"])
    assert 0.1 < orth["random_mean"] < 0.9 and orth["random_max"] > orth["random_mean"] and "U_k" in orth["what"]
    gpt = subspace_summary(build_model(small_config(arch="gpt")).eval(), 0)
    assert "query heads" in gpt["what"] and gpt["heads"] == 4 and gpt["dim"] == 8


# ---- end to end ----------------------------------------------------------------------------------


class Setup:
    def __init__(self, root: Path, checkpoint: Path, gpt: Path, shards: Path, corpus: Path, tokenizer) -> None:
        self.root, self.checkpoint, self.gpt, self.shards, self.corpus = root, checkpoint, gpt, shards, corpus
        self.tokenizer = tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("features")
    docs = make_documents(300, seed=5)
    write_lines(root / "corpus.txt", docs)
    tokenizer = train_tokenizer(iter(docs), root / "tok", vocab_size=300)
    prepare_corpus(SourceSpec(inputs=[str(root / "corpus.txt")], text_unit="line"), root / "tok", root / "shards",
                   val_fraction=0.5, show_progress=False)  # fmt: skip
    folders = []
    for arch in ("crate", "gpt"):
        cfg = run_config_from_dict({
            "model": {"arch": arch, "vocab_size": tokenizer.vocab_size, "max_seq_len": SEQ, "d_model": 32,
                      "n_layers": 2, "n_heads": 4, "ista_lambda": 1.0},
            "data": {"path": [str(root / "shards")], "num_workers": 0},
        })  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg.model)
        with torch.no_grad():  # atoms of different norms: some dead, some dense, most in between
            for block in model.blocks:
                if arch == "crate":
                    block.ista.dict.mul_(torch.linspace(0.5, 6.0, block.ista.dict.shape[1]))
        folders.append(write_checkpoint(root / f"run-{arch}" / "checkpoints" / "step_00000001", cfg, model,
                                        tokenizer=tokenizer))  # fmt: skip
    return Setup(root, folders[0], folders[1], root / "shards", root / "corpus.txt", tokenizer)


def run_features(setup: Setup, out: Path, **kwargs) -> dict:
    args = dict(tokens=TOKENS, out=str(out), cards=4, top_k=5, show_progress=False, quiet=True)
    return features(str(setup.checkpoint), **(args | kwargs))


@pytest.fixture(scope="module")
def report(setup: Setup, tmp_path_factory) -> dict:
    return run_features(setup, tmp_path_factory.mktemp("reports") / "direct")


def strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds {name}: not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def activations(setup: Setup, hooks: list[str]) -> tuple[dict[int, np.ndarray], dict[str, torch.Tensor]]:
    """The validation sequences the report streams, and every hook's activations, run directly."""
    loaded = load(str(setup.checkpoint))
    seqs = {i: tokens.astype(np.int64) for i, tokens, _, _ in open_sequences(loaded, None, "validation", SEQ,
                                                                             TOKENS).iter()}  # fmt: skip
    ids = torch.from_numpy(np.stack([seqs[i] for i in sorted(seqs)]))
    acts = {h: [] for h in hooks}
    for start in range(0, len(ids), 8):
        _, cache = loaded.model.run_with_cache(ids[start : start + 8], names_filter=hooks)
        for h in hooks:
            acts[h].append(cache[h].reshape(-1, cache[h].shape[-1]))
    return seqs, {h: torch.cat(v) for h, v in acts.items()}


def test_report_files_and_statistics_against_a_direct_run(setup: Setup, report: dict) -> None:
    out = Path(report["out"])
    assert sorted(p.name for p in out.iterdir()) == ["density.png", "features.json", "report.md"]
    saved = strict_json(out / "features.json")
    assert saved["hooks"] == CODES == report["hooks"] and saved["tokens"] == TOKENS and saved["arch"] == "crate"
    assert saved["source"]["kind"] == "shards" and saved["source"]["split"] == "validation"
    _, acts = activations(setup, CODES)
    for hook in CODES:
        x = acts[hook]
        h = saved["per_hook"][hook]
        active = x > 0
        assert h["units"]["count"] == active.sum(0).tolist()
        assert h["units"]["max"] == pytest.approx(x.max(0).values.tolist(), rel=1e-6)
        assert h["units"]["mean"] == pytest.approx(x.double().mean(0).tolist(), rel=1e-5, abs=1e-9)
        assert h["summary"]["l0"]["mean"] == pytest.approx(active.sum(1).double().mean().item())
        assert h["summary"]["dead"]["ids"] == (~active.any(0)).nonzero().flatten().tolist()
        assert h["summary"]["dense"]["count"] == int((active.double().mean(0) > 0.5).sum())
        live = active.any(0)
        best = torch.sort(torch.where(live, x.max(0).values, -math.inf), descending=True, stable=True).indices[:4]
        assert h["carded"] == best.tolist() and [c["unit"] for c in h["cards"]] == h["carded"]
        assert 0 < h["summary"]["l0"]["mean"] < 64 and h["summary"]["dead"]["count"] > 0  # sparse codes
        assert h["summary"]["dense"]["count"] > 0
        geo = h["geometry"]
        assert [m["name"] for m in geo["matrices"]] == ["D", "D_1"] and geo["matrices"][0]["units"] == 128
        assert geo["heads"]["heads"] == 4 and h["logit_effects"]["available"]
    line = report["line"]
    assert line.startswith(f"features: 2 hooks x 128 units on {TOKENS:,} tokens -> {out} (mean L0 ")
    assert " of 128; dead " in line and "; dense " in line


def test_contexts_point_at_their_tokens_and_activations(setup: Setup, report: dict) -> None:
    seqs, acts = activations(setup, CODES)
    checked = 0
    for hook in CODES:
        for card in report["per_hook"][hook]["cards"]:
            j = card["unit"]
            contexts = card["top"] + [c for b in card["quantile_examples"] for c in b["examples"]]
            assert len(card["top"]) == 5 and [c["value"] for c in card["top"]] == sorted(
                (c["value"] for c in card["top"]), reverse=True
            )
            assert card["top"][0]["value"] == card["max"]
            for ctx in contexts:
                s, pos = divmod(ctx["row"], SEQ)
                assert (ctx["sequence"], ctx["position"]) == (s, pos)
                assert ctx["token_id"] == seqs[s][pos]
                assert acts[hook][ctx["row"], j].item() == pytest.approx(ctx["value"], rel=1e-5, abs=1e-6)
                lo = max(0, pos - 5)
                assert ctx["ids"] == seqs[s][lo : pos + 6].tolist() and len(ctx["left"]) == pos - lo
                piece = setup.tokenizer.decode([ctx["token_id"]]).replace("\n", "↵")
                assert ctx["token"] == piece and f"⟦{piece}⟧" in ctx["text"]
                checked += 1
            for b in card["quantile_examples"]:
                assert all(b["lo"] <= c["value"] <= b["hi"] for c in b["examples"])
            assert len(card["promoted"]) == len(card["suppressed"]) == 10
            values = [t["value"] for t in card["promoted"]]
            assert values == sorted(values, reverse=True) and values[0] > card["suppressed"][0]["value"]
    assert checked >= 2 * 4 * 5


def test_markdown_renders_cards_safely(setup: Setup, report: dict, tmp_path: Path) -> None:
    text = (Path(report["out"]) / "report.md").read_text()
    assert text.count("### unit ") == 8 and "| `blocks.0.ista.hook_code` | 128 | 768 |" in text
    assert "![log10 density per hook](density.png)" in text and "⟦" in text
    pre = text.split("<pre>")[1].split("</pre>")[0]
    assert "<" not in pre and "\n\n" not in pre.strip("\n")  # escaped, one block
    piece = Pieces(setup.tokenizer)
    assert piece(setup.tokenizer.encode("\n")[0]) == "↵" and piece(setup.tokenizer.encode("\x1f")[0]) == "␟"
    from crate_lm.interp.features import render_card

    card = {"unit": 0, "count": 1, "density": 0.1, "mean": 0.1, "mean_active": 1.0, "max": 1.0,
            "quantiles": {"0.5": 1.0}, "quantile_examples": [],
            "top": [{"value": 1.0, "text": "a</pre><b>`x`|y⟦<⟧"}],
            "promoted": [{"token": "<script>`", "value": 1.0}], "suppressed": []}  # fmt: skip
    rendered = "\n".join(render_card(card))
    assert "a&lt;/pre&gt;&lt;b&gt;`x`|y⟦&lt;⟧" in rendered and "<code>&lt;script&gt;`</code>" in rendered
    assert rendered.count("</pre>") == 1


def test_the_store_path_equals_the_direct_path(setup: Setup, report: dict, tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    extract(str(setup.checkpoint), hooks="blocks.*.ista.hook_code", tokens=TOKENS, out=str(acts), dtype="float32",
            chunk_tokens=10 * SEQ, show_progress=False, quiet=True)  # fmt: skip
    stored = run_features(setup, tmp_path / "from-store", store=str(acts))
    assert stored["source"]["kind"] == "store" and stored["tokens"] == report["tokens"]
    for hook in CODES:
        a, b = report["per_hook"][hook], stored["per_hook"][hook]
        assert a["units"] == b["units"] and a["summary"] == b["summary"] and a["cards"] == b["cards"]
    fewer = run_features(setup, tmp_path / "fewer", store=str(acts), tokens=SEQ * 3, layer=1)
    assert fewer["tokens"] == SEQ * 3 and fewer["hooks"] == ["blocks.1.ista.hook_code"]

    other = setup.root / "copy" / "step_00000001"
    if not other.exists():
        shutil.copytree(setup.checkpoint, other)
    out = tmp_path / "refused"
    with pytest.raises(FeaturesError, match="made from another checkpoint") as err:
        features(str(other), store=str(acts), out=str(out), show_progress=False, quiet=True)
    assert "crate-lm extract" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FeaturesError, match="holds blocks.0.ista.hook_code, blocks.1.ista.hook_code, not") as err:
        run_features(setup, out, store=str(acts), hook="blocks.0.hook_resid_post")
    assert "crate-lm extract" in str(err.value) and "--hooks 'blocks.0.hook_resid_post'" in str(err.value)
    with pytest.raises(CrateLMError, match="not a complete activation store"):
        run_features(setup, out, store=str(tmp_path / "nowhere"))
    assert not out.exists()


def test_bad_input_is_one_line_and_writes_nothing(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "report"
    (tmp_path / "a-file").write_text("mine")
    cases = [
        (dict(order="random"), "--order must be one of max, density, mean"),
        (dict(layer=2), "--layer 2 is out of range: this model has 2 blocks, layers 0-1"),
        (dict(layer="0,7"), "--layer 7 is out of range"),
        (dict(layer="first"), "--layer takes non-negative integer ids"),
        (dict(atoms="3,128"), "--atoms 128 is out of range for blocks.0.ista.hook_code, which has 128 units"),
        (dict(atoms="-1"), "--atoms takes non-negative integer ids"),
        (dict(hook="blocks.*.nothing"), "--hook pattern 'blocks.*.nothing' matches no hook point"),
        (dict(hook="blocks.0.attn.hook_q"), "is per head (B, K, T, ...), not one vector per token"),
        (dict(tokens=0), "--tokens must be an integer >= 1"),
        (dict(cards=0), "--cards must be an integer >= 1"),
        (dict(top_k=1.5), "--top_k must be an integer >= 1"),
        (dict(window=-1), "--window must be an integer >= 0"),
        (dict(threshold=float("nan")), "--threshold must be a finite number"),
        (dict(threshold="low"), "--threshold must be a finite number"),
        (dict(split=""), "--split must be a split name"),
        (dict(split="test"), "no 'test' split"),
        (dict(out=str(tmp_path / "a-file")), "is a file; choose a folder"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CrateLMError) as err:
            run_features(setup, Path(kwargs.pop("out", out)), **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), (kwargs, str(err.value))
        assert not out.exists() and (tmp_path / "a-file").read_text() == "mine"


def test_gpt_neurons_explicit_atoms_and_any_vector_hook(setup: Setup, tmp_path: Path) -> None:
    gpt = features(str(setup.gpt), layer="1", tokens=SEQ * 4, out=str(tmp_path / "gpt"), atoms="3,7", top_k=3,
                   show_progress=False, quiet=True)  # fmt: skip
    h = gpt["per_hook"]["blocks.1.mlp.hook_post"]
    assert gpt["hooks"] == ["blocks.1.mlp.hook_post"] and h["summary"]["width"] == 128
    assert [c["unit"] for c in h["cards"]] == [3, 7] and gpt["order"] == "atoms"
    assert 0.2 < h["summary"]["l0"]["mean"] / 128 < 0.8  # GELU: about half the neurons positive
    assert [m["name"] for m in h["geometry"]["matrices"]] == ["W_in", "W_out"]
    assert "query heads" in h["geometry"]["heads"]["what"] and h["logit_effects"]["available"]
    assert "skipped" not in h["logit_effects"]["note"]  # the last block: nothing after it but the norm
    resid = run_features(setup, tmp_path / "resid", hook="blocks.0.hook_resid_post", tokens=SEQ * 2, order="density",
                         data=str(setup.corpus))  # fmt: skip
    h = resid["per_hook"]["blocks.0.hook_resid_post"]
    assert resid["source"]["kind"] == "text" and h["summary"]["width"] == 32 and len(h["cards"]) == 4
    densities = [c["density"] for c in h["cards"]]
    assert densities == sorted(densities, reverse=True) and densities[0] == max(h["units"]["density"])
    assert "direct path only: block 1 skipped" in h["logit_effects"]["note"]
    assert all("\n" not in c["text"] for card in h["cards"] for c in card["top"])


def test_documents_reset_as_the_run_trained(setup: Setup, tmp_path: Path) -> None:
    """A run trained with data.reset_at_documents: positions and attention restart at documents."""
    folder = tmp_path / "reset" / "step_00000001"
    shutil.copytree(setup.checkpoint, folder)
    cfg = load_run_config(folder / "config.yaml")
    cfg.data.reset_at_documents = True
    (folder / "config.yaml").write_text(dump_run_config(cfg))
    hook = "blocks.1.ista.hook_code"
    rep = features(str(folder), layer=1, tokens=SEQ * 4, out=str(tmp_path / "out"), cards=3, top_k=3,
                   show_progress=False, quiet=True)  # fmt: skip
    assert rep["source"]["reset_at_documents"] is True
    loaded = load(str(folder))
    seqs = list(open_sequences(loaded, None, "validation", SEQ, SEQ * 4).iter())
    ids = torch.from_numpy(np.stack([s[1] for s in seqs])).long()
    doc = np.stack([s[2] for s in seqs])
    assert (doc[:, 1:] != doc[:, :-1]).any()  # the sequences do cross documents
    _, cache = loaded.model.run_with_cache(ids, names_filter=hook, position_ids=torch.from_numpy(row_positions(doc)),
                                           document_ids=torch.from_numpy(doc - doc[:, :1]))  # fmt: skip
    x = cache[hook].reshape(-1, 128)
    assert rep["per_hook"][hook]["units"]["count"] == (x > 0).sum(0).tolist()
    for card in rep["per_hook"][hook]["cards"]:
        for ctx in card["top"]:
            assert x[ctx["row"], card["unit"]].item() == pytest.approx(ctx["value"], rel=1e-5, abs=1e-6)
    _, plain = loaded.model.run_with_cache(ids, names_filter=hook)
    assert not torch.equal(plain[hook].reshape(-1, 128), x)
