"""Overhead of the DeepSpeed engine over a plain PyTorch loop, and 2-rank ZeRO-2 throughput.

    python tools/bench_train.py                                  # tiny preset, seq 256, micro batch 16
    python tools/bench_train.py --preset 125m --micro_batch 4 --steps 3 --rounds 3

(a) One process, one rank: the same model (``ModelConfig.from_preset``), the same random token
batches (micro_batch x seq_len) and the same optimizer settings are trained by two loops:

* plain PyTorch: forward with labels, backward, GuardedAdamW (clipping to optim.grad_clip
  itself), the learning rate set before each step from ``learning_rate``;
* the DeepSpeed engine from ``crate_lm.train.build_engine`` (what the trainer uses), the rate
  set the same way, ``engine(x, y)`` / ``engine.backward`` / ``engine.step``.

Both start from the same weights and see the same batches, so their losses must agree (printed
as a check that they do the same work). After a warmup the loops alternate step by step in
rounds (A B B A ...); each step is timed and the median step of each loop gives its tokens/s, so
drift in the machine's speed touches both alike.
Target: engine tokens/s >= 0.95 x plain.

(b) ``torchrun --nproc_per_node 2`` of this script in ``--zero2-worker`` mode trains the same
model under ZeRO stage 2 on CPU (gloo, ``OMP_NUM_THREADS`` = cores / 2) and rank 0 reports the
median global tokens/s over its rounds on one ``ZERO2_RESULT {json}`` line, which is parsed here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make the package importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported

import torch.distributed as dist  # noqa: E402

from crate_lm.config import DataConfig, DeepSpeedSection, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from crate_lm.hardware import tune_cpu_allocator  # noqa: E402
from crate_lm.model import build_model, param_count  # noqa: E402
from crate_lm.train import (  # noqa: E402
    GuardedAdamW,
    build_engine,
    deepspeed_config,
    learning_rate,
    parameter_groups,
    resolve_schedule,
    set_learning_rate,
    setup_distributed,
)

RESULT_TAG = "ZERO2_RESULT"
N_BATCHES = 4  # distinct random batches, cycled


def run_config(args: argparse.Namespace, zero_stage: int) -> RunConfig:
    model = ModelConfig.from_preset(args.preset)
    cfg = RunConfig(
        model=model,
        data=DataConfig(seq_len=args.seq_len),
        train=TrainConfig(micro_batch=args.micro_batch, max_steps=100_000, seed=1234),
        deepspeed=DeepSpeedSection(zero_stage=zero_stage, precision="fp32"),
    )
    return resolve_schedule(cfg)


def random_batches(cfg: RunConfig, args: argparse.Namespace, device: torch.device, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    shape = (args.micro_batch, args.seq_len)
    return [
        (
            torch.randint(0, cfg.model.vocab_size, shape, generator=gen).to(device),
            torch.randint(0, cfg.model.vocab_size, shape, generator=gen).to(device),
        )
        for _ in range(N_BATCHES)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def make_engine(cfg: RunConfig, world: int):
    """The engine as the trainer builds it, from the same initial weights as the plain loop."""
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, build_model(cfg.model), world)
    engine.train()
    return engine


class PlainLoop:
    """The plain PyTorch step: the same model init, param groups, optimizer, clipping and schedule."""

    def __init__(self, cfg: RunConfig, device: torch.device, batches: list) -> None:
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model).to(device)
        self.model.train()
        o = cfg.optim
        self.opt = GuardedAdamW(
            parameter_groups(self.model, o.weight_decay),
            max_grad_norm=o.grad_clip,  # no engine here to clip: the optimizer clips the whole gradient
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
        )
        self.cfg, self.batches, self.i, self.losses = cfg, batches, 0, []

    def step(self) -> None:
        set_learning_rate(self.opt, learning_rate(self.i, self.cfg.optim, self.cfg.train.max_steps))
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        loss = self.model(x, y).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss.item())


class EngineLoop:
    """The DeepSpeed step as ``Trainer.train_step`` takes it (one micro-batch per optimizer step)."""

    def __init__(self, cfg: RunConfig, engine, batches: list) -> None:
        self.cfg, self.engine, self.batches, self.i, self.losses = cfg, engine, batches, 0, []

    def step(self) -> None:
        set_learning_rate(self.engine.optimizer, learning_rate(self.i, self.cfg.optim, self.cfg.train.max_steps))
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        loss = self.engine(x, y).loss
        self.engine.backward(loss)
        self.engine.step()
        self.losses.append(loss.item())


def timed(loop, steps: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loop.step()
    sync(device)
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- (a) one rank: engine vs plain ------------------------------------------------------------


def bench_one_rank(args: argparse.Namespace) -> tuple[float, float]:
    """Median tokens/s of (plain, engine) on one rank."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    cfg = run_config(args, zero_stage=0)
    setup_distributed()
    quiet_deepspeed()
    try:
        batches = random_batches(cfg, args, device, seed=0)
        loops = {
            "plain PyTorch": PlainLoop(cfg, device, batches),
            "DeepSpeed engine": EngineLoop(cfg, make_engine(cfg, 1), batches),
        }
        ds_cfg = deepspeed_config(cfg, 1)
        clip_by = "GuardedAdamW" if ds_cfg["gradient_clipping"] == 0.0 else "DeepSpeed"
        print(
            f"model: {cfg.model.arch} {cfg.model.ista} preset {args.preset} ({param_count(cfg.model) / 1e6:.2f}M params), "
            f"seq {args.seq_len}, micro batch {args.micro_batch}, fp32, device {device.type}, "
            f"threads {torch.get_num_threads()}"
        )
        print(
            f"optimizer: GuardedAdamW lr {cfg.optim.lr:g} wd {cfg.optim.weight_decay:g} on parameter_groups, "
            f"{cfg.optim.schedule} learning_rate, clip {cfg.optim.grad_clip:g} (engine: ZeRO-{cfg.deepspeed.zero_stage}, "
            f"clipped by {clip_by})"
        )
        for loop in loops.values():
            timed(loop, args.warmup, device)
        tokens = args.micro_batch * args.seq_len  # per step
        names = list(loops)
        times: dict[str, list[float]] = {name: [] for name in names}
        round_ratios = []
        for r in range(args.rounds):
            first = names if r % 2 == 0 else names[::-1]
            this_round: dict[str, list[float]] = {name: [] for name in names}
            for i in range(args.steps):  # step by step, A B B A ..., so drift touches both alike
                for name in first if i % 2 == 0 else first[::-1]:
                    this_round[name].append(timed(loops[name], 1, device))
            rate = {name: tokens / statistics.median(t) for name, t in this_round.items()}
            round_ratios.append(rate["DeepSpeed engine"] / rate["plain PyTorch"])
            for name in names:
                times[name] += this_round[name]
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{name} {rate[name]:,.0f} tokens/s" for name in names)
                + f", ratio {round_ratios[-1]:.3f}"
            )
        plain, engine = (tokens / statistics.median(times[name]) for name in names)
        diff = max(abs(a - b) for a, b in zip(loops["plain PyTorch"].losses, loops["DeepSpeed engine"].losses))
        steps = len(loops["plain PyTorch"].losses)
        print(
            f"same work: {steps} steps each, max |loss difference| {diff:.2e} "
            f"(last loss plain {loops['plain PyTorch'].losses[-1]:.4f}, engine {loops['DeepSpeed engine'].losses[-1]:.4f})"
        )
        print(
            f"1 rank, median step of {args.rounds} rounds x {args.steps} steps: plain PyTorch {plain:,.0f} tokens/s, "
            f"DeepSpeed engine {engine:,.0f} tokens/s, ratio {engine / plain:.3f} "
            f"(median of the per-round ratios {statistics.median(round_ratios):.3f})"
        )
        return plain, engine
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# ---- (b) two ranks: ZeRO-2 ----------------------------------------------------------------------


