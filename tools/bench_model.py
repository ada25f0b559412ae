"""Training throughput of CRATE (each ISTA variant) beside the GPT baseline, at equal d / L / seq.

    python tools/bench_model.py                      # CPU, fp32, the small config
    python tools/bench_model.py --device cuda --dtype bf16 --d_model 768 --n_layers 12 --n_heads 12 --seq_len 1024

For each model it times full training steps (forward, backward, AdamW step) and reports
tokens/s and model FLOP/s (FLOPs from ``crate_lm.model.size.flops_per_token``) as a fraction of
the matmul FLOP/s measured on the same device and dtype. Two derived figures:

* efficiency vs GPT = (CRATE tokens/s / GPT tokens/s) / (GPT FLOPs / CRATE FLOPs): how much
  of CRATE's FLOP advantage (or disadvantage) shows up as speed; target >= 0.90.
* fraction of matmul peak for each model; target >= 0.50 for the small config on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from crate_lm.config import ModelConfig
from crate_lm.hardware import measure_matmul_flops, tune_cpu_allocator
from crate_lm.model import build_model, flops_per_token, param_count

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Trainee:
    """One model, its optimizer and a fixed batch; ``step()`` is a full training step."""

    def __init__(self, cfg: ModelConfig, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        device, dtype = args.device, DTYPES[args.dtype]
        self.model = build_model(cfg).to(device)
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, fused=True if device.startswith("cuda") else None
        )
        self.x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
        self.y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
        self.autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
        self.device = device
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        sync(self.device)
        start = time.perf_counter()
        with self.autocast:
            loss = self.forward(self.x, self.y).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - start)


def flash_available(device: str, dtype: torch.dtype, args: argparse.Namespace) -> str:
    """Whether SDPA can run this shape on the flash kernel (GPU only)."""
    if not device.startswith("cuda"):
        return "n/a (CPU)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    p = args.d_model // args.n_heads
    q = torch.randn(args.batch, args.n_heads, args.seq_len, p, device=device, dtype=dtype)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return "yes"
    except RuntimeError as err:
        return f"no ({str(err).splitlines()[0][:60]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--n_heads", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--matmul_n", type=int, default=2048)
    parser.add_argument("--default_allocator", action="store_true", help="skip tune_cpu_allocator() on CPU")
    args = parser.parse_args()

    dtype = DTYPES[args.dtype]
    if args.device == "cpu" and not args.default_allocator:
        tune_cpu_allocator()
    shape = dict(
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        max_seq_len=args.seq_len,
        vocab_size=args.vocab_size,
    )
    models = {
        "CRATE crate": ModelConfig(arch="crate", ista="crate", **shape),
        "CRATE overcomplete": ModelConfig(arch="crate", ista="overcomplete", **shape),
        "CRATE alpha": ModelConfig(arch="crate", ista="alpha", **shape),
        "GPT baseline": ModelConfig(arch="gpt", **shape),
    }
    print(
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} d={args.d_model} "
        f"L={args.n_layers} K={args.n_heads} seq={args.seq_len} batch={args.batch} vocab={args.vocab_size}"
    )
    print(f"SDPA flash kernel available: {flash_available(args.device, dtype, args)}")
    trainees = {name: Trainee(cfg, args) for name, cfg in models.items()}
    # Rounds interleave the models (and re-measure the matmul peak), so drift in the machine's
    # speed touches every figure alike; medians over rounds are then compared.
    peak = 0.0
    for r in range(args.warmup + args.steps):
        peak = max(peak, measure_matmul_flops(args.device, dtype, args.matmul_n, reps=3))
        for trainee in trainees.values():
            trainee.step(record=r >= args.warmup)
    print(f"measured matmul peak ({args.matmul_n}^3, {args.dtype}, best of the run): {peak / 1e9:.1f} GFLOP/s")
    tokens = args.batch * args.seq_len
    results = {
        name: (tokens / statistics.median(t.times), flops_per_token(models[name], args.seq_len))
        for name, t in trainees.items()
    }
    gpt_tps, gpt_flops = results["GPT baseline"]
    header = (
        f"{'model':20} {'params':>9} {'GFLOP/tok':>9} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>7} "
        f"{'speed/GPT':>9} {'FLOP adv':>8} {'efficiency':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, (tps, flops) in results.items():
        speed, advantage = tps / gpt_tps, gpt_flops / flops
        print(
            f"{name:20} {param_count(models[name]) / 1e6:8.1f}M {flops / 1e9:9.3f} {tps:9.0f} "
            f"{tps * flops / 1e9:8.1f} {tps * flops / peak:7.1%} {speed:9.2f} {advantage:8.2f} {speed / advantage:10.2f}"
        )
    worst = min(results[n][0] / gpt_tps / (gpt_flops / results[n][1]) for n in results if n != "GPT baseline")
    lowest = min(tps * flops / peak for tps, flops in results.values())
    print(
        f"summary: worst CRATE efficiency vs GPT {worst:.2f} (target >= 0.90); "
        f"lowest fraction of matmul peak {lowest:.1%} (target >= 50%)"
    )


if __name__ == "__main__":
    main()
