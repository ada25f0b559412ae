"""Data pipeline throughput on the built-in corpus.

    python tools/bench_data.py

1. Preparation (tokenise + write shards) with 1 and 2 processes, alternating over several
   rounds so that drift in machine speed touches both alike; medians are compared.
   Target: >= 1.8x tokens/s with 2 processes.
2. The loader's time per batch (in the training process, no worker processes) as a fraction
   of one training step of the tiny model on that batch. Target: <= 2%.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from crate_lm.config import ModelConfig
from crate_lm.data import PackedTokenDataset, ShuffledStream, SourceSpec, TokenShards, make_loader, prepare_corpus
from crate_lm.data.sources import builtin_corpus
from crate_lm.data.tokenizer import load_tokenizer, train_tokenizer
from crate_lm.hardware import tune_cpu_allocator
from crate_lm.model import build_model

WHO = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)


def _cpu(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def builtin_tokenizer(corpus: Path) -> Path:
    folder = corpus.parent / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        import json

        texts = (json.loads(line)["text"] for line in open(corpus, encoding="utf-8"))
        train_tokenizer(texts, folder, vocab_size=8192)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--repeat",
        type=int,
        default=4,
        help="read the corpus this many times per run, so start-up costs do not dominate",
    )
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    corpus = builtin_corpus()
    tokenizer = builtin_tokenizer(corpus)
    rates: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[tuple[float, float, float]]] = {1: [], 2: []}  # (main CPU s, workers CPU s, wall s)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    copies = []
    for i in range(args.repeat):  # the same text under several names (resolve_files drops repeated paths)
        copies.append(work / f"plays_{i}.jsonl")
        copies[-1].symlink_to(corpus.resolve())
    spec = SourceSpec(inputs=[str(c) for c in copies])
    try:
        for _ in range(args.rounds):
            for n in (1, 2):
                out = work / f"p{n}"
                shutil.rmtree(out, ignore_errors=True)
                usage = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
                start = time.perf_counter()
                meta = prepare_corpus(spec, tokenizer, out, num_proc=n, show_progress=False)
                elapsed = time.perf_counter() - start
                cpu[n].append(tuple(_cpu(resource.getrusage(w)) - _cpu(u) for w, u in zip(WHO, usage)) + (elapsed,))
                tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["validation"]["tokens"]
                rates[n].append(tokens / elapsed)
        shards_dir = work / "p1"

        tune_cpu_allocator()
        torch.manual_seed(0)
        tok = load_tokenizer(tokenizer)
        cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=args.seq_len)
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        shards = TokenShards(
            shards_dir, "train", tokenizer_fingerprint=tok.fingerprint, model_vocab_size=cfg.vocab_size
        )
        stream = ShuffledStream(PackedTokenDataset(shards, args.seq_len), seed=0)
        loader = iter(make_loader(stream, micro_batch=args.micro_batch, num_workers=0))
        load_times, step_times = [], []
        for i in range(args.steps + 2):
            start = time.perf_counter()
            batch = next(loader)
            loaded = time.perf_counter()
            model(batch["input_ids"], batch["labels"]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = time.perf_counter()
            if i >= 2:
                load_times.append(loaded - start)
                step_times.append(done - loaded)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    r1, r2 = statistics.median(rates[1]), statistics.median(rates[2])
    load, step = statistics.median(load_times), statistics.median(step_times)
    print(
        f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB), read {args.repeat}x per run; "
        f"tokenizer vocab {tok.vocab_size}; cpus {os.cpu_count()}"
    )
    print(
        f"prepare, 1 process : {r1:12,.0f} tokens/s   (median of {args.rounds}: {', '.join(f'{r:,.0f}' for r in rates[1])})"
    )
    print(
        f"prepare, 2 processes: {r2:12,.0f} tokens/s   (median of {args.rounds}: {', '.join(f'{r:,.0f}' for r in rates[2])})"
    )
    one = statistics.median(c[0] for c in cpu[1])
    main_cpu, workers_cpu, wall = (statistics.median(c[i] for c in cpu[2]) for i in range(3))
    print(
        f"2 processes: workers busy {workers_cpu / (2 * wall):.0%} of the time, main process {main_cpu:.2f} CPU-s; "
        f"the work costs {workers_cpu:.2f} CPU-s on two busy cores vs {one:.2f} on one (the hardware's share of the gap)"
    )
    print(
        f"loader: {load * 1e3:.3f} ms per batch of {args.micro_batch} x {args.seq_len}; "
        f"tiny-model training step {step * 1e3:.1f} ms"
    )
    print(
        f"summary: 2-process speedup {r2 / r1:.2f}x (target >= 1.8x); "
        f"loader {load / step:.2%} of step time (target <= 2%)"
    )


if __name__ == "__main__":
    main()
