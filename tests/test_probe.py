"""k-sparse probing (``crate_lm.interp.probe``).

On synthetic activations: a planted feature (unit 17 = the label) is found at k = 1 with a near
perfect probe, a shuffled label scores at chance at every k, the ranking equals a direct
computation, the split never cuts a document. End to end: ``probe()`` on a tiny CRATE and a
tiny GPT checkpoint over a tiny corpus of play scenes writes probe.json and one PNG per label,
its activations are exactly a direct ``run_with_cache``, several passes give one pass's result,
and a bad argument writes nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import crate_lm.interp.probe as probe_module
from crate_lm.checkpoint import load
from crate_lm.config import run_config_from_dict
from crate_lm.data import SourceSpec, prepare_corpus, train_tokenizer
from crate_lm.errors import CrateLMError
from crate_lm.interp.extract import open_sequences
from crate_lm.interp.labels import label_sequence
from crate_lm.interp.probe import (
    ProbeError,
    chance_f1,
    collect,
    fit_k_sparse,
    parse_ks,
    probe,
    rank_units,
    split_by_document,
    summary_table,
)
from crate_lm.model import build_model
from tests.data_fixtures import write_checkpoint

# ---- synthetic activations --------------------------------------------------------------------------


def planted(n: int = 4000, m: int = 64, rate: float = 0.3, seed: int = 0):
    """Gaussian X (n, m) whose unit 17 is the label plus tiny noise; documents of 20 rows."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < rate
    X = rng.normal(size=(n, m)).astype(np.float32)
    X[:, 17] = y + 0.01 * rng.normal(size=n)
    return X, y, np.arange(n) // 20


def halves(X, y, doc, seed: int = 0):
    test = split_by_document(doc, 0.3, seed)
    return X[~test], y[~test], X[test], y[test]


def test_planted_unit_is_found_at_k1() -> None:
    X, y, doc = planted()
    result = fit_k_sparse(*halves(X, y, doc), ks=(1, 2, 4, 8, 16, 32, 100))
    assert list(result["k"]) == ["1", "2", "4", "8", "16", "32", "64"]  # capped at the width, duplicates dropped
    one = result["k"]["1"]
    assert one["units"] == [17] and one["f1"] > 0.98 and one["auroc"] > 0.99 and one["balanced_accuracy"] > 0.98
    assert result["k"]["8"]["units"][0] == 17 and len(result["k"]["8"]["units"]) == 8
    assert "units" not in result["k"]["64"] and result["all"]["f1"] > 0.98  # ids listed for k <= 32 only
    assert result["width"] == 64 and result["train"]["tokens"] + result["test"]["tokens"] == 4000
    assert abs(result["test"]["positive_rate"] - 0.3) < 0.05
    assert result["f1_chance"] == pytest.approx(chance_f1(result["test"]["positive_rate"]))


def test_f_stat_ranking_finds_it_too_and_scale_does_not_matter() -> None:
    X, y, doc = planted()
    X[:, 17] *= 1e-3  # the planted unit tiny, a noise unit huge: standardisation makes the fit scale-free
    X[:, 3] *= 1e3
    result = fit_k_sparse(*halves(X, y, doc), ks=(1, 4), method="f_stat", include_all=False)
    assert result["k"]["1"]["units"] == [17] and result["k"]["1"]["f1"] > 0.98 and "all" not in result


def test_shuffled_label_scores_chance_at_every_k() -> None:
    X, y, doc = planted()
    shuffled = np.random.default_rng(1).permutation(y)
    result = fit_k_sparse(*halves(X, shuffled, doc))
    ceiling = result["f1_chance"]  # F1 of predicting every token positive
    for k, scores in [*result["k"].items(), ("all", result["all"])]:
        assert abs(scores["auroc"] - 0.5) < 0.07, (k, scores)
        assert abs(scores["balanced_accuracy"] - 0.5) < 0.07, (k, scores)
        assert 0.25 < scores["f1"] < ceiling + 0.03, (k, scores)  # about p / (p + 1/2) for random guesses


