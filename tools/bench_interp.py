"""Cost of the interpretability tooling on top of a plain forward pass.

    python tools/bench_interp.py                          # tiny preset, batch 8 x 256, CPU fp32
    python tools/bench_interp.py --device cuda --ista overcomplete

Cache overhead: a plain forward (``model(x)``) against ``model.run_with_cache(x,
names_filter=[hook])`` caching ONE hook point, ``blocks.{L//2}.ista.hook_code`` (the sparse code
A of the middle block; ``mlp.hook_post`` for the GPT baseline), both under ``torch.no_grad``.
Rounds interleave the two (alternating which goes first) and the medians are compared;
target: overhead <= 10%.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

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


if __name__ == "__main__":
    main()
