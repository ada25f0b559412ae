"""Entry point DeepSpeed launches: parse the config, build, train.

python crate_lm/pretrain.py --config configs/default.yaml
deepspeed --num_gpus 8 crate_lm/pretrain.py --config configs/gpt_125m_zero1_bf16.yaml
torchrun --nproc_per_node 2 crate_lm/pretrain.py --config configs/default.yaml --train.max_steps 50
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the package importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crate_lm.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