def test_rank_units_equals_a_direct_computation() -> None:
    from scipy.stats import f_oneway

    rng = np.random.default_rng(2)
    X = rng.normal(size=(500, 12)) * rng.uniform(0.1, 5, size=12) + rng.normal(size=12)
    y = rng.random(500) < 0.4
    X[y, 5] += 2.0
    X[:, 9] = 1.0  # constant: no F statistic (NaN), ranked last by f_stat
    mean_diff = [abs(X[y, j].mean() - X[~y, j].mean()) for j in range(12)]
    assert rank_units(X, y).tolist() == sorted(range(12), key=lambda j: -mean_diff[j])
    f = [0.0 if j == 9 else f_oneway(X[y, j], X[~y, j]).statistic for j in range(12)]
    order = rank_units(X, y, "f_stat").tolist()
    assert order[0] == 5 and order[-1] == 9 and order == sorted(range(12), key=lambda j: (-f[j], j))
    with pytest.raises(ProbeError, match="mean_diff, f_stat"):
        rank_units(X, y, "t_test")


def test_split_by_document_never_cuts_a_document() -> None:
    rng = np.random.default_rng(3)
    ids = rng.choice(10_000, size=50, replace=False)
    doc = np.repeat(ids, rng.integers(1, 40, size=50))
    rng.shuffle(doc)  # rows of a document need not be adjacent
    test = split_by_document(doc, 0.3, seed=0)
    for d in ids:
        assert len(set(test[doc == d])) == 1
    assert len(np.unique(doc[test])) == 15 and test.any() and (~test).any()
    assert np.array_equal(test, split_by_document(doc, 0.3, seed=0))
    assert not np.array_equal(test, split_by_document(doc, 0.3, seed=1))
    three = np.array([4, 4, 9, 7])
    for fraction in (0.01, 0.99):  # at least one document per side
        mask = split_by_document(three, fraction)
        assert len(np.unique(three[mask])) == (1 if fraction < 0.5 else 2) and (~mask).any()
    with pytest.raises(ProbeError, match="at least 2"):
        split_by_document(np.zeros(10, dtype=int))
    with pytest.raises(ProbeError, match="test_fraction"):
        split_by_document(doc, 1.0)


def test_degenerate_split_names_the_label() -> None:
    X, y, doc = planted()
    X_train, y_train, X_test, y_test = halves(X, y, doc)
    with pytest.raises(ProbeError) as caught:
        fit_k_sparse(X_train, y_train, X_test, np.zeros_like(y_test), label="speaker")
    message = str(caught.value)
    assert "label 'speaker'" in message and "test split holds no positive" in message and "--tokens" in message
    with pytest.raises(ProbeError, match="training split holds no negative"):
        fit_k_sparse(X_train, np.ones_like(y_train), X_test, y_test)


def test_parse_ks() -> None:
    assert parse_ks("8, 1,2,2") == [1, 2, 8] and parse_ks(4) == [4] and parse_ks((16, 1.0)) == [1, 16]
    for bad in ("0", "1,x", [2.5], "", [True]):
        with pytest.raises(ProbeError, match="--ks"):
            parse_ks(bad)


# ---- end to end on tiny checkpoints ---------------------------------------------------------------------

SEQ = 64
PLANTED = 5
NAMES = ["ROMEO", "JULIET", "FIRST CITIZEN", "KING HENRY", "NURSE", "MERCUTIO"]
WORDS = "the of and to my thy love night sweet fair o what light is in yon window breaks sun moon".split()


