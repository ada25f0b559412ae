"""ELK (crate_lm.interp.elk): the CCS loss, the probes on planted directions, LEACE, the
normalisation, the intervals, the split, the data loader, the truth-corpus generator, and the
command end to end on a tiny random-init checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crate_lm.interp.elk import (
    DEFAULT_TEMPLATES,
    METHODS,
    ElkError,
    auroc,
    bootstrap_ci,
    ccs_loss,
    elk,
    fit_ccs,
    fit_lr,
    leace_erase,
    load_statements,
    mass_mean,
    normalize,
    probe_layer,
    resolve_templates,
    split_by_group,
    split_value,
)

REPO = Path(__file__).resolve().parents[1]


def planted(n: int = 400, d: int = 16, signal: float = 1.5, seed: int = 0):
    """Contrast pairs whose truth sits along one direction v: x+ = base + s v, x- = base' - s v,
    s = +1 for true statements and -1 for false ones, plus an answer offset common to each half."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    y = rng.integers(0, 2, n).astype(bool)
    s = np.where(y, 1.0, -1.0)[:, None]
    x_pos = rng.normal(size=(n, d)) + signal * s * v + 3.0
    x_neg = rng.normal(size=(n, d)) - signal * s * v - 2.0
    return normalize(x_pos, ["t"] * n), normalize(x_neg, ["t"] * n), y


# ---- the probes --------------------------------------------------------------------------------------


def test_ccs_loss_against_a_hand_computation():
    p_pos = torch.tensor([0.9, 0.2, 0.6])
    p_neg = torch.tensor([0.3, 0.7, 0.5])
    # consistency (p+ - (1 - p-))^2: (0.9-0.7)^2, (0.2-0.3)^2, (0.6-0.5)^2 = 0.04, 0.01, 0.01
    # confidence min(p+, p-)^2: 0.09, 0.04, 0.25
    expected = (0.04 + 0.01 + 0.01) / 3 + (0.09 + 0.04 + 0.25) / 3
    assert ccs_loss(p_pos, p_neg).item() == pytest.approx(expected, abs=1e-6)
    # a consistent, confident probe has loss 0
    assert ccs_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == 0.0


def test_ccs_lr_and_mass_mean_recover_a_planted_direction_and_sit_at_chance_on_shuffled_labels():
    x_pos, x_neg, y = planted()
    tr, te = slice(0, 250), slice(250, None)
    diff = x_pos - x_neg
    lr = fit_lr(diff[tr], y[tr])
    assert auroc(lr.decision_function(diff[te]), y[te]) > 0.95
    direction, _ = mass_mean(diff[tr], y[tr])
    assert auroc(diff[te] @ direction, y[te]) > 0.95
    ccs = fit_ccs(x_pos[tr], x_neg[tr], restarts=4, epochs=300)
    a = auroc(ccs.score(x_pos[te], x_neg[te]), y[te])
    assert max(a, 1 - a) > 0.95

    shuffled = np.random.default_rng(1).permutation(y)
    lr = fit_lr(diff[tr], shuffled[tr])
    assert 0.35 < auroc(lr.decision_function(diff[te]), shuffled[te]) < 0.65
    assert 0.35 < auroc(ccs.score(x_pos[te], x_neg[te]), shuffled[te]) < 0.65


def test_leace_removes_linear_recoverability():
    x_pos, x_neg, y = planted(n=600, d=24, signal=2.0)
    diff = x_pos - x_neg
    tr, te = slice(0, 400), slice(400, None)
    assert auroc(fit_lr(diff[tr], y[tr]).decision_function(diff[te]), y[te]) > 0.95
    erased_tr, erased_te = leace_erase(diff[tr], y[tr], diff[te])
    # the class means coincide after erasure, on the data it was fitted on
    assert np.allclose(erased_tr[y[tr]].mean(0), erased_tr[~y[tr]].mean(0), atol=1e-8)
    assert 0.35 < auroc(fit_lr(erased_tr, y[tr]).decision_function(erased_te), y[te]) < 0.65


def test_probe_layer_reports_every_method_and_the_transfer_matrix():
    x_pos, x_neg, y = planted(n=300)
    templates = np.array(["a", "b", "c"] * 100)
    test = np.arange(300) >= 200
    found = probe_layer(x_pos, x_neg, y, templates, test, restarts=2, n_boot=50, ccs_epochs=300)
    assert set(found["methods"]) == set(METHODS)
    assert found["methods"]["lr"]["auroc"] > 0.95 and found["methods"]["ccs"]["auroc"] > 0.95
    assert 0.3 < found["methods"]["lr_leace"]["auroc"] < 0.7
    for m in ("lr", "ccs"):
        assert np.array(found["transfer"][m], dtype=float).shape == (3, 3)
        assert np.nanmin(np.array(found["transfer"][m], dtype=float)) > 0.9


