"""The training entry point: ``python``, ``torchrun`` and the ``deepspeed`` launcher all run this file.

python crate_lm/pretrain.py --config configs/default.yaml
deepspeed --num_gpus 8 crate_lm/pretrain.py --config configs/gpt_125m_zero1_bf16.yaml
torchrun --nproc_per_node 2 crate_lm/pretrain.py --config configs/default.yaml --train.max_steps 50

Exit codes: 0 finished or stopped by a signal with a checkpoint saved; 2 bad input (one
``error: ...`` line); 3 training diverged (the error names the newest sound checkpoint).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the package importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crate_lm.errors import run_cli  # noqa: E402
from crate_lm.train.signals import StopRequest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """``pretrain.py --config FILE [--section.key VALUE ...]``; bad input is a one-line error."""
    import argparse

    stop = StopRequest().install()  # first: a signal during start-up is a stop request, not a crash
    parser = argparse.ArgumentParser(description="Pretrain a CRATE (or GPT baseline) language model under DeepSpeed.")
    parser.add_argument("--config", help="run YAML (see configs/); default: built-in defaults")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args, overrides = parser.parse_known_args(argv)
    return run_cli(_train, args.config, overrides, stop)


def _train(config: str | None, overrides: list[str], stop: StopRequest) -> int:
    from crate_lm.config import load_run_config
    from crate_lm.train import run

    run(load_run_config(config, overrides), stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