def scene(rng: random.Random, i: int) -> str:
    """A short play scene in the built-in corpus's layout: heading, stage direction, speeches."""
    lines = [f"SCENE {i}. A street.", "", f"Enter {rng.choice(NAMES)} and {rng.choice(NAMES)}", ""]
    for _ in range(rng.randint(3, 5)):
        lines.append(rng.choice(NAMES))
        for _ in range(rng.randint(1, 2)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
            lines.append(" ".join(words).capitalize() + rng.choice([",", ".", "!", "?", ";"]))
        lines.append("")
    return "\n".join(lines)


class Setup:
    def __init__(self, root: Path, crate: Path, gpt: Path) -> None:
        self.root, self.crate, self.gpt = root, crate, gpt


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    """A tokenizer, shards of 240 scenes (half of them validation), a CRATE and a GPT checkpoint."""
    root = tmp_path_factory.mktemp("probe")
    rng = random.Random(0)
    scenes = [scene(rng, i) for i in range(240)]
    (root / "plays.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in scenes))
    tokenizer = train_tokenizer(iter(scenes), root / "tok", vocab_size=320)
    prepare_corpus(SourceSpec(inputs=[str(root / "plays.jsonl")]), root / "tok", root / "shards", val_fraction=0.5,
                   show_progress=False)  # fmt: skip
    folders = {}
    for arch in ("crate", "gpt"):
        model = {"arch": arch, "vocab_size": tokenizer.vocab_size, "max_seq_len": SEQ, "d_model": 32, "n_layers": 2,
                 "n_heads": 4}  # fmt: skip
        cfg = run_config_from_dict({"model": model, "data": {"path": [str(root / "shards")], "num_workers": 0}})
        torch.manual_seed(0)
        net = build_model(cfg.model)
        if arch == "crate":  # plant a digit detector: residual unit 5 is 1 on every token holding a digit
            digits = [i for i in range(tokenizer.vocab_size) if any(c.isdigit() for c in tokenizer.decode([i]))]
            with torch.no_grad():
                net.tok_emb.weight[digits, PLANTED] += 1.0
        folders[arch] = write_checkpoint(root / arch / "checkpoints" / "step_00000001", cfg, net, tokenizer=tokenizer)
    return Setup(root, folders["crate"], folders["gpt"])


ARGS = dict(tokens=1500, ks="1,2,4", batch_size=4, show_progress=False, quiet=True)


@pytest.fixture(scope="module")
def report(setup: Setup, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reports") / "both"
    return probe([str(setup.crate), str(setup.gpt.parents[1])], label="line_start,speaker,digit", out=str(out),
                 **ARGS)  # fmt: skip


def test_probe_writes_the_documented_report(setup: Setup, report: dict) -> None:
    out = Path(report["out"])
    assert sorted(p.name for p in out.iterdir()) == [
        "probe.json",
        "probe_digit.png",
        "probe_line_start.png",
        "probe_speaker.png",
    ]
    assert json.loads((out / "probe.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "probe_speaker.png").read_bytes()[:4] == b"\x89PNG"
    assert {"format", "out", "method", "ks", "test_fraction", "seed", "C", "labels", "runs", "plots", "line"} <= set(
        report
    )
    assert report["ks"] == [1, 2, 4] and list(report["labels"]) == ["line_start", "speaker", "digit"]
    crate, gpt = report["runs"]
    assert (crate["arch"], crate["name"], gpt["arch"]) == ("crate", "crate", "gpt")
    assert crate["checkpoint"] == str(setup.crate.resolve()) and gpt["checkpoint"] == str(setup.gpt.resolve())
    assert crate["representations"] == {"code": "blocks.{l}.ista.hook_code", "resid": "blocks.{l}.hook_resid_post"}
    assert list(gpt["representations"]) == ["mlp", "resid"] and crate["layers"] == [0, 1]
    assert crate["tokens"] == 24 * SEQ and crate["seq_len"] == SEQ  # ceil(1500 / 64) sequences
    assert crate["data"]["split"] == "validation" and crate["data"]["kind"] == "shards"
    for run in report["runs"]:
        for block in run["labels"].values():
            assert 0 < block["positive_rate"] < 0.3
            train, test = block["train"], block["test"]
            assert train["tokens"] + test["tokens"] == run["tokens"] and min(train["documents"], test["documents"]) > 0
            assert train["documents"] + test["documents"] == run["documents"]
            assert set(block["layers"]) == {"0", "1"}
            for layer, reps in block["layers"].items():
                assert set(reps) == set(run["representations"])
                for rep, entry in reps.items():
                    assert entry["hook"] == run["representations"][rep].format(l=layer)
                    assert entry["width"] == (128 if rep in ("code", "mlp") else 32)
                    assert list(entry["k"]) == ["1", "2", "4"]
                    assert set(entry["k"]["1"]) == {"f1", "auroc", "balanced_accuracy", "units"}
                    assert len(entry["k"]["4"]["units"]) == 4 and set(entry["all"]) == {"f1", "auroc",
                                                                                        "balanced_accuracy"}  # fmt: skip
                    assert all(0 <= v["f1"] <= 1 and 0 <= v["auroc"] <= 1 for v in [*entry["k"].values(), entry["all"]])
    line = report["line"]
    assert line.startswith("probe: line_start (") and f"-> {report['out']}" in line and "\n" not in line
    assert "2 layers x 4 representations" in line and "crate code L" in line and "gpt mlp L" in line
    table = summary_table(report).splitlines()
    assert table[0].startswith("| label | run | representation | layer | F1 k=1 | F1 k=8 | F1 all | AUROC k=1 |")
    assert len(table) == 2 + 3 * 2 * 4 and "| - |" in table[2]  # k=8 was not probed


def test_a_planted_unit_is_found_end_to_end(report: dict) -> None:
    """The CRATE checkpoint's embedding carries a digit detector in residual unit 5: labels, rows
    and the split line up only if the probe finds it at k = 1 in both layers' residual stream."""
    crate, gpt = (run["labels"]["digit"] for run in report["runs"])
    assert 0.005 < crate["positive_rate"] < 0.1 and crate["test"]["positive_rate"] > 0
    for layer in ("0", "1"):
        one = crate["layers"][layer]["resid"]["k"]["1"]
        assert one["units"] == [PLANTED] and one["f1"] > 0.95 and one["auroc"] > 0.99, one
    assert gpt["layers"]["0"]["resid"]["k"]["1"]["f1"] < 0.9  # no unit of the untouched GPT does it alone


def test_collect_equals_a_direct_forward(setup: Setup) -> None:
    loaded = load(str(setup.crate))
    sequences = open_sequences(loaded, None, "validation", SEQ, 5 * SEQ)
    hooks = ["blocks.0.ista.hook_code", "blocks.1.hook_resid_post"]
    acts, labels, doc = collect(loaded, sequences, hooks, ["speaker", "digit"], batch_size=2, show_progress=False)
    rows = list(sequences.iter())
    ids = torch.from_numpy(np.stack([r[1] for r in rows])).long()
    _, cache = loaded.model.run_with_cache(ids, names_filter=hooks)
    for name in hooks:
        assert acts[name].dtype == np.float32 and acts[name].shape == (5 * SEQ, cache[name].shape[-1])
        assert np.array_equal(acts[name], cache[name].reshape(5 * SEQ, -1).numpy())
    assert labels.shape == (5 * SEQ, 2) and np.array_equal(doc, np.concatenate([r[2] for r in rows]))
    speakers = np.concatenate([label_sequence("speaker", loaded.tokenizer, r[1]) for r in rows])
    digits = np.concatenate([label_sequence("digit", loaded.tokenizer, r[1]) for r in rows])
    assert np.array_equal(labels[:, 0], speakers) and np.array_equal(labels[:, 1], digits)
    assert speakers.any() and digits.any() and not np.array_equal(speakers, digits)
    _, one, _ = collect(loaded, sequences, hooks[:1], "speaker", show_progress=False)
    assert np.array_equal(one, speakers)
    with pytest.raises(ProbeError, match="head-major"):
        collect(loaded, sequences, ["blocks.0.attn.hook_q"], None, show_progress=False)


def test_collect_restarts_at_documents_as_the_run_trained(setup: Setup, tmp_path: Path) -> None:
    from crate_lm.interp.extract import row_positions

    loaded = load(str(setup.crate))
    loaded.cfg.data.reset_at_documents = True
    sequences = open_sequences(loaded, None, "validation", SEQ, 4 * SEQ)
    rows = list(sequences.iter())
    tokens, doc = np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows])
    assert (doc[:, 1:] != doc[:, :-1]).any()  # some sequence crosses a document boundary
    hook = "blocks.1.hook_resid_post"
    acts, _, _ = collect(loaded, sequences, [hook], None, batch_size=3, show_progress=False)
    ids = torch.from_numpy(tokens).long()
    _, reset = loaded.model.run_with_cache(ids, names_filter=[hook], position_ids=torch.from_numpy(row_positions(doc)),
                                           document_ids=torch.from_numpy(doc - doc[:, :1]))  # fmt: skip
    _, plain = loaded.model.run_with_cache(ids, names_filter=[hook])
    assert np.allclose(acts[hook], reset[hook].reshape(-1, 32).numpy(), atol=1e-6)
    assert not np.allclose(acts[hook], plain[hook].reshape(-1, 32).numpy(), atol=1e-3)


def test_several_passes_give_one_pass_result(setup: Setup, tmp_path: Path, monkeypatch) -> None:
    args = dict(label="speaker", layer="all", representations="resid", out=None, **ARGS)
    one = probe(str(setup.crate), **(args | {"out": str(tmp_path / "one")}))
    monkeypatch.setattr(probe_module, "MEMORY_BUDGET_BYTES", 1)  # one layer per pass
    two = probe(str(setup.crate), **(args | {"out": str(tmp_path / "two")}))
    assert (one["runs"][0]["passes"], two["runs"][0]["passes"]) == (1, 2)
    assert one["runs"][0]["labels"] == two["runs"][0]["labels"]
    assert list(one["runs"][0]["representations"]) == ["resid"]


def test_default_out_layer_and_text_data(setup: Setup, tmp_path: Path, capsys) -> None:
    text = tmp_path / "lines.txt"
    rng = random.Random(1)
    text.write_text("".join(scene(rng, i).replace("\n\n", "\n") + "\n" for i in range(30)))
    got = probe(str(setup.gpt), label="line_start", layer=-1, data=str(text), tokens=900, ks=[1], batch_size=4,
                show_progress=False)  # fmt: skip
    assert got["out"] == str(setup.gpt / "probe") and (setup.gpt / "probe" / "probe_line_start.png").is_file()
    run = got["runs"][0]
    assert (
        run["layers"] == [1] and run["data"]["kind"] == "text" and list(run["labels"]["line_start"]["layers"]) == ["1"]
    )
    assert capsys.readouterr().out.strip() == got["line"]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"label": "line_starts"}, "did you mean 'line_start'"),
        ({"label": "line_start,line_start"}, "more than once"),
        ({"layer": 2}, "--layer 2 is out of range"),
        ({"layer": "0,x"}, "--layer must be block indices"),
        ({"ks": "0,1"}, "--ks"),
        ({"method": "t_test"}, "--method"),
        ({"test_fraction": 1.0}, "--test_fraction"),
        ({"tokens": 0}, "--tokens"),
        ({"representations": "neurons"}, "unknown"),
        ({"representations": "mlp"}, "do not apply"),
        ({"data": "/no/such/data.txt"}, "--data"),
        ({"runs": "/no/such/run"}, "no such run"),
        ({"out": "FILE"}, "is a file"),
    ],
)
def test_bad_arguments_write_nothing(setup: Setup, tmp_path: Path, kwargs: dict, needle: str) -> None:
    (tmp_path / "file").write_text("x")
    args = {"runs": str(setup.crate), "out": str(tmp_path / "out"), **ARGS} | kwargs
    if args["out"] == "FILE":
        args["out"] = str(tmp_path / "file")
    before = sorted(p.name for p in setup.crate.iterdir())
    with pytest.raises(CrateLMError) as caught:
        probe(**args)
    assert needle in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in setup.crate.iterdir()) == before