def zero2_worker(args: argparse.Namespace) -> None:
    """Runs under torchrun: ZeRO-2 on random batches; rank 0 prints one ``ZERO2_RESULT {json}`` line."""
    cfg = run_config(args, zero_stage=2)
    setup_distributed()
    quiet_deepspeed()
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if not torch.cuda.is_available():
            tune_cpu_allocator()
        engine = make_engine(cfg, world)
        loop = EngineLoop(cfg, engine, random_batches(cfg, args, engine.device, seed=1 + rank))
        device = torch.device(engine.device)
        timed(loop, args.warmup, device)
        rates = []
        for _ in range(args.rounds):
            dist.barrier()
            elapsed = torch.tensor([timed(loop, args.steps, device)], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            rates.append(world * args.steps * args.micro_batch * args.seq_len / elapsed.item())
        if rank == 0:
            result = {
                "tokens_per_s": statistics.median(rates),
                "rounds": [round(r, 1) for r in rates],
                "world_size": world,
                "zero_stage": cfg.deepspeed.zero_stage,
                "threads_per_rank": torch.get_num_threads(),
                "last_loss": loop.losses[-1],
            }
            print(f"{RESULT_TAG} {json.dumps(result)}", flush=True)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def bench_zero2(args: argparse.Namespace, nproc: int = 2) -> dict | None:
    """Launch the worker under torchrun on CPU and parse rank 0's result line."""
    threads = max(1, (os.cpu_count() or nproc) // nproc)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(
        DS_ACCELERATOR="cpu",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS=str(threads),
        PYTHONWARNINGS="ignore",
        MASTER_PORT=str(port),
    )
    # torchrun is `python -m torch.distributed.run`; the module form uses this interpreter's torch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), os.path.abspath(__file__), "--zero2-worker"]
    cmd += ["--preset", args.preset, "--micro_batch", str(args.micro_batch), "--seq_len", str(args.seq_len)]
    cmd += ["--steps", str(args.steps), "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    print(
        f"launching: torchrun --nproc_per_node {nproc} tools/bench_train.py --zero2-worker "
        f"(DS_ACCELERATOR=cpu OMP_NUM_THREADS={threads} MASTER_PORT={port})",
        flush=True,
    )
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    found = re.search(rf"^{RESULT_TAG} (.*)$", proc.stdout, flags=re.MULTILINE)
    if proc.returncode != 0 or found is None:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        print(f"2-rank ZeRO-2 worker failed (exit {proc.returncode}); last lines:\n{tail}")
        return None
    result = json.loads(found.group(1))
    result["wall_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset (crate_lm.config.MODEL_PRESETS)")
    parser.add_argument("--micro_batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per loop per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop before the rounds")
    parser.add_argument("--no-zero2", dest="zero2", action="store_false", help="skip the 2-rank ZeRO-2 run")
    parser.add_argument("--zero2-worker", dest="zero2_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.zero2_worker:
        zero2_worker(args)
        return
    if not torch.cuda.is_available():
        tune_cpu_allocator()
    plain, engine = bench_one_rank(args)
    ratio = engine / plain
    print(f"DeepSpeed engine / plain PyTorch: {ratio:.3f} (target >= 0.95): {'ok' if ratio >= 0.95 else 'MISSED'}")
    zero2 = bench_zero2(args) if args.zero2 else None
    if zero2 is not None:
        print(
            f"2 ranks, ZeRO-2, CPU/gloo, {zero2['threads_per_rank']} thread(s) per rank "
            f"(on this {os.cpu_count()}-core machine each rank gets {os.cpu_count() // 2} core(s)): "
            f"median {zero2['tokens_per_s']:,.0f} tokens/s over both ranks "
            f"(rounds {', '.join(f'{r:,.0f}' for r in zero2['rounds'])}; last loss {zero2['last_loss']:.4f}; "
            f"{zero2['wall_s']:.0f} s including launch)"
        )
        print(
            f"beside 1 rank ({torch.get_num_threads()} threads): plain {plain:,.0f}, engine {engine:,.0f}, "
            f"2-rank ZeRO-2 {zero2['tokens_per_s']:,.0f} tokens/s ({zero2['tokens_per_s'] / engine:.2f} x the 1-rank engine)"
        )
    zero2_text = f"{zero2['tokens_per_s']:,.0f} tokens/s" if zero2 is not None else "not run"
    print(f"summary: DeepSpeed engine / plain PyTorch = {ratio:.2f} (target >= 0.95); 2-rank ZeRO-2 {zero2_text}")


if __name__ == "__main__":
    main()
