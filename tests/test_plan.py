"""The memory planner (``crate_lm.plan``, ``crate-lm plan``): model states against DeepSpeed's own
estimator, the activation model against the bytes autograd really saves, presets on the meta
device, and the command's output and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crate_lm.config import MODEL_PRESETS, ModelConfig
from crate_lm.model import build_model, param_count
from crate_lm.plan import (
    GIB,
    PlanRequest,
    activation_bytes,
    deepspeed_estimate,
    largest_module_params,
    measure_saved_bytes,
    model_state_bytes,
    plan,
)

ROOT = Path(__file__).resolve().parents[1]


def deepspeed_largest_layer(model: torch.nn.Module) -> int:
    """DeepSpeed's ``model_to_params`` loop for the largest layer (stage3.py), on any device."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


@pytest.mark.parametrize("preset", list(MODEL_PRESETS))
@pytest.mark.parametrize("arch", ["crate", "gpt"])
def test_every_preset_builds_on_meta_and_its_largest_module_is_deepspeeds(preset: str, arch: str) -> None:
    cfg = ModelConfig.from_preset(preset, arch=arch)
    with torch.device("meta"):
        model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)
    assert largest_module_params(cfg) == deepspeed_largest_layer(model)


@pytest.mark.parametrize("preset", ["125m", "1.3b", "7b"])
@pytest.mark.parametrize("gpus", [8, 64])
@pytest.mark.parametrize("stage,offload", [(2, None), (2, "optimizer"), (3, None), (3, "optimizer"), (3, "params")])
def test_model_states_equal_deepspeeds_estimator(preset: str, gpus: int, stage: int, offload: str | None) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = ModelConfig.from_preset(preset)
    p, largest = param_count(cfg), largest_module_params(cfg)
    ours = sum(model_state_bytes(p, largest, stage, gpus, "bf16", offload).values())
    nodes = gpus // 8
    if stage == 2:
        _, theirs = estimate_zero2_model_states_mem_needs(p, 8, nodes, cpu_offload=offload is not None)
    else:
        _, theirs, _ = estimate_zero3_model_states_mem_needs(p, largest, 8, nodes, cpu_offload=offload is not None,
                                                             cpu_offload_params=offload == "params")  # fmt: skip
    assert abs(ours - theirs) <= 16  # the same formula; only integer rounding per term differs
    assert deepspeed_estimate(p, largest, stage, gpus, 8, offload)["gpu_bytes"] == theirs


def test_stage1_differs_from_the_zero2_estimator_by_the_unpartitioned_16bit_gradients() -> None:
    cfg = ModelConfig.from_preset("1.3b")
    p, largest, n = param_count(cfg), largest_module_params(cfg), 8
    stage1 = sum(model_state_bytes(p, largest, 1, n).values())
    ds = deepspeed_estimate(p, largest, 1, n)["gpu_bytes"]
    assert abs((stage1 - ds) - (2 * p - 2 * p / n)) <= 16
    stage0 = model_state_bytes(p, largest, 0, n)
    assert stage0["params"] == 2 * p and stage0["gradients"] == 6 * p and deepspeed_estimate(p, largest, 0, n) is None


CASES = [  # (arch, ista, batch, seq, d, checkpointing, dtype)
    ("crate", "alpha", 2, 64, 32, False, torch.float32),
    ("crate", "alpha", 3, 32, 64, True, torch.float32),
    ("crate", "crate", 2, 48, 32, False, torch.float32),
    ("crate", "overcomplete", 1, 64, 32, False, torch.bfloat16),
    ("gpt", "alpha", 2, 64, 32, False, torch.float32),
    ("gpt", "alpha", 2, 32, 64, True, torch.bfloat16),
]


@pytest.mark.parametrize("arch,ista,batch,seq,d,ckpt,dtype", CASES)
def test_activation_model_matches_the_saved_tensors(arch, ista, batch, seq, d, ckpt, dtype) -> None:
    cfg = ModelConfig(vocab_size=97, max_seq_len=seq, d_model=d, n_layers=2, n_heads=4, arch=arch, ista=ista,
                      activation_checkpointing=ckpt)  # fmt: skip
    a = 4 if dtype == torch.float32 else 2
    measured = measure_saved_bytes(cfg, batch, seq, dtype)
    predicted = activation_bytes(cfg, batch, seq, act_bytes=a, stats_bytes=a)["saved"]  # CPU: LN stats in dtype
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)
    assert predicted == measured  # exact today: the model counts every saved tensor


def test_checkpointing_saves_memory_and_the_plan_fits_its_largest_micro_batch() -> None:
    cfg = ModelConfig.from_preset("1.3b")
    full = activation_bytes(cfg, 4, 2048, checkpointing=False)["peak"]
    ckpt = activation_bytes(cfg, 4, 2048, checkpointing=True)["peak"]
    assert ckpt < full / 2
    result = plan(PlanRequest(preset="1.3b", zero_stage=2, gpus=8, micro_batch=4, seq_len=2048, gpu_memory=40))
    best = result["max_micro_batch"]
    assert best >= 1
    fits = plan(PlanRequest(preset="1.3b", zero_stage=2, gpus=8, micro_batch=best, seq_len=2048, gpu_memory=40))
    over = plan(PlanRequest(preset="1.3b", zero_stage=2, gpus=8, micro_batch=best + 1, seq_len=2048, gpu_memory=40))
    assert fits["fits"] and not over["fits"] and over["per_gpu_gib"]["total"] > 40
    assert result["per_gpu_gib"]["model_states"] == result["deepspeed_model_states_gib"]
    assert result["fits"] == (result["per_gpu_gib"]["total"] <= 40)
    assert result["per_gpu_gib"]["total"] * GIB > 0


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "crate_lm.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_plan_command_json_and_errors(tmp_path: Path) -> None:
    proc = cli("plan", "--preset", "7b", "--zero_stage", "3", "--gpus", "64", "--micro_batch", "1", "--seq_len", "2048",
               "--activation_checkpointing", "--json", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["setup"]["activation_checkpointing"] and result["fits"] and result["max_micro_batch"] >= 1
    assert abs(result["per_gpu_gib"]["model_states"] - result["deepspeed_model_states_gib"]) < 0.01
    for args, message in [
        (["plan", "--preset", "7x"], "unknown model preset"),
        (["plan", "--zero_stage", "1", "--offload", "optimizer"], "needs --zero_stage 2 or 3"),
        (["plan", "--gpus", "0"], "--gpus must be >= 1"),
    ]:
        proc = cli(*args, cwd=tmp_path)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
        assert message in lines[0], lines
