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
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    corpus = builtin_corpus()
    tokenizer = builtin_tokenizer(corpus)
    spec = SourceSpec(inputs=[str(corpus)])
    rates: dict[int, list[float]] = {1: [], 2: []}
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        for _ in range(args.rounds):
            for n in (1, 2):
                out = work / f"p{n}"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                meta = prepare_corpus(spec, tokenizer, out, num_proc=n, show_progress=False)
                elapsed = time.perf_counter() - start
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
        f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB), tokenizer vocab {tok.vocab_size}, cpus {os.cpu_count()}"
    )
    print(
        f"prepare, 1 process : {r1:12,.0f} tokens/s   (median of {args.rounds}: {', '.join(f'{r:,.0f}' for r in rates[1])})"
    )
    print(
        f"prepare, 2 processes: {r2:12,.0f} tokens/s   (median of {args.rounds}: {', '.join(f'{r:,.0f}' for r in rates[2])})"
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
