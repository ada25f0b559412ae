"""Peak memory per rank when a ZeRO-2 checkpoint is resumed by another number of ranks.

    python tools/bench_resume.py                       # d_model 512, 8 layers: ~300 MB of optimizer state
    python tools/bench_resume.py --d_model 256 --n_layers 4

For 1 -> 2 and 2 -> 1 ranks (CPU, gloo, ``torchrun`` of this script in worker modes):

1. ``--save-worker``: the old world builds the engine as the trainer does (``build_engine``,
   ZeRO-2, fp32), takes one step on random tokens (so Adam's moments are not zero) and saves;
2. ``--resume-worker``: the new world builds a fresh engine and resumes that checkpoint, twice,
   each in its own launch: with ``crate_lm.checkpoint.load_zero12_resharded`` ("new": memory-
   mapped shards, only the overlaps read) and with ``load_everything`` below ("baseline": the
   previous code, every old shard loaded whole on every rank, joined, then cut).

Each rank resets its peak RSS (``/proc/self/clear_refs``) right before the resume and reads
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` before and after; the increase is the resume's
peak memory. Both paths must give bit-identical model and optimizer state (checked here).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported

RESULT_TAG = "RESUME_RESULT"
TAG = "step_00000001"
MB = 2**20


def run_config(args: argparse.Namespace):
    from crate_lm.config import DataConfig, DeepSpeedSection, ModelConfig, RunConfig, TrainConfig
    from crate_lm.train import resolve_schedule

    model = ModelConfig(vocab_size=args.vocab, max_seq_len=args.seq_len, d_model=args.d_model,
                        n_layers=args.n_layers, n_heads=8)  # fmt: skip
    cfg = RunConfig(
        model=model,
        data=DataConfig(seq_len=args.seq_len),
        train=TrainConfig(micro_batch=1, max_steps=100, seed=1234),
        deepspeed=DeepSpeedSection(zero_stage=2, precision="fp32"),
    )
    return resolve_schedule(cfg)


def make_engine(args: argparse.Namespace):
    import logging

    import torch.distributed as dist
    from deepspeed.utils import logger

    from crate_lm.model import build_model
    from crate_lm.train import build_engine, setup_distributed

    setup_distributed()
    logger.setLevel(logging.WARNING)
    cfg = run_config(args)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, build_model(cfg.model), dist.get_world_size())
    engine.train()
    return cfg, engine


def load_everything(engine, folder: Path) -> None:
    """The previous resume path, kept as the baseline: every rank loads every old shard whole."""
    import torch.distributed as dist

    from crate_lm.checkpoint import CheckpointError, safe_torch_load

    engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_only=True,
                           load_optimizer_states=False, load_lr_scheduler_states=False)  # fmt: skip
    states = safe_torch_load(folder / "mp_rank_00_model_states.pt")
    engine.global_steps, engine.global_samples = states["global_steps"], states["global_samples"]
    engine.skipped_steps = states["skipped_steps"]

    def rank_of(path: Path) -> int:
        return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))

    files = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=rank_of)
    old = [safe_torch_load(f)["optimizer_state_dict"] for f in files]
    zero = engine.optimizer
    rank, world = dist.get_rank(), dist.get_world_size()
    for i, group in enumerate(zero.optimizer.param_groups):
        param = group["params"][0]
        size = param.numel()

        def cut(parts, paddings, param=param, size=size):
            joined = torch.cat([t.reshape(-1)[: t.numel() - pad] for t, pad in zip(parts, paddings)])
            if joined.numel() > size * world:
                raise CheckpointError(f"{folder}: its optimizer shards do not fit this model")
            padded = torch.zeros(size * world, dtype=joined.dtype)
            padded[: joined.numel()] = joined
            return padded[rank * size : (rank + 1) * size].to(param.device)

        master = cut([sd["single_partition_of_fp32_groups"][i] for sd in old], [0] * len(old))
        mine = zero.parallel_partitioned_bit16_groups[i][rank].float()
        if not torch.allclose(mine, master[: mine.numel()], rtol=1e-2, atol=1e-2):
            raise CheckpointError(f"{folder}: re-partitioned weights disagree with the loaded module")
        param.data.copy_(master)
        paddings = [sd["group_paddings"][i] for sd in old]
        saved = [sd["base_optimizer_state"]["state"][i] for sd in old]
        state = zero.optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = cut([s[key] for s in saved], paddings).clone()
        state["step"] = saved[0]["step"].clone()
        group["step"] = old[0]["base_optimizer_state"]["param_groups"][i].get("step", 0)


def save_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    cfg, engine = make_engine(args)
    gen = torch.Generator().manual_seed(dist.get_rank())
    x, y = (torch.randint(0, cfg.model.vocab_size, (1, args.seq_len), generator=gen) for _ in range(2))
    engine.backward(engine(x.to(engine.device), y.to(engine.device)).loss)
    engine.step()
    engine.save_checkpoint(args.dir, tag=TAG, client_state={}, save_latest=False)
    dist.barrier()
    dist.destroy_process_group()


def reset_peak_rss() -> bool:
    """Make ru_maxrss start again from the current RSS (Linux: clear_refs 5 resets the high-water mark)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def resume_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from crate_lm.checkpoint import load_zero12_resharded

    _, engine = make_engine(args)
    rank = dist.get_rank()
    resume = load_zero12_resharded if args.path == "new" else load_everything
    dist.barrier()
    gc.collect()
    reset = reset_peak_rss()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    resume(engine, Path(args.dir) / TAG)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    zero = engine.optimizer
    share = 0
    result: dict[str, torch.Tensor] = {}
    for i, group in enumerate(zero.optimizer.param_groups):
        param = group["params"][0]
        state = zero.optimizer.state[param]
        share += sum(t.numel() * t.element_size() for t in (param, state["exp_avg"], state["exp_avg_sq"]))
        result.update({f"{i}.master": param.data, f"{i}.exp_avg": state["exp_avg"],
                       f"{i}.exp_avg_sq": state["exp_avg_sq"], f"{i}.step": state["step"]})  # fmt: skip
    torch.save(result, Path(args.out) / f"{args.path}_rank{rank}.pt")
    line = {"rank": rank, "path": args.path, "before_mb": before / 1024, "increase_mb": (after - before) / 1024,
            "own_share_mb": share / MB, "peak_reset": reset}  # fmt: skip
    print(f"{RESULT_TAG} {json.dumps(line)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, nproc: int, *mode: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), os.path.abspath(__file__), *mode, "--d_model", str(args.d_model),
           "--n_layers", str(args.n_layers), "--vocab", str(args.vocab), "--seq_len", str(args.seq_len)]  # fmt: skip
    proc = subprocess.run(cmd, env={**env, "MASTER_PORT": str(port)}, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise SystemExit(f"worker {' '.join(mode)} failed (exit {proc.returncode}):\n{tail}")
    found = re.findall(rf"^{RESULT_TAG} (.*)$", proc.stdout, flags=re.MULTILINE)
    return sorted((json.loads(f) for f in found), key=lambda r: r["rank"])


def bench(args: argparse.Namespace, old: int, new: int, root: Path) -> None:
    ckpt_dir, out = root / f"saved_by_{old}", root / f"resumed_{old}_to_{new}"
    out.mkdir()
    launch(args, old, "--save-worker", "--dir", str(ckpt_dir))
    shards = sorted((ckpt_dir / TAG).glob("zero_pp_rank_*_optim_states.pt"))
    total = sum(f.stat().st_size for f in shards) / MB
    one = max(f.stat().st_size for f in shards) / MB
    module = (ckpt_dir / TAG / "mp_rank_00_model_states.pt").stat().st_size / MB
    runs = {}
    for path in ("baseline", "new"):
        runs[path] = launch(args, new, "--resume-worker", "--path", path, "--dir", str(ckpt_dir), "--out", str(out))
    identical = all(
        all(torch.equal(a[k], b[k]) for k in a)
        for a, b in (
            (torch.load(out / f"baseline_rank{r}.pt"), torch.load(out / f"new_rank{r}.pt")) for r in range(new)
        )
    )
    print(f"\n{old} -> {new} ranks: {len(shards)} old shard(s), optimizer state {total:.1f} MB in all, "
          f"one shard {one:.1f} MB; model states file {module:.1f} MB (read whole by DeepSpeed in both paths)")  # fmt: skip
    for path, rows in runs.items():
        for r in rows:
            print(f"  {path:8s} rank {r['rank']}: RSS before {r['before_mb']:7.1f} MB, peak increase "
                  f"{r['increase_mb']:7.1f} MB (own share {r['own_share_mb']:.1f} MB)"
                  + ("" if r["peak_reset"] else " [peak not reset: increase is a lower bound]"))  # fmt: skip
    new_peak = max(r["increase_mb"] for r in runs["new"])
    base_peak = max(r["increase_mb"] for r in runs["baseline"])
    share = max(r["own_share_mb"] for r in runs["new"])
    print(f"  new vs baseline: bit-identical state: {'yes' if identical else 'NO'}; "
          f"peak increase {new_peak / base_peak:.2f}x the baseline's")  # fmt: skip
    print(f"resume {old}->{new} ranks: peak RSS increase per rank {new_peak:.0f} MB (optimizer state total "
          f"{total:.0f} MB, one shard {one:.0f} MB; target: about own share + one shard = {share + one:.0f} MB); "
          f"load-everything baseline {base_peak:.0f} MB")  # fmt: skip
    if not identical:
        raise SystemExit("the new path's state differs from the baseline's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--save-worker", dest="save_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume-worker", dest="resume_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=("new", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_worker:
        return save_worker(args)
    if args.resume_worker:
        return resume_worker(args)
    from crate_lm.config import ModelConfig
    from crate_lm.model import param_count

    n = param_count(ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=8))
    print(f"model: d_model {args.d_model}, {args.n_layers} layers, vocab {args.vocab}: {n / 1e6:.1f}M params; "
          f"ZeRO-2 fp32 on CPU/gloo, OMP_NUM_THREADS=1")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    try:
        for old, new in ((1, 2), (2, 1)):
            bench(args, old, new, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
