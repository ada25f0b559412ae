"""Per-rank memory of a ZeRO-3 run built with ``deepspeed.zero.Init`` (a benchmark, not a test).

    DS_ACCELERATOR=cpu python tools/bench_scale.py [--preset 350m] [--seq 64] [--steps 3] [--nproc 2]

Starts ``--nproc`` CPU ranks (torchrun, gloo) that construct the preset as training does
(``crate_lm.train.construct_model``: partitioned at construction), wrap it in the training
engine (``build_engine``), and take a few fp32 steps on random tokens. Each rank reports the
parameter bytes it holds right after construction, its peak RSS (VmHWM) after construction and
after the steps. Beside it, the planner's prediction (``crate_lm.plan``) when it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, os, sys, time
import torch
import torch.distributed as dist
from crate_lm.config import run_config_from_dict
from crate_lm.train import build_engine, construct_model, setup_distributed

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

preset, seq, steps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
setup_distributed()
world, rank = dist.get_world_size(), dist.get_rank()
cfg = run_config_from_dict({"model": {"preset": preset}, "deepspeed": {"zero_stage": 3, "zero_init": True},
                            "train": {"micro_batch": 1, "global_batch": world}, "data": {"seq_len": seq}})
base = hwm()
torch.manual_seed(0)
model = construct_model(cfg, world)
own = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
total = sum(p.ds_numel * 4 for p in model.parameters())
built = hwm()
engine = build_engine(cfg, model, world)
ids = torch.randint(0, cfg.model.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(rank))
times = []
for _ in range(steps):
    start = time.perf_counter()
    loss = engine(ids[:, :-1], ids[:, 1:]).loss
    engine.backward(loss)
    engine.step()
    times.append(time.perf_counter() - start)
result = {"rank": rank, "base": base, "built": built, "peak": hwm(), "own": own, "total": total,
          "loss": float(loss), "step_s": times}
open(os.path.join(out, f"rank{rank}.json"), "w").write(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
"""


def planner(preset: str, seq: int, gpus: int) -> dict | None:
    """The planner's per-GPU figures for this setup, or None when crate_lm.plan is absent."""
    try:
        from crate_lm.plan import PlanRequest, plan
    except ImportError:
        return None  # hook: crate_lm.plan (crate-lm plan) gives the prediction once it exists
    result = plan(PlanRequest(preset=preset, zero_stage=3, gpus=gpus, gpus_per_node=gpus, micro_batch=1,
                              seq_len=seq, precision="fp32"))  # fmt: skip
    return result["per_gpu_gib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        script = Path(out) / "worker.py"
        script.write_text(WORKER)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_port", str(port), str(script), args.preset, str(args.seq), str(args.steps), out]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        files = sorted(Path(out).glob("rank*.json"))
        if len(files) != args.nproc:
            raise SystemExit(f"workers failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        ranks = [json.loads(f.read_text()) for f in files]
    gib = 2**30
    total = ranks[0]["total"]
    print(f"preset {args.preset}, ZeRO-3 fp32, {args.nproc} CPU ranks, micro batch 1 x {args.seq} tokens, "
          f"{args.steps} steps; whole model {total / gib:.2f} GiB of fp32 parameters")  # fmt: skip
    for r in ranks:
        steps = ", ".join(f"{t:.1f}" for t in r["step_s"])
        print(f"rank {r['rank']}: parameters held after construction {r['own'] / gib:.2f} GiB "
              f"({r['own'] / total:.1%} of the model); peak RSS {r['built'] / gib:.2f} GiB after construction, "
              f"{r['peak'] / gib:.2f} GiB after the steps (interpreter + imports {r['base'] / gib:.2f}); "
              f"loss {r['loss']:.3f}; step s {steps}")  # fmt: skip
    predicted = planner(args.preset, args.seq, args.nproc)
    if predicted is None:
        print("planner: crate_lm.plan is not installed; its per-rank prediction goes here")
    else:
        print("planner (per GPU, GiB; its buffers assume GPU buckets and a 1 GiB CUDA context): "
              + ", ".join(f"{k} {v}" for k, v in predicted.items()))
        measured = max(r["peak"] - r["base"] for r in ranks) / gib
        print(f"measured peak RSS above the interpreter: {measured:.2f} GiB per rank vs planned model states "
              f"{predicted['model_states']} + activations {predicted['activations']} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
