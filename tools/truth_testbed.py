"""The ELK testbed end to end: a synthetic world whose facts the model provably knows, then ELK.

    python tools/truth_testbed.py                  # every stage; finished stages are kept
    python tools/truth_testbed.py --only elk       # just the ELK reports of the trained runs

Stages (the command sequence in tools/make_truth_corpus.py's docstring; each is skipped when its
output exists: the corpus, the tokenizer, the shards, a run whose last checkpoint is at the
recipe's max_steps, ELK's hidden-state cache):

1. ``tools/make_truth_corpus.py --out data/truth`` (``--entities``, ``--repeats``, ``--seed``);
2. a byte-level BPE of ``--vocab_size`` tokens on the corpus (``tools/train_tokenizer.py``);
3. token shards (``tools/prepare_data.py``);
4. ``configs/truth_crate.yaml`` and ``configs/truth_gpt.yaml`` (tiny CRATE-alpha and the GPT
   baseline, same data, steps, tokens and seed) with ``crate_lm/pretrain.py``;
5. ``crate-lm elk`` on both with ``data/truth/statements.jsonl``: behavioural accuracy on the
   held-out statements, then per layer LR, mass-mean, CCS and LR after LEACE;
6. ``docs/truth_testbed/``: ``elk_crate.json``/``elk_gpt.json``, ``elk_crate.png``/``elk_gpt.png``
   and ``results.md`` (behaviour, the per-layer AUROC tables, the stage wall times).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from crate_lm.checkpoint import finished_step
from crate_lm.errors import CrateLMError, run_cli

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "truth"
DOCS = ROOT / "docs" / "truth_testbed"
RUNS = {"crate": "configs/truth_crate.yaml", "gpt": "configs/truth_gpt.yaml"}
STAGES = ("corpus", "train", "elk")


def _run(cmd: list[str], what: str, **extra_env: str) -> None:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONWARNINGS="ignore::FutureWarning",
               **extra_env)  # fmt: skip
    print(f"truth: {what}: {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        raise CrateLMError(f"{what} failed (exit {done.returncode}); see its output above")




def corpus(args: argparse.Namespace) -> bool:
    """Stages 1-3: corpus, tokenizer, shards (each kept when it exists); whether any ran."""
    py = sys.executable
    ran = not (DATA / "shards" / "meta.json").is_file()
    if not (DATA / "statements.jsonl").is_file():
        _run([py, "tools/make_truth_corpus.py", "--out", str(DATA), "--entities", str(args.entities),
              "--repeats", str(args.repeats), "--judgements", str(args.judgements), "--seed", str(args.seed)],
             "corpus")  # fmt: skip
    if not (DATA / "tokenizer" / "tokenizer.json").is_file():
        _run([py, "tools/train_tokenizer.py", "--inputs", str(DATA / "corpus.jsonl"), "--text_field", "text",
              "--kind", "bpe", "--vocab_size", str(args.vocab_size), "--out", str(DATA / "tokenizer")], "tokenizer")  # fmt: skip
    if not (DATA / "shards" / "meta.json").is_file():
        _run([py, "tools/prepare_data.py", "--inputs", str(DATA / "corpus.jsonl"), "--text_field", "text",
              "--tokenizer", str(DATA / "tokenizer"), "--out", str(DATA / "shards"), "--val_fraction", "0.02",
              "--num_proc", "1"], "shards")  # fmt: skip
    return ran


def train(name: str, config: str) -> bool:
    """Stage 4 for one run, unless its last checkpoint is at the recipe's max_steps; whether it trained."""
    recipe = yaml.safe_load((ROOT / config).read_text())
    out, steps = ROOT / recipe["train"]["out_dir"], recipe["train"]["max_steps"]
    if finished_step(out) == steps:
        print(f"truth: {recipe['train']['out_dir']} is trained ({steps} steps); kept", flush=True)
        return False
    # one thread: CPU kernels that split a reduction over threads make runs differ in the last bits,
    # and over 1200 steps that moves the behavioural accuracy by a few points; one thread repeats exactly
    _run([sys.executable, "crate_lm/pretrain.py", "--config", config], f"training {name}", OMP_NUM_THREADS="1")
    return True


def report(timings: dict[str, float | None]) -> None:
    """Stage 5-6: ELK on both runs and the docs folder."""
    from crate_lm.interp.elk import elk, summary_table

    DOCS.mkdir(parents=True, exist_ok=True)
    lines = ["# The ELK testbed", "", "Written by `python tools/truth_testbed.py` (see its docstring and "
             "`tools/make_truth_corpus.py`). Test AUROC [95% bootstrap interval] per layer (residual stream after the "
             "block; `embed` = token + position embeddings), statements split by fact, never by template.", ""]  # fmt: skip
    for name, config in RUNS.items():
        out_dir = ROOT / yaml.safe_load((ROOT / config).read_text())["train"]["out_dir"]
        started = time.monotonic()
        rep = elk(str(out_dir), str(DATA / "statements.jsonl"), out=str(out_dir / "elk"),
                  templates=str(DATA / "templates.txt"))  # fmt: skip
        timings[f"elk {name}"] = time.monotonic() - started
        shutil.copyfile(out_dir / "elk" / "elk.json", DOCS / f"elk_{name}.json")
        shutil.copyfile(out_dir / "elk" / "elk.png", DOCS / f"elk_{name}.png")
        beh = rep["behaviour"]
        c = rep["counts"]
        lines += [f"## {name} (`{config}`)", "",
                  f"Behavioural accuracy on the {beh['facts']} held-out facts: **{beh['accuracy']:.3f}** "
                  f"[{beh['accuracy_ci'][0]:.3f}, {beh['accuracy_ci'][1]:.3f}] (log p(true value | prefix) > "
                  f"log p(false value | prefix); threshold {beh['threshold']}). Probes: {c['train_pairs']} training / "
                  f"{c['test_pairs']} test pairs, {len(rep['templates'])} templates.", "",
                  summary_table(rep), "", f"![ELK {name}](elk_{name}.png)", ""]  # fmt: skip
    lines += ["## Wall times of this invocation", ""]
    lines += [f"- {k}: " + ("kept from an earlier run" if v is None else f"{v:.0f} s") for k, v in timings.items()] + [""]
    from crate_lm.fsutil import atomic_write_bytes

    atomic_write_bytes(DOCS / "results.md", "\n".join(lines).encode("utf-8"))
    print(f"truth: wrote {DOCS.relative_to(ROOT)}/results.md", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=STAGES, help="run one stage (default: all, finished ones kept)")
    parser.add_argument("--entities", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=45)
    parser.add_argument("--judgements", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=2048)
    args = parser.parse_args(argv)

    def go() -> None:
        timings: dict[str, float | None] = {}
        stages = [args.only] if args.only else list(STAGES)
        if "corpus" in stages:
            started = time.monotonic()
            ran = corpus(args)
            timings["corpus + tokenizer + shards"] = time.monotonic() - started if ran else None
        if "train" in stages:
            for name, config in RUNS.items():
                started = time.monotonic()
                ran = train(name, config)
                timings[f"train {name}"] = time.monotonic() - started if ran else None
        if "elk" in stages:
            report(timings)

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
