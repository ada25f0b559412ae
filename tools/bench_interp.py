"""Cost of the interpretability tooling on top of a plain forward pass.

    python tools/bench_interp.py                          # tiny preset, batch 8 x 256, CPU fp32
    python tools/bench_interp.py --device cuda --ista overcomplete

Cache overhead: a plain forward (``model(x)``) against ``model.run_with_cache(x,
names_filter=[hook])`` caching ONE hook point, ``blocks.{L//2}.ista.hook_code`` (the sparse code
A of the middle block; ``mlp.hook_post`` for the GPT baseline), both under ``torch.no_grad``.
Rounds interleave the two (alternating which goes first) and the medians are compared;
target: overhead <= 10%.

Extraction (skip with ``--no-extract``): a random-init tiny-preset CRATE checkpoint folder is
written to a temporary folder (a BPE tokenizer trained on a generated corpus, its prepared
shards, model.safetensors, config.yaml, trainer_state.json, tokenizer/, COMPLETE). Then, over the
same ``--extract_tokens`` validation tokens in the same batches (``--batch`` x the model's 256),
rounds interleave (a) the plain forward (``model(x)`` under ``torch.no_grad``, the shards read and
batched as extraction reads them), (b) a whole ``crate_lm.interp.extract.extract(...)`` call
(default hooks: every block's ISTA code, stored as CSR; checkpoint loading included) into a fresh
folder, and (c), for reference, the forward through the blocks only (``run_with_cache(x,
names_filter=[], stop_at_layer=L)``: what extraction computes, since it never needs the final
norm and the output head); the median wall-clock tokens/s of each are compared, target:
extraction >= 0.8 x the plain forward. Peak memory: the peak RSS (``VmHWM``) of a fresh subprocess extracting 20,000 and
100,000 tokens (target: flat, since memory is bounded by one batch plus two chunks whatever N is).

Feature statistics (skip with ``--no-features``): the same kind of checkpoint; every block's ISTA
code is extracted once (``--feature_tokens``, CSR), then rounds time
``crate_lm.interp.features.FeatureStats`` streaming over the stored codes of all layers (reading
the chunks and densifying them included): tokens/s, and unit-activations/s (tokens x layers x m).
Memory: the peak RSS of a fresh process running ``features(..., store=...)`` (statistics, cards,
report) over stores of 20,000 and 100,000 tokens (target: flat).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from crate_lm.config import ModelConfig
from crate_lm.hardware import tune_cpu_allocator
from crate_lm.model import build_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of ``fn`` takes."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_cache_overhead(args: argparse.Namespace) -> dict[str, float | str]:
    """Median seconds of a plain forward and of run_with_cache on one hook point, and the overhead."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset, arch=args.arch, ista=args.ista, max_seq_len=max(args.seq_len, 256))
    model = build_model(cfg).to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    layer = cfg.n_layers // 2
    hook = f"blocks.{layer}.ista.hook_code" if cfg.arch == "crate" else f"blocks.{layer}.mlp.hook_post"
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=args.device)
    kept: list[torch.Tensor] = []

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def cached() -> None:
        _, cache = model.run_with_cache(x, names_filter=[hook])
        kept[:] = [cache[hook]]

    times: dict[str, list[float]] = {"plain": [], "cached": []}
    runs = {"plain": plain, "cached": cached}
    for r in range(args.warmup + args.rounds):
        order = ("plain", "cached") if r % 2 == 0 else ("cached", "plain")
        for name in order:
            seconds = timed(runs[name], args.device)
            if r >= args.warmup:
                times[name].append(seconds)
    plain_s, cached_s = statistics.median(times["plain"]), statistics.median(times["cached"])
    assert kept and kept[0].shape[:2] == (args.batch, args.seq_len)
    return {"hook": hook, "plain_s": plain_s, "cached_s": cached_s, "overhead": cached_s / plain_s - 1.0}


