"""Peak memory of ``crate_lm.load``: the model is built on the meta device and its weights are
assigned from memory-mapped safetensors, so loading should cost about one copy of the weights.

    python tools/bench_load.py [--preset 350m] [--shard 500MB]

Writes a checkpoint of the preset with random weights (one model.safetensors, and a sharded
export of it) into a temporary folder, then loads each in a fresh subprocess and prints its
peak RSS (VmHWM) beside the weights' size, and the same for the old way (build the model with
its init, then ``load_state_dict`` a second, fully read copy).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import torch
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
base = hwm()
how, path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if how == "old":
    from safetensors.torch import load_file
    from crate_lm.checkpoint import read_checkpoint_config
    from crate_lm.model import build_model
    from pathlib import Path
    cfg = read_checkpoint_config(Path(path))
    model = build_model(cfg.model)
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
else:
    from crate_lm.checkpoint import load_model
    model, _ = load_model(path)
seconds = time.perf_counter() - start
with torch.no_grad():  # touch every weight (a mapped page counts once it is read)
    total = sum(float(p.float().sum()) for p in model.parameters())
print(json.dumps({"base": base, "peak": hwm(), "seconds": seconds}))
"""


def child(how: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, how, str(path)], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--shard", default="500MB", help="max shard size of the sharded export")
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_file

    from crate_lm.checkpoint import weights_metadata
    from crate_lm.config import RunConfig, dump_run_config, model_config_from_dict
    from crate_lm.export import ShardWriter, parse_size
    from crate_lm.model import build_model

    cfg = RunConfig(model=model_config_from_dict({"preset": args.preset}))
    with tempfile.TemporaryDirectory() as tmp:
        single, sharded = Path(tmp) / "single", Path(tmp) / "sharded"
        single.mkdir(), sharded.mkdir()
        model = build_model(cfg.model, device="meta")
        state = {k: torch.randn(v.shape) * 0.02 for k, v in model.state_dict().items()}  # random weights
        weights = sum(t.numel() * t.element_size() for t in state.values())
        save_file(state, str(single / "model.safetensors"), metadata=weights_metadata(cfg, torch.float32))
        writer = ShardWriter(sharded, parse_size(args.shard), weights_metadata(cfg, torch.float32))
        for k, v in state.items():
            writer.add(k, v)
        shards = len(set(writer.finish()["weight_map"].values()))
        del state, model, writer
        for folder in (single, sharded):
            (folder / "config.yaml").write_text(dump_run_config(cfg))
        rows = [("load, one model.safetensors", child("new", single)),
                (f"load, {shards} shards", child("new", sharded)),
                ("old way: build + init, then load_state_dict", child("old", single))]  # fmt: skip
    gb = 1e9
    print(f"preset {args.preset}: {weights / gb:.2f} GB of fp32 weights")
    for name, r in rows:
        extra = r["peak"] - r["base"]
        print(f"{name:<46} peak RSS {r['peak'] / gb:6.2f} GB = interpreter {r['base'] / gb:.2f} + "
              f"{extra / gb:.2f} GB ({extra / weights:.2f} x the weights), {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
