"""The sparse-features study the README reports: CRATE-alpha beside the GPT baseline on the
built-in corpus, and the sparsity / loss trade-off of ``model.ista_lambda``.

    make study                                  # prepares the built-in corpus if needed, then this
    python tools/feature_study.py               # the same, once data/shakespeare/shards exists
    python tools/feature_study.py --only train  # just the training runs

1. Training (a run whose last checkpoint is at ``--steps`` is kept as it is): every run uses
   ``configs/default.yaml`` (the built-in default recipe: tiny preset, 300 steps of 16 x 256
   tokens, seed 1234) with one change each:
     runs/default               CRATE-alpha, ista_lambda 0.1 (the default run itself, `make demo`)
     runs/study/gpt             the GPT baseline (--model.arch gpt)
     runs/study/lambda_<v>      CRATE-alpha with --model.ista_lambda v, for v in --lambdas
2. Features (``crate_lm.interp.features``) of every run over the validation split: per layer
   the mean L0 of the code (GPT: of the MLP neurons, active = > 0), dead and dense fractions,
   and the mean |cos| between the atoms (GPT: between the neurons' input directions).
3. k-sparse probing (``crate_lm.interp.probe``) of CRATE's code and residual stream beside the
   GPT baseline's MLP neurons and residual stream, for ``--labels``, every layer; and of the
   code of every lambda run.
4. Writes ``docs/feature_study/``: study.json (every figure), study.md (the tables the README
   quotes), tradeoff.png (code sparsity against validation loss), probe_<label>.png, and the
   default run's feature report (features/report.md with its atom cards).

Validation loss is the run's own last evaluation (the trainer's, on the validation split).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crate_lm.checkpoint import finished_step  # noqa: E402
from crate_lm.errors import CrateLMError, run_cli  # noqa: E402
from crate_lm.fsutil import atomic_savefig  # noqa: E402

DEFAULT_LAMBDA = 0.1
CONFIG = "configs/default.yaml"


def fmt_lambda(value: float) -> str:
    return f"{value:g}"


def study_runs(lambdas: list[float]) -> dict[str, dict]:
    """name -> {out, overrides, arch, ista_lambda} of every run of the study."""
    runs = {
        "crate": {"out": "runs/default", "overrides": [], "arch": "crate", "ista_lambda": DEFAULT_LAMBDA},
        "gpt": {"out": "runs/study/gpt", "overrides": ["--model.arch", "gpt"], "arch": "gpt", "ista_lambda": None},
    }
    for value in lambdas:
        if value == DEFAULT_LAMBDA:
            continue
        name = f"lambda_{fmt_lambda(value)}"
        runs[name] = {"out": f"runs/study/{name}", "overrides": ["--model.ista_lambda", str(value)], "arch": "crate",
                      "ista_lambda": value}  # fmt: skip
    return runs




def train(name: str, spec: dict, steps: int) -> float:
    """Train one run unless it is finished; returns the seconds spent."""
    out = ROOT / spec["out"]
    if finished_step(out) == steps:
        print(f"study: {spec['out']} is trained ({steps} steps); kept", flush=True)
        return 0.0
    cmd = [sys.executable, "crate_lm/pretrain.py", "--config", CONFIG, "--train.out_dir", spec["out"],
           "--train.max_steps", str(steps), *spec["overrides"]]  # fmt: skip
    print(f"study: training {name}: {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               PYTHONWARNINGS="ignore::FutureWarning")  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        raise CrateLMError(f"training {name} failed (exit {done.returncode}); see its output above")
    return time.monotonic() - started


def last_validation(out: Path) -> dict:
    """The run's last validation figures from its metrics.jsonl."""
    last = None
    with open(out / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if "val_loss" in row:
                last = row
    if last is None:
        raise CrateLMError(f"{out}/metrics.jsonl holds no validation loss; train the run to the end")
    return {"step": last["step"], "val_loss": last["val_loss"], "val_ppl": last["val_ppl"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["train", "analyse"], help="run one stage only")
    parser.add_argument("--steps", type=int, default=300, help="training steps of every run (the default recipe's)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--labels", default="speaker,line_start")
    parser.add_argument("--tokens", type=int, default=100_000, help="validation tokens for the feature statistics")
    parser.add_argument("--probe_tokens", type=int, default=60_000)
    parser.add_argument("--out", default="docs/feature_study")
    parser.add_argument("--cards", type=int, default=8, help="atom cards per layer in the default run's report")
    args = parser.parse_args()
    if DEFAULT_LAMBDA not in args.lambdas:
        raise CrateLMError(f"--lambdas must include the default {DEFAULT_LAMBDA}")
    if not (ROOT / "data/shakespeare/shards/meta.json").is_file():
        raise CrateLMError("data/shakespeare/shards is not prepared; run: python tools/prepare_data.py --builtin "
                           "--out data/shakespeare/shards --val_fraction 0.05 (or make study)")  # fmt: skip
    runs = study_runs(args.lambdas)
    if args.only != "analyse":
        for name, spec in runs.items():
            train(name, spec, args.steps)
    if args.only == "train":
        print(f"study: {len(runs)} runs trained", flush=True)
        return
    analyse(runs, args)


def layer_rows(report: dict) -> list[dict]:
    """Per layer of a features report: sparsity, dead / dense fractions and geometry."""
    rows = []
    for hook in report["hooks"]:
        entry = report["per_hook"][hook]
        summary, geometry = entry["summary"], entry["geometry"]
        matrices = {m["name"]: m for m in geometry["matrices"]}
        first = matrices.get("D") or matrices["W_in"]  # the units' own dictionary / input directions
        out = matrices.get("D_1") or matrices.get("W_out")
        rows.append({
            "layer": entry["layer"],
            "hook": hook,
            "width": summary["width"],
            "mean_l0": summary["l0"]["mean"],
            "density": summary["l0"]["mean"] / summary["width"],
            "dead_fraction": summary["dead"]["fraction"],
            "dense_fraction": summary["dense"]["fraction"],
            "cos_name": first["name"],
            "mean_abs_cos": first["mean_abs"],
            "max_abs_cos": first["max_abs"],
            "out_cos_name": out["name"] if out else None,
            "out_mean_abs_cos": out["mean_abs"] if out else None,
            "random_mean_abs_cos": first["random_mean_abs"],
            "heads_mean_cos": geometry["heads"]["mean"],
            "heads_random_mean_cos": geometry["heads"]["random_mean"],
        })  # fmt: skip
    return rows


def probe_rows(report: dict) -> dict:
    """{run name: {label: {layer: {representation: {f1_1, f1_8, f1_all, auroc_1}}}}}."""
    out: dict = {}
    for run in report["runs"]:
        for label, block in run["labels"].items():
            for layer, reps in block["layers"].items():
                for rep, entry in reps.items():
                    cell = {
                        "f1_1": entry["k"]["1"]["f1"],
                        "f1_8": entry["k"]["8"]["f1"] if "8" in entry["k"] else None,
                        "f1_all": entry["all"]["f1"] if entry.get("all") else None,
                        "auroc_1": entry["k"]["1"]["auroc"],
                        "units_1": entry["k"]["1"].get("units"),
                    }
                    out.setdefault(run["name"], {}).setdefault(label, {}).setdefault(int(layer), {})[rep] = cell
            out[run["name"]].setdefault("_rates", {})[label] = {
                "positive_rate": block["positive_rate"], "f1_chance": block["f1_chance"]}  # fmt: skip
    return out


def analyse(runs: dict[str, dict], args: argparse.Namespace) -> None:
    from crate_lm.interp.features import features
    from crate_lm.interp.probe import probe

    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, dict] = {}
    for name, spec in runs.items():
        run = ROOT / spec["out"]
        target = out / "features_default" if name == "crate" else run / "features"
        print(f"study: features of {spec['out']}", flush=True)
        report = features(str(run), layer="all", tokens=args.tokens, out=str(target), cards=args.cards)
        results[name] = {"run": spec["out"], "arch": spec["arch"], "ista_lambda": spec["ista_lambda"],
                         **last_validation(run), "tokens": report["tokens"], "layers": layer_rows(report)}  # fmt: skip

    print("study: probing CRATE beside the GPT baseline", flush=True)
    side = probe([runs["crate"]["out"], runs["gpt"]["out"]], label=args.labels, layer="all",
                 tokens=args.probe_tokens, out=str(out / "probe"), ks=(1, 2, 4, 8, 16, 32))  # fmt: skip
    sweep_names = [n for n in runs if runs[n]["arch"] == "crate"]
    print("study: probing the code of every lambda", flush=True)
    sweep = probe([runs[n]["out"] for n in sweep_names], label=args.labels, layer="all", tokens=args.probe_tokens,
                  out=str(out / "probe_lambda"), ks=(1, 8), representations="code", include_all=False)  # fmt: skip
    study = {
        "steps": args.steps,
        "config": CONFIG,
        "tokens": args.tokens,
        "probe_tokens": args.probe_tokens,
        "labels": args.labels.split(","),
        "runs": results,
        "probe": probe_rows(side),
        "probe_lambda": probe_rows(sweep),
        "probe_lambda_names": dict(zip([r["name"] for r in sweep["runs"]], sweep_names)),
        "seconds": time.monotonic() - started,
    }
    from crate_lm.fsutil import atomic_write_bytes, atomic_write_json

    atomic_write_json(out / "study.json", study)
    tradeoff_plot(study, out / "tradeoff.png")
    atomic_write_bytes(out / "study.md", render(study).encode())
    print(f"study: {len(runs)} runs analysed in {study['seconds']:.0f} s -> {out.relative_to(ROOT)} "
          f"(study.md, study.json, tradeoff.png, probe/, features_default/)")  # fmt: skip


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def tradeoff_plot(study: dict, path: Path) -> None:
    """Mean code density (over layers) against validation loss, one point per lambda; the GPT
    baseline's loss as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crate = sorted((r for r in study["runs"].values() if r["arch"] == "crate"), key=lambda r: r["ista_lambda"])
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    xs = [_mean([row["density"] for row in r["layers"]]) for r in crate]
    ys = [r["val_loss"] for r in crate]
    live = [x for x in xs if x > 0]
    floor = min(live) / 3 if live else 1e-3  # a code with no active atom at all has no place on a log axis
    shown = [x if x > 0 else floor for x in xs]
    ax.plot(shown, ys, "o-", color="tab:blue", label="CRATE-alpha")
    for r, x, y, real in zip(crate, shown, ys, xs):
        text = f"λ={r['ista_lambda']:g}" + ("" if real > 0 else ": no atom ever active")
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    gpt = study["runs"].get("gpt")
    if gpt:
        ax.axhline(gpt["val_loss"], color="tab:orange", ls="--", lw=1, label="GPT baseline")
    ax.set_xscale("log")
    ax.set_xlabel("code density (mean L0 / m, mean over layers)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"sparsity vs loss, {study['steps']} steps of the default recipe", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def render(study: dict) -> str:
    """The tables the README quotes."""
    runs, labels = study["runs"], study["labels"]
    crate, gpt = runs["crate"], runs["gpt"]
    lines = [f"# Sparse features: CRATE-alpha vs the GPT baseline ({study['steps']} steps, {CONFIG})", "",
             f"Feature statistics on {crate['tokens']:,} validation tokens; probes on about "
             f"{study['probe_tokens']:,} validation tokens, documents split 70/30. Regenerate: "
             "`python tools/feature_study.py` (or `make study`).", "",
             "## Side by side", "",
             "| layer | units | density CRATE code | density GPT neurons (> 0) | dead CRATE / GPT | "
             "dense CRATE / GPT | mean abs cos CRATE D / GPT W_in (random) | "
             + " | ".join(f"{lab} F1 k=1 code / mlp | {lab} F1 k=8 code / mlp" for lab in labels) + " |",
             "|" + "---|" * (7 + 2 * len(labels))]  # fmt: skip
    pc, pg = study["probe"].get("crate", {}), study["probe"].get("gpt", {})
    for a, b in zip(crate["layers"], gpt["layers"]):
        layer = a["layer"]
        cells = [str(layer), f"{a['width']} / {b['width']}", f"{a['density']:.3f} (L0 {a['mean_l0']:.0f})",
                 f"{b['density']:.3f} (L0 {b['mean_l0']:.0f})", f"{a['dead_fraction']:.3f} / {b['dead_fraction']:.3f}",
                 f"{a['dense_fraction']:.3f} / {b['dense_fraction']:.3f}",
                 f"{a['mean_abs_cos']:.3f} / {b['mean_abs_cos']:.3f} ({a['random_mean_abs_cos']:.3f})"]  # fmt: skip
        for lab in labels:
            ca, cb = pc[lab][layer]["code"], pg[lab][layer]["mlp"]
            cells += [f"{_f(ca['f1_1'])} / {_f(cb['f1_1'])}", f"{_f(ca['f1_8'])} / {_f(cb['f1_8'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Residual stream probes (F1 at k=1 / k=8 / all units):", "",
              "| label | layer | CRATE code | CRATE resid | GPT mlp | GPT resid | positive rate | F1 of all-positive |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for lab in labels:
        for a in crate["layers"]:
            layer = a["layer"]

            def trio(cell: dict) -> str:
                return f"{_f(cell['f1_1'])} / {_f(cell['f1_8'])} / {_f(cell['f1_all'])}"

            rate = pc["_rates"][lab]
            lines.append(f"| {lab} | {layer} | {trio(pc[lab][layer]['code'])} | {trio(pc[lab][layer]['resid'])} | "
                         f"{trio(pg[lab][layer]['mlp'])} | {trio(pg[lab][layer]['resid'])} | "
                         f"{rate['positive_rate']:.3f} | {rate['f1_chance']:.3f} |")  # fmt: skip
    lines += ["", "## The ista_lambda sweep", "",
              "| ista_lambda | validation loss | code density per layer | mean L0 of 512 | dead fraction | "
              "mean abs cos of D | " + " | ".join(f"{lab} F1 k=1 / k=8 (best layer)" for lab in labels) + " |",
              "|" + "---|" * (6 + len(labels))]  # fmt: skip
    by_run = {v: k for k, v in study["probe_lambda_names"].items()}
    sweep = sorted((r for n, r in runs.items() if r["arch"] == "crate"), key=lambda r: r["ista_lambda"])
    names = {r["run"]: n for n, r in runs.items()}
    for r in sweep:
        probes = study["probe_lambda"][by_run[names[r["run"]]]]
        cells = [f"{r['ista_lambda']:g}" + (" (default)" if r["ista_lambda"] == DEFAULT_LAMBDA else ""),
                 f"{r['val_loss']:.3f}", ", ".join(f"{row['density']:.3f}" for row in r["layers"]),
                 f"{_mean([row['mean_l0'] for row in r['layers']]):.1f}",
                 f"{_mean([row['dead_fraction'] for row in r['layers']]):.3f}",
                 f"{_mean([row['mean_abs_cos'] for row in r['layers']]):.3f}"]  # fmt: skip
        for lab in labels:
            best = max(probes[lab].items(), key=lambda kv: kv[1]["code"]["f1_1"] if isinstance(kv[0], int) else -1)
            cells.append(f"{_f(best[1]['code']['f1_1'])} / {_f(best[1]['code']['f1_8'])} (L{best[0]})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"GPT baseline validation loss: {gpt['val_loss']:.3f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_cli(main))
