"""The planner's activation model (crate_lm.plan.activation_bytes) against a measurement: the
bytes autograd saves for backward in a real forward on CPU (crate_lm.plan.measure_saved_bytes),
for several sizes, both architectures, with and without activation checkpointing.

    .venv/bin/python tools/bench_plan.py
"""

from __future__ import annotations

import torch

from crate_lm.config import ModelConfig
from crate_lm.plan import activation_bytes, measure_saved_bytes

CASES = [  # arch, ista, batch, seq, d, layers, checkpointing, dtype
    ("crate", "alpha", 4, 256, 128, 4, False, torch.float32),
    ("crate", "alpha", 4, 256, 128, 4, True, torch.float32),
    ("crate", "alpha", 2, 512, 256, 4, False, torch.bfloat16),
    ("crate", "overcomplete", 8, 128, 128, 4, False, torch.float32),
    ("crate", "crate", 8, 128, 128, 4, False, torch.float32),
    ("gpt", "alpha", 4, 256, 128, 4, False, torch.float32),
    ("gpt", "alpha", 4, 256, 128, 4, True, torch.float32),
    ("gpt", "alpha", 2, 512, 256, 4, False, torch.bfloat16),
]


def main() -> None:
    print(f"{'arch':>5} {'ista':>12} {'B':>3} {'T':>4} {'d':>4} {'ckpt':>5} {'dtype':>9} "
          f"{'predicted MiB':>14} {'measured MiB':>13} {'error':>7}")  # fmt: skip
    for arch, ista, b, t, d, layers, ckpt, dtype in CASES:
        cfg = ModelConfig(vocab_size=8192, max_seq_len=t, d_model=d, n_layers=layers, n_heads=4, arch=arch,
                          ista=ista, activation_checkpointing=ckpt)  # fmt: skip
        a = 4 if dtype == torch.float32 else 2
        measured = measure_saved_bytes(cfg, b, t, dtype)
        predicted = activation_bytes(cfg, b, t, act_bytes=a, stats_bytes=a)["saved"]  # CPU: LN stats in dtype
        print(f"{arch:>5} {ista:>12} {b:>3} {t:>4} {d:>4} {str(ckpt):>5} {str(dtype)[6:]:>9} "
              f"{predicted / 2**20:14.2f} {measured / 2**20:13.2f} {predicted / measured - 1:+7.2%}")  # fmt: skip


if __name__ == "__main__":
    main()