def test_normalisation_is_per_template_mean_zero_and_mean_squared_norm_d():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 8))
    # the same data under two templates with different offsets and scales normalises to the same thing
    x = np.concatenate([base * 3.0 + 10.0, base * 0.5 - 4.0])
    names = ["a"] * 50 + ["b"] * 50
    out = normalize(x, names)
    for rows in (slice(0, 50), slice(50, None)):
        assert np.allclose(out[rows].mean(0), 0, atol=1e-12)
        assert (out[rows] ** 2).sum(1).mean() == pytest.approx(8.0)
    assert np.allclose(out[:50], out[50:])


# ---- metrics and the split ----------------------------------------------------------------------------


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_more_data():
    widths = []
    for n in (100, 2000):
        rng = np.random.default_rng(n)
        y = rng.integers(0, 2, n).astype(bool)
        scores = y + rng.normal(scale=1.0, size=n)
        r = bootstrap_ci(scores, scores > 0.5, y, n=1000, seed=0)
        assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]
        assert r["auroc_ci"][0] <= r["auroc"] <= r["auroc_ci"][1]
        widths.append(r["auroc_ci"][1] - r["auroc_ci"][0])
        assert bootstrap_ci(scores, scores > 0.5, y, n=1000, seed=0) == r  # seeded
    assert widths[1] < widths[0] / 2


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + y, 1)  # with ties
    assert auroc(scores, y) == pytest.approx(roc_auc_score(y, scores))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_split_by_group_keeps_groups_and_templates_together(tmp_path):
    rows = []
    for i in range(40):
        rows.append({"text": f"Fact {i} is so.", "label": 1, "group": f"g{i}"})
        rows.append({"text": f"Fact {i} is not so.", "label": 0, "group": f"g{i}"})
    rows.append({"text": "A lone statement.", "label": 1})  # its own group: its text
    pairs, _ = load_statements(write_jsonl(tmp_path / "s.jsonl", rows), resolve_templates(None))
    test = split_by_group([p.group for p in pairs], 0.3, seed=4)
    sides: dict[str, set] = {}
    statements: dict[str, set] = {}
    for p, t in zip(pairs, test):
        sides.setdefault(p.group, set()).add(bool(t))
        statements.setdefault(p.positive[p.start_pos :].split(".")[0], set()).add(bool(t))
    assert all(len(s) == 1 for s in sides.values())
    assert len(statements) == 81 and all(len(s) == 1 for s in statements.values())
    assert 0.2 < test.mean() < 0.4
    assert (split_by_group([p.group for p in pairs], 0.3, seed=4) == test).all()


# ---- data ----------------------------------------------------------------------------------------------


def test_loading_statements_and_explicit_pairs(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "Paris is in France.", "label": 1},
        "",
        {"positive": "2 + 2 = 4? yes", "negative": "2 + 2 = 4? no", "label": 1, "template": "math", "group": 7},
    ])  # fmt: skip
    templates = resolve_templates(None)
    pairs, statements = load_statements(path, templates)
    assert len(pairs) == len(DEFAULT_TEMPLATES) + 1
    assert pairs[0].positive == "Paris is in France. Is this true? yes"
    assert pairs[0].negative == "Paris is in France. Is this true? no"
    assert pairs[1].positive == "True or false: Paris is in France. Answer: True"
    assert pairs[1].positive[pairs[1].start_pos :].startswith("Paris")
    assert {p.template for p in pairs} == {"t0", "t1", "t2", "math"}
    assert pairs[-1].group == "7" and pairs[-1].label == 1
    assert statements == [{"text": "Paris is in France.", "label": 1, "group": "Paris is in France."}]
    custom = resolve_templates(["Q: {statement} A: {Yes|No}"])
    assert load_statements(path, custom)[0][0].negative == "Q: Paris is in France. A: No"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"text": "x"}', "line 2: no 'label'"),
        ('{"text": "x", "label": 2}', "line 2: 'label' must be 0 or 1"),
        ('{"positive": "a", "label": 1}', "line 2: expected"),
        ('{"text": "", "label": 1}', "line 2: 'text' must be a non-empty string"),
        ("[1, 2]", "line 2: expected a JSON object"),
    ],
)
def test_malformed_lines_are_one_line_errors_naming_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "fine.", "label": 1}', line])
    with pytest.raises(ElkError, match=message) as err:
        load_statements(path, resolve_templates(None))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("template", ["no statement {yes|no}", "{statement} no alternation", "{statement} {a|a}"])
