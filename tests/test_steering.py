"""Activation steering (``crate_lm.interp.steering``): the edit is exactly c * v where and when it
is asked for (also through the generation cache), hooks go on exit, code clamping touches one
atom, vectors refuse other models and round-trip, the three methods against hand computations,
evaluation against a direct log-prob computation, the sweep's files, and one-line CLI errors.
Tiny random-init checkpoints are written by hand next to prepared shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crate_lm.checkpoint import load
from crate_lm.config import run_config_from_dict
from crate_lm.data import SourceSpec, prepare_corpus, train_tokenizer
from crate_lm.errors import run_cli
from crate_lm.interp.steering import (
    CodeIntervention,
    SteeringError,
    SteeringVector,
    build_vector,
    evaluate,
    read_pairs,
    steering_direction,
    sweep,
)
from crate_lm.model import build_model, generate
from tests.data_fixtures import make_documents, write_checkpoint, write_lines

SEQ = 32
ROOT = Path(__file__).resolve().parents[1]
PAIRS = [
    ("I love the sweet morning light", "I hate the bitter morning light"),
    ("we love our friends", "we hate our enemies"),
    ("a kind word", "a cruel word"),
    ("joy and peace", "grief and war"),
]


class Setup:
    def __init__(self, root: Path, crate: Path, gpt: Path, wide: Path) -> None:
        self.root, self.crate, self.gpt, self.wide = root, crate, gpt, wide


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("steering")
    docs = make_documents(200, seed=3)
    write_lines(root / "corpus.txt", docs)
    tokenizer = train_tokenizer(iter(docs), root / "tok", vocab_size=300)
    prepare_corpus(SourceSpec(inputs=[str(root / "corpus.txt")], text_unit="line"), root / "tok", root / "shards",
                   val_fraction=0.5, show_progress=False)  # fmt: skip
    folders = []
    for name, arch, width in (("crate", "crate", 32), ("gpt", "gpt", 32), ("wide", "crate", 48)):
        cfg = run_config_from_dict({
            "model": {"arch": arch, "vocab_size": tokenizer.vocab_size, "max_seq_len": SEQ, "d_model": width,
                      "n_layers": 2, "n_heads": 4},
            "data": {"path": [str(root / "shards")], "num_workers": 0},
        })  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg.model)
        folders.append(write_checkpoint(root / f"run-{name}" / "checkpoints" / "step_00000001", cfg, model,
                                        tokenizer=tokenizer))  # fmt: skip
    return Setup(root, *folders)


@pytest.fixture(scope="module")
def lm(setup: Setup):
    return load(str(setup.crate))


@pytest.fixture(scope="module")
def vector(lm) -> SteeringVector:
    return build_vector(lm, PAIRS, 1)


def ids_of(lm, text: str = "I love the morning and the night") -> torch.Tensor:
    return lm.to_tokens(text)


def n_hooks(model) -> int:
    points = sum(len(p._forward_hooks) + len(p._forward_pre_hooks) for p in model.hook_dict.values())
    return points + len(model._forward_hooks) + len(model._forward_pre_hooks)


# ---- applying -----------------------------------------------------------------------------------


def test_coefficient_zero_is_the_identity(lm, vector):
    ids = ids_of(lm)
    base = lm.model(ids).logits
    with vector.apply(lm, coefficient=0.0):
        assert torch.equal(lm.model(ids).logits, base)
    with CodeIntervention(0, 3, 0.0, mode="add").apply(lm):
        assert torch.equal(lm.model(ids).logits, base)


def test_vector_changes_only_its_layer_and_later_by_exactly_c_v(lm, vector):
    ids = ids_of(lm)
    names = [n for n in lm.model.hook_names() if "resid" in n or n == "hook_embed"]
    _, base = lm.model.run_with_cache(ids, names_filter=names)
    c, start = 3.0, 2
    with vector.apply(lm, coefficient=c, from_position=start):
        _, steered = lm.model.run_with_cache(ids, names_filter=names)
    for name in names:
        if name.startswith("blocks.0.") or name in ("hook_embed", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid"):
            assert torch.equal(steered[name], base[name]), name
    diff = steered["blocks.1.hook_resid_post"] - base["blocks.1.hook_resid_post"]
    assert torch.equal(diff[:, :start], torch.zeros_like(diff[:, :start]))
    expected = (c * vector.vector).expand_as(diff[:, start:])
    torch.testing.assert_close(diff[:, start:], expected, rtol=0, atol=1e-5)
    assert vector.layer == 1 and vector.hook_name() == "blocks.1.hook_resid_post"


def test_from_position_counts_absolutely_through_the_generation_cache(lm, vector):
    prompt = ids_of(lm, "I love the")
    t0 = prompt.shape[1]
    runs = {}
    for use_cache in (True, False):
        with vector.apply(lm, coefficient=40.0, layers=[0, 1], from_position=t0 + 2):
            runs[use_cache] = generate(lm.model, prompt, 10, temperature=0, use_cache=use_cache)
    assert torch.equal(runs[True], runs[False])
    base = generate(lm.model, prompt, 10, temperature=0)
    assert torch.equal(runs[True][:, : t0 + 3], base[:, : t0 + 3])  # the token at t0 + 2 is predicted from position t0 + 1
    assert not torch.equal(runs[True], base)
    with vector.apply(lm, coefficient=40.0, from_position=SEQ):  # starts after the context: nothing changes
        assert torch.equal(generate(lm.model, prompt, 10, temperature=0), base)


def test_hooks_are_removed_on_exit_and_after_an_exception(lm, vector):
    ids = ids_of(lm)
    before, base = n_hooks(lm.model), lm.model(ids).logits
    with vector.apply(lm, coefficient=5.0):
        assert n_hooks(lm.model) == before + 3  # the resid_post hook and the position pre/post hooks
    assert n_hooks(lm.model) == before and torch.equal(lm.model(ids).logits, base)
    with pytest.raises(RuntimeError, match="boom"):
        with CodeIntervention(1, 2, 9.0).apply(lm):
            raise RuntimeError("boom")
    assert n_hooks(lm.model) == before and torch.equal(lm.model(ids).logits, base)


@pytest.mark.parametrize("mode", ["clamp", "add"])
def test_code_intervention_touches_exactly_one_atom(lm, mode):
    ids = ids_of(lm)
    name = "blocks.1.ista.hook_code"
    _, base = lm.model.run_with_cache(ids, names_filter=[name, "blocks.1.hook_resid_post"])
    with CodeIntervention(1, 5, 1.0, mode=mode).apply(lm, coefficient=2.5, from_position=1):
        _, steered = lm.model.run_with_cache(ids, names_filter=[name, "blocks.1.hook_resid_post"])
    a, b = base[name], steered[name]
    expected = a.clone()
    expected[:, 1:, 5] = 2.5 if mode == "clamp" else a[:, 1:, 5] + 2.5
    assert torch.equal(b, expected)
    assert not torch.equal(steered["blocks.1.hook_resid_post"][:, 1:], base["blocks.1.hook_resid_post"][:, 1:])


def test_code_intervention_refusals(setup, lm):
    with pytest.raises(SteeringError, match="needs a CRATE model"):
        CodeIntervention(0, 1).apply(load(str(setup.gpt)))
    with pytest.raises(SteeringError, match=r"--atom 128 is out of range: the code has 128 atoms"):
        CodeIntervention(0, 128).apply(lm)
    with pytest.raises(SteeringError, match=r"--layer 2 is out of range: the model has 2 blocks"):
        CodeIntervention(2, 1).apply(lm)


# ---- vectors ------------------------------------------------------------------------------------


def test_save_load_round_trip_and_refusing_other_models(setup, lm, vector, tmp_path):
    path = vector.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(path)
    assert torch.equal(back.vector, vector.vector) and back.model == vector.model
    assert (back.hook, back.layer, back.method, back.position, back.n_pairs) == ("blocks.{layer}.hook_resid_post", 1,
                                                                               "mean_diff", "last", 4)  # fmt: skip
    assert back.model["checkpoint"] == str(setup.crate) and back.model["d_model"] == 32
    with pytest.raises(SteeringError, match=r"another model \(d_model 32 vs 48; dict_width 128 vs 192.*crate-lm steer build"):
        back.apply(load(str(setup.wide)), coefficient=1.0)
    with pytest.raises(SteeringError, match=r"arch 'crate' vs 'gpt'"):
        back.apply(load(str(setup.gpt)), coefficient=1.0)
    with pytest.raises(SteeringError, match="is not a steering vector file"):
        SteeringVector.load(setup.crate / "model.safetensors")


def test_mean_diff_pca_and_logistic_against_hand_computations():
    g = torch.Generator().manual_seed(0)
    n, d = 12, 6
    direction = torch.tensor([1.0, 2.0, 0.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    neg = 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)  # separable along the direction
    scale = torch.linspace(1.0, 2.0, n, dtype=torch.float64)[:, None]
    pos = neg + scale * direction + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    mean = (pos - neg).mean(0)
    assert torch.allclose(steering_direction(pos, neg, "mean_diff"), mean)
    centred = ((pos - neg) - mean).numpy()
    first = torch.from_numpy(np.linalg.svd(centred)[2][0])  # the first principal component
    v = steering_direction(pos, neg, "pca")
    assert abs(torch.nn.functional.cosine_similarity(v, first, 0)) == pytest.approx(1.0, abs=1e-9)
    assert v @ mean > 0 and torch.allclose(v, (first @ mean) * first)
    w = steering_direction(pos, neg, "logistic")
    assert w @ mean > 0
    assert (pos @ w).min() > (neg @ w).max()  # a threshold on the direction separates the classes


def test_build_vector_reads_the_last_and_the_mean_token(lm):
    name = "blocks.0.hook_resid_post"
    last, mean = [], []
    for pos, neg in PAIRS:
        rows = []
        for text in (pos, neg):
            _, cache = lm.model.run_with_cache(lm.to_tokens(text), names_filter=name)
            rows.append((cache[name][0, -1].double(), cache[name][0].double().mean(0)))
        last.append(rows[0][0] - rows[1][0])
        mean.append(rows[0][1] - rows[1][1])
    for position, diffs in (("last", last), ("mean", mean)):
        v = build_vector(lm, PAIRS, 0, position=position, hook="blocks.{layer}.hook_resid_post", batch_size=3)
        torch.testing.assert_close(v.vector, torch.stack(diffs).mean(0).float(), rtol=1e-4, atol=1e-5)


def test_pairs_files_are_checked(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps({"positive": "a", "negative": "b"}) + "\n\n" + json.dumps({"positive": "c", "negative": "d"}))
    assert read_pairs(good) == [("a", "b"), ("c", "d")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"positive": "a", "negative": "b"}) + "\n{oops\n")
    with pytest.raises(SteeringError, match="line 2: not JSON"):
        read_pairs(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SteeringError, match="holds no contrast pairs"):
        read_pairs(tmp_path / "empty.jsonl")


# ---- evaluation and sweeps ----------------------------------------------------------------------


@torch.no_grad()
def direct_logprob(lm, prompt: str, target: str) -> float:
    p, t = lm.tokenizer.encode(prompt), lm.tokenizer.encode(target)
    logp = torch.log_softmax(lm.model(torch.tensor([p + t])).logits[0].double(), -1)
    return float(sum(logp[len(p) - 1 + i, tok] for i, tok in enumerate(t)))


def test_evaluate_against_a_direct_computation(lm, vector):
    prompts, targets = ["I love the", "we hate our"], [" morning light", " friends"]
    neutral = ["joy and peace and the morning", "a kind word for our friends"]
    zero = evaluate(lm, vector, 0.0, prompts, targets=targets, neutral=neutral)
    assert zero["kl"] == 0.0 and zero["ppl_ratio"] == 1.0 and zero["effect"] == 0.0
    c = 6.0
    result = evaluate(lm, vector, c, prompts, targets=targets, neutral=neutral)
    base = [direct_logprob(lm, p, t) for p, t in zip(prompts, targets)]
    with vector.apply(lm, coefficient=c):
        steered = [direct_logprob(lm, p, t) for p, t in zip(prompts, targets)]
    changes = [s - b for s, b in zip(steered, base)]
    lengths = [len(lm.tokenizer.encode(t)) for t in targets]
    assert result["effect"] == pytest.approx(np.mean(changes), abs=1e-4)
    assert result["effect_per_token"] == pytest.approx(np.mean([x / n for x, n in zip(changes, lengths)]), abs=1e-4)
    assert result["kl"] > 0 and result["neutral_tokens"] == sum(len(lm.tokenizer.encode(t)) for t in neutral)
    # the next-token set: log of the total probability of the set
    token = lm.tokenizer.encode("I love the")[-1:]  # an id: a text must be one token
    tokens = evaluate(lm, vector, c, ["I love"], target_tokens=token, neutral=neutral)
    probe = torch.tensor([lm.tokenizer.encode("I love")])
    with torch.no_grad():
        before = torch.log_softmax(lm.model(probe).logits[0, -1].double(), -1)[token[0]]
        with vector.apply(lm, coefficient=c):
            after = torch.log_softmax(lm.model(probe).logits[0, -1].double(), -1)[token[0]]
    assert tokens["effect"] == pytest.approx(float(after - before), abs=1e-4)
    with pytest.raises(SteeringError, match=r"target token ' the' is 2 tokens"):
        evaluate(lm, vector, c, ["I love"], target_tokens=" the", neutral=neutral)


def test_sweep_writes_its_grids_and_the_best_cell_per_budget(lm, tmp_path):
    report = sweep(lm, PAIRS, "all", "-4,0,4", ["I love the"], targets=[" morning"], neutral_tokens=64,
                   out=tmp_path / "sweep", show_progress=False, quiet=True)  # fmt: skip
    out = tmp_path / "sweep"
    assert report["out"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.png"]
    saved = json.loads((out / "sweep.json").read_text())
    for key in ("layers", "coefficients", "effect", "effect_per_token", "kl", "ppl_ratio", "cells", "best", "kind"):
        assert key in saved
    assert saved["layers"] == [0, 1] and saved["coefficients"] == [-4.0, 0.0, 4.0]
    assert np.array(saved["effect"]).shape == (2, 3) and np.array(saved["kl"]).shape == (2, 3)
    assert [row[1] for row in saved["kl"]] == [0.0, 0.0] and saved["neutral_tokens"] == 64
    for entry in saved["best"]:
        fits = [c for c in saved["cells"] if c["kl"] <= entry["kl_budget"]]
        assert entry["best"]["effect"] == max(c["effect"] for c in fits)
    code = sweep(lm, CodeIntervention(1, 2, mode="add"), None, [0, 3], ["I love the"], targets=[" morning"],
                 neutral_tokens=64, out=tmp_path / "code", show_progress=False, quiet=True)  # fmt: skip
    assert code["layers"] == [1] and code["kl"][0][0] == 0.0
    with pytest.raises(SteeringError, match="--coefficients must be"):
        sweep(lm, PAIRS, "all", "1,x", ["I"], out=tmp_path / "x", show_progress=False)


# ---- the command line ---------------------------------------------------------------------------


def cli_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from crate_lm.cli import _fire

    monkeypatch.setattr(sys, "argv", ["crate-lm", *args])
    rc = run_cli(_fire)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_errors_are_one_line(setup, tmp_path, monkeypatch, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in PAIRS))
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(pairs.read_text() + '{"positive": "x"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("I love the\\nmorning\nwe hate\n")
    vec = str(tmp_path / "v.safetensors")
    rc, out, _ = cli_in_process(monkeypatch, capsys, "steer", "build", str(setup.crate), "--pairs", str(pairs),
                                "--layer", "1", "--out", vec)  # fmt: skip
    assert rc == 0 and "mean_diff vector from 4 pairs at blocks.1.hook_resid_post" in out
    crate, gpt, wide = str(setup.crate), str(setup.gpt), str(setup.wide)
    cases = [
        (["steer", "bild", crate], "unknown subcommand 'bild' of crate-lm steer (did you mean build?)"),
        (["steer"], "crate-lm steer needs a subcommand: apply, build, sweep"),
        (["steer", "build", crate, "--pairz", str(pairs)], "unknown option --pairz for crate-lm steer build (did you mean --pairs?)"),
        (["steer", "build", crate, "--pairs", str(tmp_path / "none.jsonl"), "--layer", "0", "--out", vec], "no such file"),
        (["steer", "build", str(tmp_path / "norun"), "--pairs", str(pairs), "--layer", "0", "--out", vec], "no such run"),
        (["steer", "build", crate, "--pairs", str(tmp_path / "empty.jsonl"), "--layer", "0", "--out", vec], "holds no contrast pairs"),
        (["steer", "build", crate, "--pairs", str(malformed), "--layer", "0", "--out", vec], "malformed.jsonl line 5"),
        (["steer", "build", crate, "--pairs", str(pairs), "--layer", "7", "--out", vec], "--layer 7 is out of range"),
        (["steer", "apply", wide, "--vector", vec, "--prompts", str(prompts)], "built on another model (d_model 32 vs 48"),
        (["steer", "apply", crate, "--atom", "999", "--layer", "0", "--prompt", "I"], "--atom 999 is out of range"),
        (["steer", "apply", gpt, "--atom", "1", "--layer", "0", "--prompt", "I"], "code steering (--atom) needs a CRATE model"),
        (["steer", "sweep", crate, "--vector", vec, "--coefficients", "1,two", "--prompt", "I"], "--coefficients must be"),
    ]  # fmt: skip
    for args, message in cases:
        rc, _, err = cli_in_process(monkeypatch, capsys, *args)
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, (args, err)
    rc, out, _ = cli_in_process(monkeypatch, capsys, "steer", "apply", crate, "--vector", vec, "--coefficient", "3",
                                "--prompts", str(prompts), "--target", " morning", "--neutral_tokens", "64",
                                "--max_new_tokens", "5", "--json")  # fmt: skip
    result = json.loads(out)
    assert rc == 0 and result["kind"] == "targets" and result["n_prompts"] == 2 and "steered" in result


def test_cli_from_another_directory(setup, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in PAIRS))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    build = subprocess.run([sys.executable, "-m", "crate_lm.cli", "steer", "build", str(setup.crate), "--pairs", "pairs.jsonl",
                            "--layer", "0", "--out", "v.safetensors"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert build.returncode == 0, build.stderr
    assert (tmp_path / "v.safetensors").is_file()
    gen = subprocess.run([sys.executable, "-m", "crate_lm.cli", "generate", str(setup.crate), "--prompt", "I love",
                          "--steer", "v.safetensors", "--coefficient", "8", "--max_new_tokens", "5", "--seed", "1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("=== unsteered ===\nI love") and "=== steered: mean_diff vector" in gen.stdout
