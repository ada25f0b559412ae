"""The README's memory-plan table: ``crate-lm plan`` for every preset on a typical cluster
(nodes of 8 x 80 GB GPUs, bf16), CRATE-alpha and the GPT baseline, each preset built on the meta
device first (so the parameter counts are the constructed model's, not only the formula's).

    python tools/plan_presets.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from crate_lm.config import MODEL_PRESETS, ModelConfig  # noqa: E402
from crate_lm.model import build_model  # noqa: E402
from crate_lm.plan import PlanRequest, plan  # noqa: E402

# (preset, ZeRO stage, GPUs, micro batch, activation checkpointing): the recipes' settings in configs/,
# and ZeRO-3 for the presets no recipe covers
SETUPS = [
    ("tiny", 0, 1, 16, False),
    ("125m", 1, 8, 8, False),
    ("350m", 2, 8, 8, False),
    ("760m", 2, 8, 8, False),
    ("1.3b", 2, 16, 4, True),
    ("2.7b", 3, 32, 4, True),
    ("7b", 3, 64, 1, True),
]


def main() -> None:
    assert [s[0] for s in SETUPS] == list(MODEL_PRESETS), "a preset without a row"
    print("| preset | arch | params (meta build) | ZeRO | GPUs | micro batch x seq | act. ckpt | model states GiB "
          "(DeepSpeed) | activations GiB | total GiB of 80 | largest micro batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, stage, gpus, micro, ckpt in SETUPS:
        for arch in ("crate", "gpt"):
            cfg = ModelConfig.from_preset(preset, arch=arch)
            with torch.device("meta"):
                params = sum(p.numel() for p in build_model(cfg).parameters())
            r = plan(PlanRequest(preset=preset, zero_stage=stage, gpus=gpus, micro_batch=micro,
                                 activation_checkpointing=ckpt, arch=arch))  # fmt: skip
            g = r["per_gpu_gib"]
            ds = r["deepspeed_model_states_gib"]
            name = "CRATE-alpha" if arch == "crate" else "GPT"
            print(f"| {preset} | {name} | {params / 1e6:,.1f}M | {stage} | {gpus} | {micro} x {r['setup']['seq_len']} | "
                  f"{'yes' if ckpt else 'no'} | {g['model_states']:.2f} ({'-' if ds is None else f'{ds:.2f}'}) | "
                  f"{g['activations']:.2f} | {g['total']:.2f} ({'fits' if r['fits'] else 'does not fit'}) | "
                  f"{r['max_micro_batch']} |")  # fmt: skip


if __name__ == "__main__":
    main()