# ---- extraction throughput and peak memory ------------------------------------------------------

SYLLABLES = ("ka ri to ne mu sa lo vi de pa zu ha mi ro te na ki so be lu ga fo ye ti wa "
             "an el or is um en ar ol in us").split()  # fmt: skip
PEAK_RSS_SCRIPT = """
import json, sys
from crate_lm.interp.extract import extract
summary = extract(sys.argv[1], tokens=int(sys.argv[2]), out=sys.argv[3], show_progress=False, quiet=True)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"tokens": summary["tokens"], "peak_kb": peak_kb}))
"""


def generated_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` one-line documents of made-up words (a 2,000-word lexicon, Zipf-ish frequencies)."""
    rng = random.Random(seed)
    lexicon = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(2000)]
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    docs = []
    for _ in range(n):
        words = rng.choices(lexicon, weights, k=rng.randint(20, 120))
        docs.append(" ".join(words).capitalize() + ".")
    return docs


def write_checkpoint(root: Path, preset: str, ista: str, docs: int, seed: int = 0) -> tuple[Path, Path]:
    """A random-init ``preset`` CRATE checkpoint folder and its prepared shards (half validation)."""
    from safetensors.torch import save_file

    from crate_lm.checkpoint import write_tokenizer
    from crate_lm.config import DataConfig, RunConfig, dump_run_config
    from crate_lm.data import SourceSpec, prepare_corpus, train_tokenizer
    from crate_lm.model import build_model

    texts = generated_documents(docs, seed)
    corpus = root / "corpus.txt"
    corpus.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    model_cfg = ModelConfig.from_preset(preset, ista=ista)
    tok = train_tokenizer(iter(texts), root / "tokenizer", vocab_size=min(2048, model_cfg.vocab_size))
    assert tok.vocab_size <= model_cfg.vocab_size
    shards = root / "shards"
    prepare_corpus(SourceSpec(inputs=[str(corpus)], text_unit="line"), root / "tokenizer", shards,
                   val_fraction=0.5, show_progress=False)  # fmt: skip
    folder = root / "run" / "checkpoints" / "step_00000000"
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.yaml").write_text(
        dump_run_config(RunConfig(model=model_cfg, data=DataConfig(path=[str(shards)])))
    )
    (folder / "trainer_state.json").write_text(json.dumps({"step": 0, "tokenizer_fingerprint": tok.fingerprint}))
    write_tokenizer(folder, tok)
    (folder / "COMPLETE").write_text("")
    return folder, shards


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Nothing written to stdout or stderr (by Python or by native code such as the tokenizer
    trainer's progress bar) shows; on an error it is printed to stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def peak_rss_mb(checkpoint: Path, tokens: int, out: Path) -> tuple[int, float]:
    """Tokens extracted and peak RSS (MB) of a fresh process extracting ``tokens`` tokens."""
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's crate_lm, whatever the current folder
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(checkpoint), str(tokens), str(out)],
                          capture_output=True, text=True, env=env, cwd=repo, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the peak-memory subprocess failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return int(result["tokens"]), result["peak_kb"] / 1024


def bench_extraction(args: argparse.Namespace) -> dict[str, float]:
    """Median wall-clock tokens/s of the plain forward and of extract() over the same tokens and
    batches (interleaved rounds), and the peak RSS of extracting two numbers of tokens."""
    from crate_lm.checkpoint import load
    from crate_lm.data import TokenShards
    from crate_lm.interp.extract import extract

    root = Path(tempfile.mkdtemp(prefix="bench_extract-"))
    try:
        started = time.perf_counter()
        with silenced():  # the tokenizer trainer's and prepare_corpus's progress lines
            checkpoint, shards = write_checkpoint(root, args.preset, args.ista, args.extract_docs)
        loaded = load(str(checkpoint), device=args.device)
        model, seq = loaded.model.eval(), loaded.cfg.model.max_seq_len
        val = TokenShards(shards, "validation")
        sequences = -(-args.extract_tokens // seq)
        needed = max(sequences * seq, *args.memory_tokens)
        if val.num_tokens < needed:
            raise SystemExit(f"the generated validation split holds {val.num_tokens} tokens, fewer than {needed}; "
                             "raise --extract_docs")  # fmt: skip
        tokens = sequences * seq
        print(
            f"extraction: {args.preset} CRATE (random init), {val.num_tokens:,} validation tokens, "
            f"{tokens:,} tokens a round in batches of {args.batch} x {seq}; setup {time.perf_counter() - started:.1f} s"
        )

        def plain() -> None:
            # read and batch the shards as extract() does, then the plain forward
            with torch.no_grad():
                for first in range(0, sequences, args.batch):
                    rows = range(first, min(first + args.batch, sequences))
                    batch = np.stack([val.read(i * seq, seq) for i in rows])
                    model(torch.from_numpy(batch).to(device=args.device, dtype=torch.long))

        def blocks_only() -> None:
            with torch.no_grad():
                for first in range(0, sequences, args.batch):
                    rows = range(first, min(first + args.batch, sequences))
                    batch = np.stack([val.read(i * seq, seq) for i in rows])
                    x = torch.from_numpy(batch).to(device=args.device, dtype=torch.long)
                    model.run_with_cache(x, names_filter=[], stop_at_layer=len(model.blocks))

        made: list[int] = []

        def extracted() -> None:
            out = root / "stores" / f"round-{len(made)}"
            summary = extract(str(checkpoint), tokens=tokens, out=str(out), batch_size=args.batch,
                              device=args.device, show_progress=False, quiet=True)  # fmt: skip
            made.append(summary["tokens"])
            shutil.rmtree(out, ignore_errors=True)

        runs = {"plain": plain, "extract": extracted, "blocks": blocks_only}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(1 + args.extract_rounds):  # one warm-up round
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for name in order:
                seconds = timed(runs[name], args.device)
                if r >= 1:
                    times[name].append(seconds)
        assert made and all(n == tokens for n in made), made
        tps = {name: tokens / statistics.median(seconds) for name, seconds in times.items()}
        result = {
            "tokens": tokens,
            "ratio": tps["extract"] / tps["plain"],
            "ratio_blocks": tps["extract"] / tps["blocks"],
        }
        result |= {f"{name}_tps": value for name, value in tps.items()} | {f"{n}_s": s for n, s in times.items()}
        for n in args.memory_tokens:
            extracted_n, mb = peak_rss_mb(checkpoint, n, root / "stores" / f"memory-{n}")
            shutil.rmtree(root / "stores" / f"memory-{n}", ignore_errors=True)
            result[f"peak_mb_{n}"], result[f"peak_tokens_{n}"] = mb, extracted_n
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


FEATURES_RSS_SCRIPT = """
import json, sys
from crate_lm.interp.features import features
report = features(sys.argv[1], store=sys.argv[2], tokens=int(sys.argv[3]), out=sys.argv[4], show_progress=False,
                  quiet=True)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"tokens": report["tokens"], "peak_kb": peak_kb}))
"""


def features_peak_rss_mb(checkpoint: Path, store: Path, tokens: int, out: Path) -> tuple[int, float]:
    """Tokens analysed and peak RSS (MB) of a fresh process running features() over a store."""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", FEATURES_RSS_SCRIPT, str(checkpoint), str(store), str(tokens),
                           str(out)], capture_output=True, text=True, env=env, cwd=repo, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the feature-statistics subprocess failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return int(result["tokens"]), result["peak_kb"] / 1024


def bench_features(args: argparse.Namespace) -> dict:
    """Tokens/s of FeatureStats over extracted codes (all layers), and peak RSS of features() at two N."""
    from crate_lm.interp.extract import extract
    from crate_lm.interp.features import FeatureStats
    from crate_lm.interp.store import ActivationStore

    root = Path(tempfile.mkdtemp(prefix="bench_features-"))
    try:
        with silenced():
            checkpoint, _ = write_checkpoint(root, args.preset, args.ista, args.extract_docs)
        sizes = sorted({args.feature_tokens, *args.memory_tokens})
        stores = {}
        for n in sizes:
            stores[n] = root / f"store-{n}"
            extract(str(checkpoint), tokens=n, out=str(stores[n]), batch_size=args.batch, device=args.device,
                    show_progress=False, quiet=True)  # fmt: skip
        store = ActivationStore(stores[args.feature_tokens])
        hooks = store.hooks
        width = int(store.layout(hooks[0])["shape"][0])
        mean_l0 = sum(store.layout(h)["nnz"] for h in hooks) / len(hooks) / store.num_tokens

        def run_stats() -> None:
            stats = {h: FeatureStats(width, device=args.device) for h in hooks}
            at = 0
            for chunk in store.iter_chunks(hooks, format="torch"):
                n = len(chunk["tokens"])
                rows = torch.arange(at, at + n)
                for h in hooks:
                    stats[h].update(chunk[h].to_dense().to(args.device), rows)
                at += n
            sync(args.device)

        seconds = [timed(run_stats, args.device) for _ in range(1 + args.feature_rounds)][1:]
        median = statistics.median(seconds)
        result = {"tokens": store.num_tokens, "hooks": len(hooks), "width": width, "mean_l0": mean_l0,
                  "seconds": seconds, "tps": store.num_tokens / median,
                  "unit_tps": store.num_tokens * len(hooks) * width / median}  # fmt: skip
        for n in args.memory_tokens:
            analysed, mb = features_peak_rss_mb(checkpoint, stores[n], n, root / f"report-{n}")
            result[f"peak_mb_{n}"], result[f"peak_tokens_{n}"] = mb, analysed
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report_features(args: argparse.Namespace, result: dict) -> None:
    print(f"feature statistics: {result['hooks']} hooks x {result['width']} atoms (random init, mean L0 "
          f"{result['mean_l0']:.0f}) over {result['tokens']:,} extracted tokens")  # fmt: skip
    print(f"{'FeatureStats over the store (all layers)':48} {result['tps']:10,.0f} tokens/s (median of "
          f"{args.feature_rounds}; rounds {', '.join(f'{s:.2f}' for s in result['seconds'])} s; "
          f"{result['unit_tps'] / 1e6:,.1f} M unit-activations/s)")  # fmt: skip
    for n in args.memory_tokens:
        print(f"{f'peak RSS, features --tokens {n:,}':48} {result[f'peak_mb_{n}']:10,.1f} MB "
              f"({result[f'peak_tokens_{n}']:,} tokens analysed, fresh process)")  # fmt: skip
    lo, hi = args.memory_tokens[0], args.memory_tokens[-1]
    growth = result[f"peak_mb_{hi}"] / result[f"peak_mb_{lo}"] - 1.0
    flat = "flat" if abs(growth) <= 0.10 else "NOT FLAT"
    print(f"summary: feature statistics {result['tps']:,.0f} tokens/s over extracted codes; peak RSS "
          f"{result[f'peak_mb_{lo}']:,.0f} MB at {lo:,} tokens, {result[f'peak_mb_{hi}']:,.0f} MB at {hi:,} "
          f"({growth:+.1%}; target: flat: {flat})")  # fmt: skip


def report_extraction(args: argparse.Namespace, result: dict) -> None:
    print(f"{'plain forward (no_grad)':48} {result['plain_tps']:10,.0f} tokens/s (median of {args.extract_rounds}; "
          f"rounds {', '.join(f'{s:.2f}' for s in result['plain_s'])} s)")  # fmt: skip
    print(f"{'extract() [blocks.*.ista.hook_code, CSR]':48} {result['extract_tps']:10,.0f} tokens/s (median of "
          f"{args.extract_rounds}; rounds {', '.join(f'{s:.2f}' for s in result['extract_s'])} s)")  # fmt: skip
    print(f"{'forward through the blocks only (reference)':48} {result['blocks_tps']:10,.0f} tokens/s (median of "
          f"{args.extract_rounds}; rounds {', '.join(f'{s:.2f}' for s in result['blocks_s'])} s)")  # fmt: skip
    print(
        f"extraction = {result['ratio']:.2f} x the plain forward, {result['ratio_blocks']:.2f} x the forward through "
        "the blocks only (what it computes; the rest of its time: caching, CSR conversion, writing, loading)"
    )
    for n in args.memory_tokens:
        print(
            f"{f'peak RSS, extract --tokens {n:,}':48} {result[f'peak_mb_{n}']:10,.1f} MB "
            f"({result[f'peak_tokens_{n}']:,} tokens extracted, fresh process)"
        )
    verdict = "ok" if result["ratio"] >= 0.8 else "BELOW TARGET"
    lo, hi = args.memory_tokens[0], args.memory_tokens[-1]
    growth = result[f"peak_mb_{hi}"] / result[f"peak_mb_{lo}"] - 1.0
    flat = "flat" if abs(growth) <= 0.10 else "NOT FLAT"
    print(
        f"summary: extraction {result['extract_tps']:,.0f} tokens/s = {result['ratio']:.2f} x the plain forward "
        f"(target >= 0.8: {verdict}); peak RSS {result[f'peak_mb_{lo}']:,.0f} MB at {lo:,} tokens, "
        f"{result[f'peak_mb_{hi}']:,.0f} MB at {hi:,} ({growth:+.1%}; target: flat: {flat})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--arch", choices=["crate", "gpt"], default="crate")
    parser.add_argument("--ista", choices=["crate", "overcomplete", "alpha"], default="alpha")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--default_allocator", action="store_true", help="skip tune_cpu_allocator() on CPU")
    parser.add_argument("--no-extract", dest="extract", action="store_false", help="skip the extraction part")
    parser.add_argument("--extract_tokens", type=int, default=20_000, help="tokens a round of the extraction part")
    parser.add_argument("--extract_rounds", type=int, default=7)
    parser.add_argument("--extract_docs", type=int, default=5000, help="documents of the generated corpus")
    parser.add_argument("--memory_tokens", type=int, nargs=2, default=[20_000, 100_000])
    parser.add_argument("--no-features", dest="features", action="store_false", help="skip the feature statistics")
    parser.add_argument("--feature_tokens", type=int, default=100_000, help="extracted tokens the statistics stream")
    parser.add_argument("--feature_rounds", type=int, default=3)
    args = parser.parse_args()
    if args.device == "cpu" and not args.default_allocator:
        tune_cpu_allocator()

    print(
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} preset={args.preset} "
        f"arch={args.arch} ista={args.ista} batch={args.batch} seq={args.seq_len} rounds={args.rounds}"
    )
    result = bench_cache_overhead(args)
    rows = {"plain forward (no_grad)": result["plain_s"], f"run_with_cache [{result['hook']}]": result["cached_s"]}
    for label, seconds in rows.items():
        print(f"{label:48} {seconds * 1e3:8.2f} ms (median)")
    verdict = "ok" if result["overhead"] <= 0.10 else "ABOVE TARGET"
    print(
        f"summary: cache overhead {result['overhead']:+.1%} caching {result['hook']} "
        f"(plain {result['plain_s'] * 1e3:.2f} ms, cached {result['cached_s'] * 1e3:.2f} ms; target <= 10%: {verdict})"
    )
    if args.extract:
        report_extraction(args, bench_extraction(args))
    if args.features:
        report_features(args, bench_features(args))


if __name__ == "__main__":
    main()