def test_bad_templates_are_errors(template):
    with pytest.raises(ElkError, match="template"):
        resolve_templates([template])


def test_split_value_finds_the_value_after_the_common_prefix():
    assert split_value("Zal lives in Rimmoor.", "Zal lives in Tikmoor.") == ("Zal lives in", " Rimmoor", " Tikmoor")
    assert split_value("Zal is 23 years old.", "Zal is 45 years old.") == ("Zal is", " 23", " 45")
    assert split_value("Zal's friend is Bo.", "Zal's friend is Bokrak.") == ("Zal's friend is", " Bo", " Bokrak")
    assert split_value("Same.", "Other.") is None


# ---- the truth corpus ------------------------------------------------------------------------------------


def test_truth_corpus_is_deterministic_and_never_contains_a_statement(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import make_truth_corpus as gen
    finally:
        sys.path.remove(str(REPO / "tools"))
    counts = gen.write(tmp_path / "a", entities=20, repeats=5, judgements=2, seed=3)
    gen.write(tmp_path / "b", entities=20, repeats=5, judgements=2, seed=3)
    gen.write(tmp_path / "c", entities=20, repeats=5, judgements=2, seed=4)
    for name in ("corpus.jsonl", "statements.jsonl", "world.json", "templates.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "corpus.jsonl").read_bytes() != (tmp_path / "c" / "corpus.jsonl").read_bytes()
    corpus = " ".join(json.loads(x)["text"] for x in (tmp_path / "a" / "corpus.jsonl").read_text().splitlines())
    statements = [json.loads(x) for x in (tmp_path / "a" / "statements.jsonl").read_text().splitlines()]
    assert counts["statements"] == len(statements) == 10 * 4 * 2
    world = json.loads((tmp_path / "a" / "world.json").read_text())
    for s in statements:
        assert s["text"] not in corpus  # the exact statement is never trained on
    for name in world["held_out"]:  # ... while its facts are, in other phrasings
        assert world["facts"][name]["city"] in corpus and name in corpus
    by_group: dict[str, list[int]] = {}
    for s in statements:
        by_group.setdefault(s["group"], []).append(s["label"])
    assert all(sorted(v) == [0, 1] for v in by_group.values())
    # the statement form is trained on for the other people
    held_in = [n for n in world["names"] if n not in world["held_out"]]
    assert any(f"{n} lives in {world['facts'][n]['city']}." in corpus for n in held_in)
    # judgements only about the held-in people, both verdicts; the templates parse
    assert "That is true." in corpus and "That is false." in corpus
    judged = {m.group(1).strip().split(" ")[0].removesuffix("'s")
              for m in re.finditer(r"([^.]*)\. That is (?:true|false)\.", corpus)}  # fmt: skip
    assert judged and not judged & set(world["held_out"])
    assert len(resolve_templates(str(tmp_path / "a" / "templates.txt"))) == 4


# ---- end to end ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A random-init tiny CRATE checkpoint with its tokenizer, and a statements file."""
    from crate_lm.config import run_config_from_dict
    from crate_lm.data import train_tokenizer
    from crate_lm.model import build_model
    from tests.data_fixtures import make_documents, write_checkpoint

    root = tmp_path_factory.mktemp("elk")
    docs = make_documents(200, seed=2)
    tokenizer = train_tokenizer(iter(docs), root / "tok", vocab_size=300)
    cfg = run_config_from_dict({
        "model": {"vocab_size": tokenizer.vocab_size, "max_seq_len": 64, "d_model": 32, "n_layers": 2, "n_heads": 4},
        "data": {"path": [str(root / "shards")], "num_workers": 0},
    })  # fmt: skip
    torch.manual_seed(0)
    checkpoint = write_checkpoint(root / "run" / "checkpoints" / "step_00000001", cfg, build_model(cfg.model),
                                  tokenizer=tokenizer)  # fmt: skip
    rows = []
    for i, city in enumerate(["Rome", "Oslo", "Lima", "Kyiv", "Baku", "Doha", "Riga", "Bern"]):
        rows.append({"text": f"Person {i} lives in {city}.", "label": 1, "group": f"p{i}"})
        rows.append({"text": f"Person {i} lives in Nowhere.", "label": 0, "group": f"p{i}"})
    return checkpoint.parent.parent, write_jsonl(root / "statements.jsonl", rows)


def test_elk_end_to_end_writes_the_documented_report_and_reuses_its_cache(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    out = tmp_path / "elk"
    report = elk(str(run), str(data), out=str(out), restarts=2, ccs_epochs=100, bootstrap=200, show_progress=False)
    saved = json.loads((out / "elk.json").read_text())
    assert (out / "elk.png").stat().st_size > 1000
    for key in ("format", "run", "checkpoint", "data", "out", "templates", "token", "test_fraction", "restarts",
                "bootstrap", "ccs_epochs", "seed", "counts", "behaviour", "layers", "methods", "results", "ccs_loss", "transfer",
                "cache", "plot", "line"):  # fmt: skip
        assert key in saved, key
    assert saved["format"] == "crate_lm.elk.v1" and saved["layers"] == ["embed", "0", "1"]
    assert saved["counts"] == {"statements": 16, "pairs": 48, "groups": 8, "train_pairs": 30, "test_pairs": 18}
    for layer in saved["layers"]:
        for m in METHODS:
            r = saved["results"][layer][m]
            assert set(r) == {"accuracy", "accuracy_ci", "auroc", "auroc_ci"}
        assert len(saved["transfer"][layer]["lr"]) == 3
    beh = saved["behaviour"]
    assert beh["facts"] == 8 and 0 <= beh["accuracy"] <= 1 and beh["threshold"] == 0.9
    err = capsys.readouterr().err
    assert ("warning: the model's own behavioural accuracy" in err) == (not beh["ok"])
    cache = out / saved["cache"]
    stamp = cache.stat().st_mtime_ns
    again = elk(
        str(run), str(data), out=str(out), restarts=2, ccs_epochs=100, bootstrap=200, show_progress=False, quiet=True
    )
    assert cache.stat().st_mtime_ns == stamp and again["results"] == report["results"]
    mean = elk(
        str(run),
        str(data),
        out=str(out),
        token="mean",
        restarts=2,
        ccs_epochs=100,
        bootstrap=200,
        show_progress=False,
        quiet=True,
    )
    assert mean["cache"] != saved["cache"] and (out / mean["cache"]).is_file()


def test_elk_validates_before_writing(tiny_run, tmp_path):
    run, data = tiny_run
    out = tmp_path / "never"
    one_label = write_jsonl(tmp_path / "one.jsonl", [{"text": f"s {i}.", "label": 1} for i in range(6)])
    for kwargs, message in [
        ({"data": str(one_label)}, "only one label"),
        ({"data": str(data), "token": "first"}, "--token must be one of"),
        ({"data": str(data), "test_fraction": 1.5}, "--test_fraction"),
        ({"data": str(tmp_path / "missing.jsonl")}, "no such file"),
    ]:
        with pytest.raises(ElkError, match=message):
            elk(str(run), out=str(out), show_progress=False, **kwargs)
    assert not out.exists()


def test_cli_errors_are_one_line(tiny_run, tmp_path):
    run, data = tiny_run
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "ok.", "label": 1}', '{"text": "x", "label": "yes"}'])
    for args, message in [
        (["/nowhere", "--data", str(data)], "no such run"),
        ([str(run), "--data", str(bad)], "line 2: 'label' must be 0 or 1"),
        ([str(run), "--data", str(data), "--token", "first"], "--token must be one of"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "crate_lm.cli", "elk", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
        assert proc.stderr.startswith("error: ") and message in proc.stderr


def test_value_log_probabilities_equal_a_direct_forward(tiny_run):
    """log p(value | prefix), batched with padding, against one unpadded forward per item."""
    import crate_lm
    from crate_lm.interp.elk import _value_logprob

    run, _ = tiny_run
    lm = crate_lm.load(run)
    items = [("Person 1 lives in", " Oslo"), ("Person 12 is", " a very long value here"), ("A", " b")]
    batched = _value_logprob(lm, items, batch_size=3)
    for (prefix, value), got in zip(items, batched):
        head = [lm.tokenizer.eod_id, *lm.tokenizer.encode(prefix)]
        full = [lm.tokenizer.eod_id, *lm.tokenizer.encode(prefix + value)]
        assert full[: len(head)] == head
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([full])).logits[0].float(), -1)
        want = sum(float(logp[i - 1, full[i]]) for i in range(len(head), len(full)))
        assert got == pytest.approx(want, abs=1e-4)
