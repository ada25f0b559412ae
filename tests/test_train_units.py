"""Fast unit tests of the training building blocks: config validation, the derived DeepSpeed
config, the learning-rate schedule, the optimizer, the health monitor, the checkpoint folder
policy and safe loading. No DeepSpeed engine, no process group."""

import dataclasses
import json
import math
import os
import random

import pytest
import torch
from safetensors.torch import save_file

from crate_lm import checkpoint as ckpt
from crate_lm.checkpoint import (
    COMPLETE,
    CheckpointError,
    checkpoint_model_config,
    complete_checkpoints,
    load_model,
    load_trainer_state,
    remove_checkpoint,
    safe_torch_load,
    weights_metadata,
)
from crate_lm.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    dump_run_config,
    load_run_config,
    run_config_from_dict,
)
from crate_lm.model import build_model
from crate_lm.train.checkpointer import Checkpointer, changed_settings, is_sound
from crate_lm.train.engine import (
    GuardedAdamW,
    apply_optim_settings,
    client_clips,
    deepspeed_config,
    parameter_groups,
)
from crate_lm.train.health import HealthMonitor
from crate_lm.train.schedule import default_decay_steps, learning_rate, resolve_schedule


def nested(dotted: dict) -> dict:
    """{"optim.lr": 0} -> {"optim": {"lr": 0}}."""
    out: dict = {}
    for key, value in dotted.items():
        section, name = key.split(".")
        out.setdefault(section, {})[name] = value
    return out


def cli_args(dotted: dict) -> list[str]:
    return [arg for key, value in dotted.items() for arg in (f"--{key}", str(value))]


# ---- 1. config validation ----------------------------------------------------------------------

BAD_VALUES = [
    ({"optim.lr": 0}, "optim.lr"),
    ({"optim.lr": -1e-3}, "optim.lr"),
    ({"optim.min_lr": -1e-5}, "optim.min_lr"),
    ({"optim.lr": 1e-3, "optim.min_lr": 2e-3}, "optim.min_lr"),
    ({"optim.warmup_steps": -1}, "optim.warmup_steps"),
    ({"optim.decay_steps": 0}, "optim.decay_steps"),
    ({"optim.weight_decay": -0.1}, "optim.weight_decay"),
    ({"optim.beta1": 1}, "optim.beta1"),
    ({"optim.beta1": 1.5}, "optim.beta1"),
    ({"optim.beta2": 1}, "optim.beta2"),
    ({"optim.eps": 0}, "optim.eps"),
    ({"optim.eps": -1e-8}, "optim.eps"),
    ({"optim.grad_clip": -1}, "optim.grad_clip"),
    ({"train.global_batch": 0}, "train.global_batch"),
    ({"train.grad_accum": 0}, "train.grad_accum"),
    ({"train.grad_accum": -2}, "train.grad_accum"),
    ({"train.micro_batch": 0}, "train.micro_batch"),
    ({"train.max_steps": 0}, "train.max_steps"),
    ({"train.log_interval": 0}, "train.log_interval"),
    ({"train.eval_interval": -1}, "train.eval_interval"),
    ({"train.eval_batches": 0}, "train.eval_batches"),
    ({"train.max_bad_steps": 0}, "train.max_bad_steps"),
    ({"train.spike_sigmas": -1}, "train.spike_sigmas"),
    ({"train.spike_window": 0}, "train.spike_window"),
    ({"train.max_spike_steps": 0}, "train.max_spike_steps"),
    ({"checkpoint.interval": 0}, "checkpoint.interval"),
    ({"checkpoint.keep_last": -1}, "checkpoint.keep_last"),
    ({"data.num_workers": -1}, "data.num_workers"),
    ({"data.mlm_prob": 0}, "data.mlm_prob"),
    ({"data.mlm_prob": 1}, "data.mlm_prob"),
    ({"optim.schedule": "cosin"}, "optim.schedule"),
    ({"deepspeed.zero_stage": 4}, "deepspeed.zero_stage"),
]


@pytest.mark.parametrize("via", ["dict", "cli"])
@pytest.mark.parametrize("values,key", BAD_VALUES, ids=[f"{k}={list(v.values())[-1]}" for v, k in BAD_VALUES])
def test_bad_value_is_a_config_error_naming_the_key(values, key, via):
    with pytest.raises(ConfigError) as err:
        if via == "dict":
            run_config_from_dict(nested(values))
        else:
            load_run_config(None, cli_args(values))
    message = str(err.value)
    assert message.startswith(key), message
    assert "\n" not in message


def test_unknown_schedule_suggests_a_close_one():
    with pytest.raises(ConfigError, match=r"^optim\.schedule: 'cosin' is not one of .*did you mean 'cosine'"):
        load_run_config(None, ["--optim.schedule", "cosin"])


GOOD_EDGES = [
    {"train.eval_interval": 0},
    {"checkpoint.keep_last": 0},
    {"optim.grad_clip": 0},
    {"optim.min_lr": 0},
    {"optim.lr": 1e-3, "optim.min_lr": 1e-3},
    {"optim.warmup_steps": 0},
    {"optim.beta1": 0},
    {"train.spike_sigmas": 0},
    {"data.num_workers": 0},
    {"optim.decay_steps": 1},
]


@pytest.mark.parametrize("values", GOOD_EDGES, ids=[",".join(v) for v in GOOD_EDGES])
def test_edge_values_that_are_allowed(values):
    cfg = load_run_config(None, cli_args(values))
    for key, value in values.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == pytest.approx(value)


# ---- 2. the derived DeepSpeed config -----------------------------------------------------------


def ds_cfg(**dotted):
    return run_config_from_dict(nested(dotted))


@pytest.mark.parametrize("world,accum", [(1, 8), (4, 2)])
def test_deepspeed_config_batch_sizes(world, accum):
    config = deepspeed_config(ds_cfg(**{"train.micro_batch": 4, "train.global_batch": 32}), world)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == accum
    assert config["train_batch_size"] == 32


def test_deepspeed_config_without_global_batch():
    config = deepspeed_config(ds_cfg(**{"train.micro_batch": 4, "train.grad_accum": 3}), 4)
    assert (config["gradient_accumulation_steps"], config["train_batch_size"]) == (3, 48)
    config = deepspeed_config(ds_cfg(**{"train.micro_batch": 4}), 2)
    assert (config["gradient_accumulation_steps"], config["train_batch_size"]) == (1, 8)


@pytest.mark.parametrize(
    "stage,precision,clip,expected",
    [(0, "fp32", 0.5, 0.0), (0, "bf16", 0.5, 0.5), (0, "fp16", 0.5, 0.5), (1, "fp32", 0.5, 0.5), (2, "fp32", 0.0, 0.0)],
)
def test_gradient_clipping_is_done_by_one_side_only(stage, precision, clip, expected):
    cfg = ds_cfg(**{"deepspeed.zero_stage": stage, "deepspeed.precision": precision, "optim.grad_clip": clip})
    config = deepspeed_config(cfg, 1)
    assert config["gradient_clipping"] == expected
    # ZeRO-0 fp32: the client optimizer (GuardedAdamW) clips instead
    assert client_clips(cfg) == (stage == 0 and precision == "fp32")
    assert config["zero_optimization"]["stage"] == stage
    assert config["bf16"]["enabled"] == (precision == "bf16")
    assert config["fp16"]["enabled"] == (precision == "fp16")


def test_deepspeed_config_entries_merge_over_sections_and_replace_scalars():
    extra = {
        "zero_optimization": {"reduce_bucket_size": 50_000_000},
        "fp16": {"initial_scale_power": 8},
        "steps_per_print": 10,
        "wall_clock_breakdown": True,
        "flops_profiler": {"enabled": False},
    }
    cfg = run_config_from_dict({"deepspeed": {"zero_stage": 2, "config": extra}})
    config = deepspeed_config(cfg, 1)
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 50_000_000}
    assert config["fp16"] == {"enabled": False, "initial_scale_power": 8}
    assert config["steps_per_print"] == 10 and config["wall_clock_breakdown"] is True
    assert config["flops_profiler"] == {"enabled": False}
    assert cfg.deepspeed.config == extra  # the run config is not modified


def test_deepspeed_config_merge_keeps_derived_nested_entries():
    cfg = run_config_from_dict(
        {
            "deepspeed": {
                "zero_stage": 2,
                "offload_optimizer": True,
                "config": {"zero_optimization": {"offload_optimizer": {"pin_memory": False}}},
            }
        }
    )
    offload = deepspeed_config(cfg, 1)["zero_optimization"]["offload_optimizer"]
    assert offload == {"device": "cpu", "pin_memory": False}


@pytest.mark.parametrize("key", ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"])
def test_deepspeed_config_may_not_contradict_batch_sizes(key):
    base = {"train": {"micro_batch": 4, "global_batch": 32}}
    derived = deepspeed_config(run_config_from_dict(base), 2)
    same = run_config_from_dict({**base, "deepspeed": {"config": {key: derived[key]}}})
    assert deepspeed_config(same, 2)[key] == derived[key]  # restating the same value is fine
    other = run_config_from_dict({**base, "deepspeed": {"config": {key: derived[key] * 2}}})
    with pytest.raises(
        ConfigError, match=rf"^deepspeed\.config\.{key}={derived[key] * 2} contradicts .*\({derived[key]}\)"
    ):
        deepspeed_config(other, 2)


def test_deepspeed_config_offload_sections():
    cfg = run_config_from_dict(
        {"deepspeed": {"zero_stage": 2, "offload_optimizer": True}, "optim": {"lr": 3e-4, "beta2": 0.99, "eps": 1e-6}}
    )
    config = deepspeed_config(cfg, 1)
    assert config["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.99], "eps": 1e-6}}
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in config["zero_optimization"]
    cfg = run_config_from_dict({"deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}})
    zero = deepspeed_config(cfg, 1)["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert "optimizer" not in deepspeed_config(run_config_from_dict({"deepspeed": {"zero_stage": 2}}), 1)


@pytest.mark.parametrize(
    "section,message",
    [
        ({"zero_stage": 2, "offload_params": True}, "deepspeed.offload_params needs deepspeed.zero_stage: 3"),
        ({"zero_stage": 1, "offload_optimizer": True}, "deepspeed.offload_optimizer needs deepspeed.zero_stage 2 or 3"),
    ],
)
def test_offload_needs_a_zero_stage(section, message):
    with pytest.raises(ConfigError, match=message):
        run_config_from_dict({"deepspeed": section})


# ---- 3. batch plan ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "train,world,plan",
    [
        ({"micro_batch": 4, "global_batch": 32}, 1, (4, 8, 32)),
        ({"micro_batch": 4, "global_batch": 32}, 2, (4, 4, 32)),
        ({"micro_batch": 4, "global_batch": 32}, 8, (4, 1, 32)),
        ({"micro_batch": 4, "global_batch": 32, "grad_accum": 2}, 4, (4, 2, 32)),
        ({"micro_batch": 4, "grad_accum": 3}, 2, (4, 3, 24)),
        ({"micro_batch": 5}, 3, (5, 1, 15)),
    ],
)
def test_batch_plan(train, world, plan):
    assert run_config_from_dict({"train": train}).batch_plan(world) == plan


def test_batch_plan_global_batch_not_divisible():
    cfg = run_config_from_dict({"train": {"micro_batch": 4, "global_batch": 30}})
    with pytest.raises(ConfigError, match=r"train\.global_batch=30 is not divisible by .* 4 x 2 = 8"):
        cfg.batch_plan(2)
    with pytest.raises(ConfigError, match=r"4 x 1 = 4"):
        cfg.batch_plan(1)


def test_batch_plan_contradicting_grad_accum():
    cfg = run_config_from_dict({"train": {"micro_batch": 4, "global_batch": 32, "grad_accum": 3}})
    with pytest.raises(ConfigError, match=r"train\.global_batch=32 contradicts .* 4 x 3 x 2"):
        cfg.batch_plan(2)


# ---- 4. learning-rate schedule ---------------------------------------------------------------

LR, MIN_LR, WARMUP = 1e-3, 1e-4, 10


def sched_cfg(schedule="cosine", max_steps=100, **optim):
    optim = {"lr": LR, "min_lr": MIN_LR, "warmup_steps": WARMUP, "schedule": schedule, **optim}
    return run_config_from_dict({"optim": optim, "train": {"max_steps": max_steps}})


def cosine(step, decay):
    progress = min(1.0, (step - WARMUP) / decay)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_to_lr_and_continuous(schedule):
    cfg = resolve_schedule(sched_cfg(schedule))
    lrs = [learning_rate(s, cfg.optim, 100) for s in range(WARMUP + 1)]
    assert lrs[:WARMUP] == pytest.approx([LR * (s + 1) / WARMUP for s in range(WARMUP)])
    assert lrs[WARMUP - 1] == pytest.approx(LR) and lrs[WARMUP] == pytest.approx(LR)
    # no step after warmup exceeds lr, no jump larger than a warmup increment
    curve = [learning_rate(s, cfg.optim, 100) for s in range(150)]
    assert max(curve) == pytest.approx(LR)
    assert max(abs(a - b) for a, b in zip(curve, curve[1:])) <= LR / WARMUP + 1e-12


def test_no_warmup_starts_at_lr():
    cfg = resolve_schedule(sched_cfg(warmup_steps=0))
    assert learning_rate(0, cfg.optim, 100) == pytest.approx(LR)
    assert cfg.optim.decay_steps == 100


def test_cosine_closed_form_and_floor():
    cfg = resolve_schedule(sched_cfg("cosine", max_steps=100))
    decay = cfg.optim.decay_steps
    assert decay == 100 - WARMUP
    for step in (WARMUP, 20, WARMUP + decay // 2, 77, 99):
        assert learning_rate(step, cfg.optim, 100) == pytest.approx(cosine(step, decay), rel=1e-12)
    assert learning_rate(WARMUP + decay // 2, cfg.optim, 100) == pytest.approx((LR + MIN_LR) / 2)
    assert learning_rate(WARMUP + decay, cfg.optim, 100) == pytest.approx(MIN_LR)
    for step in (101, 150, 10_000):
        assert learning_rate(step, cfg.optim, 100) == pytest.approx(MIN_LR)


def test_extending_a_cosine_run_keeps_its_curve():
    first = resolve_schedule(sched_cfg("cosine", max_steps=100))
    longer = resolve_schedule(sched_cfg("cosine", max_steps=200), saved=first)
    assert longer.optim.decay_steps == first.optim.decay_steps == 90
    old = [learning_rate(s, first.optim, 100) for s in range(100)]
    new = [learning_rate(s, longer.optim, 200) for s in range(200)]
    assert new[:100] == pytest.approx(old, rel=1e-12)
    assert new[100:] == pytest.approx([MIN_LR] * 100)  # the extra steps do not raise the lr
    # unresolved, the longer run would stretch the decay instead
    fresh = resolve_schedule(sched_cfg("cosine", max_steps=200))
    assert fresh.optim.decay_steps == 190 and learning_rate(100, fresh.optim, 200) > 2 * MIN_LR


def test_resolve_schedule_defaults():
    assert resolve_schedule(sched_cfg("cosine", max_steps=100)).optim.decay_steps == 90
    assert resolve_schedule(sched_cfg("wsd", max_steps=100)).optim.decay_steps == 20
    assert resolve_schedule(sched_cfg("wsd", max_steps=1003)).optim.decay_steps == round(0.2 * 1003)
    assert resolve_schedule(sched_cfg("cosine", max_steps=5)).optim.decay_steps == 1  # never 0
    assert resolve_schedule(sched_cfg("wsd", max_steps=2)).optim.decay_steps == 1
    assert default_decay_steps(OptimConfig(schedule="wsd"), 500) == 100
    cfg = sched_cfg("cosine")
    resolve_schedule(cfg)
    assert cfg.optim.decay_steps is None  # the input config is left alone


def test_resolve_schedule_precedence():
    saved = resolve_schedule(sched_cfg("cosine", max_steps=100))
    # explicit decay_steps wins over the saved one
    assert resolve_schedule(sched_cfg("cosine", max_steps=300, decay_steps=50), saved=saved).optim.decay_steps == 50
    # a saved config from before decay_steps was recorded: its own default
    legacy = sched_cfg("cosine", max_steps=100)
    assert resolve_schedule(sched_cfg("cosine", max_steps=300), saved=legacy).optim.decay_steps == 90
    # another schedule kind does not inherit
    assert resolve_schedule(sched_cfg("wsd", max_steps=300), saved=saved).optim.decay_steps == 60
    wsd_saved = resolve_schedule(sched_cfg("wsd", max_steps=100))
    assert resolve_schedule(sched_cfg("wsd", max_steps=300), saved=wsd_saved).optim.decay_steps == 20
    assert resolve_schedule(sched_cfg("cosine", max_steps=300), saved=wsd_saved).optim.decay_steps == 290


def test_wsd_is_flat_then_linear_to_min_lr():
    cfg = resolve_schedule(sched_cfg("wsd", max_steps=100))
    decay = cfg.optim.decay_steps
    start = 100 - decay
    for step in range(WARMUP, start + 1):
        assert learning_rate(step, cfg.optim, 100) == pytest.approx(LR)
    for step in range(start, 101):
        expected = LR + (MIN_LR - LR) * (step - start) / decay
        assert learning_rate(step, cfg.optim, 100) == pytest.approx(expected, rel=1e-12)
    assert learning_rate(start + decay // 2, cfg.optim, 100) == pytest.approx((LR + MIN_LR) / 2)
    assert learning_rate(150, cfg.optim, 100) == pytest.approx(MIN_LR)
    # extending max_steps before the decay began moves the decay to the new end
    longer = resolve_schedule(sched_cfg("wsd", max_steps=200), saved=cfg)
    assert learning_rate(150, longer.optim, 200) == pytest.approx(LR)
    assert learning_rate(190, longer.optim, 200) == pytest.approx((LR + MIN_LR) / 2)


def test_constant_stays_at_lr():
    cfg = resolve_schedule(sched_cfg("constant", max_steps=100))
    assert [learning_rate(s, cfg.optim, 100) for s in (WARMUP, 50, 99, 100, 10_000)] == pytest.approx([LR] * 5)


# ---- 5. GuardedAdamW ---------------------------------------------------------------------------

ADAM = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.01)


def grad_of_norm(shape, norm, seed):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g * (norm / g.norm())


def test_guarded_adamw_clips_like_adamw_on_the_clipped_gradient():
    init = torch.randn(6, 5, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    ours = [torch.nn.Parameter(init.clone()), torch.nn.Parameter(bias.clone())]
    ref = [torch.nn.Parameter(init.clone()), torch.nn.Parameter(bias.clone())]
    opt = GuardedAdamW(ours, max_grad_norm=1.0, **ADAM)
    ref_opt = torch.optim.AdamW(ref, **ADAM)
    # step 1: norm 10 (clipped to 1); step 2: norm 0.5 (left alone)
    for norm, seed in ((10.0, 1), (0.5, 2)):
        grads = [grad_of_norm(p.shape, 1.0, seed + i) for i, p in enumerate(ours)]
        scale = norm / torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        grads = [g * scale for g in grads]
        for p, q, g in zip(ours, ref, grads):
            p.grad = g.clone()
            q.grad = g * min(1.0, 1.0 / norm)
        opt.step()
        ref_opt.step()
        assert opt._global_grad_norm == pytest.approx(norm, rel=1e-9)  # the pre-clip norm
        assert opt.overflow is False
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.data, q.data, rtol=1e-6, atol=1e-9)
    # clipping mattered: AdamW on the unclipped gradient lands elsewhere
    raw = [torch.nn.Parameter(init.clone()), torch.nn.Parameter(bias.clone())]
    raw_opt = torch.optim.AdamW(raw, **ADAM)
    for norm, seed in ((10.0, 1), (0.5, 2)):
        grads = [grad_of_norm(p.shape, 1.0, seed + i) for i, p in enumerate(raw)]
        scale = norm / torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        for p, g in zip(raw, grads):
            p.grad = g * scale
        raw_opt.step()
    assert not torch.allclose(raw[0].data, ours[0].data, rtol=1e-4, atol=1e-6)


def test_guarded_adamw_without_clipping_is_adamw():
    init = torch.randn(4, 3, dtype=torch.float64)
    p, q = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt, ref_opt = GuardedAdamW([p], max_grad_norm=0.0, **ADAM), torch.optim.AdamW([q], **ADAM)
    g = grad_of_norm(init.shape, 10.0, 3)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(p.data, q.data)
    assert opt._global_grad_norm == pytest.approx(10.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_guarded_adamw_skips_a_non_finite_step(bad):
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = GuardedAdamW([p], max_grad_norm=1.0, **ADAM)
    assert opt.param_groups[0]["step"] == 0
    p.grad = grad_of_norm(p.shape, 0.5, 4)
    opt.step()
    assert opt.param_groups[0]["step"] == 1 and opt.overflow is False
    before = p.data.clone()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    grad = grad_of_norm(p.shape, 0.5, 5)
    grad[1, 2] = bad
    p.grad = grad
    opt.step()
    assert opt.overflow is True
    assert not math.isfinite(opt._global_grad_norm)
    assert torch.equal(p.data, before)
    for key, value in state.items():
        assert torch.equal(opt.state[p][key], value), key
    assert opt.param_groups[0]["step"] == 1  # the skipped step is not counted
    assert p.grad is None
    # the next finite step applies and clears the flag
    p.grad = grad_of_norm(p.shape, 0.5, 6)
    opt.step()
    assert opt.overflow is False and opt.param_groups[0]["step"] == 2
    assert not torch.equal(p.data, before)


def test_guarded_adamw_step_counter_in_every_group():
    a, b = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))
    opt = GuardedAdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1e-2)
    for _ in range(3):
        a.grad, b.grad = torch.ones(3, 3), torch.ones(3)
        opt.step()
    assert [g["step"] for g in opt.param_groups] == [3, 3]
    a.grad, b.grad = torch.full((3, 3), float("nan")), torch.ones(3)
    opt.step()
    assert opt.overflow and [g["step"] for g in opt.param_groups] == [3, 3]


# ---- 6. parameter groups and optimizer settings ------------------------------------------------


def small_model(**overrides):
    base = dict(vocab_size=97, max_seq_len=32, d_model=32, n_layers=2, n_heads=4)
    return build_model(ModelConfig(**{**base, **overrides}))


def test_parameter_groups_decay_matrices_only():
    model = small_model()
    decay, other = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and other["weight_decay"] == 0.0
    assert decay["params"] and other["params"]
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in other["params"])
    assert len(decay["params"]) + len(other["params"]) == len(list(model.parameters()))


def test_apply_optim_settings_overrides_loaded_values():
    model = small_model()
    opt = GuardedAdamW(parameter_groups(model, 0.3), lr=1e-3, betas=(0.5, 0.6), eps=1.0)
    opt.param_groups[1]["weight_decay"] = 0.3  # as a stale optimizer state might carry
    apply_optim_settings(opt, OptimConfig(weight_decay=0.05, beta1=0.8, beta2=0.9, eps=1e-6))
    assert opt.param_groups[0]["weight_decay"] == 0.05
    assert opt.param_groups[1]["weight_decay"] == 0.0
    for group in opt.param_groups:
        assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
        assert group["lr"] == 1e-3  # the lr is the schedule's business


# ---- 7. HealthMonitor --------------------------------------------------------------------------


def monitor(**train):
    return HealthMonitor(TrainConfig(**train))


def test_no_spike_test_before_half_a_window_of_history():
    health = monitor(spike_window=10)
    assert health.min_history == 5
    for step in range(4):
        assert health.observe(step, 2.0, True) is None
    assert health.observe(4, 1000.0, True) is None  # 4 < 5 seen: not judged (and kept)
    assert len(health.losses) == 5
    assert monitor().min_history == 25  # defaults: window 50


def test_a_loss_far_above_the_recent_mean_is_a_spike_kept_out_of_history():
    def flat():
        health = monitor(spike_window=10)
        for step in range(10):
            health.observe(step, 2.0, True)
        return health

    # a flat curve: the deviation is floored at 1% of the mean, threshold 2 + 6 x 0.02 = 2.12
    assert flat().observe(10, 2.11, True) is None
    health = flat()
    event = health.observe(10, 2.13, True)
    assert event["event"] == "loss_spike" and event["step"] == 10 and event["loss"] == 2.13
    assert event["mean"] == pytest.approx(2.0) and event["threshold"] == pytest.approx(2.12)
    assert list(health.losses) == [2.0] * 10 and health.spike_steps == 1
    assert not health.sound and health.diverged() is None


def test_spikes_in_a_row_diverge_and_a_normal_step_resets_the_streak():
    health = monitor(spike_window=10, max_spike_steps=3)
    for step in range(10):
        health.observe(step, 3.0 + 0.01 * (step % 3), True)
    history = list(health.losses)
    health.observe(10, 50.0, True)
    health.observe(11, 50.0, True)
    assert health.diverged() is None
    health.observe(12, 3.0, True)  # healthy again
    assert health.spike_steps == 0 and health.sound
    for step in range(13, 16):
        assert health.observe(step, 50.0, True)["event"] == "loss_spike"
    reason = health.diverged()
    assert reason is not None and reason.startswith("3 loss spikes in a row") and "6 sigma" in reason
    assert list(health.losses) == [*history[1:], 3.0]  # no spike entered the history


def test_non_finite_and_skipped_steps():
    health = monitor(max_bad_steps=3)
    health.observe(0, 2.0, True)
    for step, (loss, applied) in enumerate([(float("nan"), True), (float("inf"), True)], start=1):
        event = health.observe(step, loss, applied)
        assert event["event"] == "skipped_nonfinite"
        assert not health.sound and health.diverged() is None
    assert health.observe(3, 2.0, False)["event"] == "skipped_nonfinite"  # the optimizer refused it
    assert health.bad_steps == 3 and health.diverged() == "3 non-finite steps in a row"
    assert list(health.losses) == [2.0]
    health.observe(4, 2.0, True)
    assert health.bad_steps == 0 and health.sound and health.diverged() is None


def test_health_state_round_trip():
    health = monitor(spike_window=10, max_spike_steps=5)
    for step in range(12):
        health.observe(step, 2.0 + 0.001 * step, True)
    health.observe(12, 40.0, True)
    health.observe(13, float("nan"), True)
    state = json.loads(json.dumps(health.state_dict()))
    restored = monitor(spike_window=10, max_spike_steps=5)
    restored.load_state_dict(state)
    assert restored.state_dict() == health.state_dict()
    assert (restored.bad_steps, restored.spike_steps, restored.sound) == (1, 1, False)
    assert restored.observe(14, 40.0, True) == health.observe(14, 40.0, True)
    # a longer saved history is cut to the window
    small = monitor(spike_window=4)
    small.load_state_dict({"losses": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    assert list(small.losses) == [3.0, 4.0, 5.0, 6.0] and small.sound


@pytest.mark.parametrize("seed", range(5))
def test_a_noisy_decreasing_curve_raises_no_spike_with_the_defaults(seed):
    rng = random.Random(seed)
    health = monitor()
    events = [health.observe(t, 5 - 0.01 * t + rng.gauss(0, 0.02), True) for t in range(300)]
    assert [e for e in events if e is not None] == []
    assert health.sound
    # the same curve with a jump of +2.0 is caught
    assert health.observe(300, 5 - 0.01 * 300 + 2.0, True)["event"] == "loss_spike"


def test_spike_detection_disabled():
    health = monitor(spike_window=10, spike_sigmas=0)
    for step in range(10):
        health.observe(step, 2.0, True)
    assert health.observe(10, 1e6, True) is None and health.sound


# ---- 8. checkpoint folder policy ---------------------------------------------------------------


def fake_checkpoint(out_dir, step, sound=True, complete=True, state=None):
    folder = out_dir / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if state == "corrupt":
        text = '{"step": '
    else:
        text = json.dumps({"step": step, "sound": sound} if state is None else state)
    (folder / "trainer_state.json").write_text(text)
    if complete:
        (folder / COMPLETE).write_bytes(b"")
    return folder


def checkpointer(out_dir, keep_last):
    cfg = run_config_from_dict({"train": {"out_dir": str(out_dir)}, "checkpoint": {"keep_last": keep_last}})
    return Checkpointer(cfg, rank=0, world=1)


def steps_of(folders):
    return [int(f.name.split("_")[1]) for f in folders]


def test_prune_keeps_the_last_ones(tmp_path):
    for step in range(1, 6):
        fake_checkpoint(tmp_path, step)
    saver = checkpointer(tmp_path, 2)
    assert steps_of(saver.prune()) == [1, 2, 3]
    assert steps_of(complete_checkpoints(tmp_path / "checkpoints")) == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]
    assert saver.prune() == []


def test_prune_never_removes_the_newest_sound_checkpoint(tmp_path):
    for step in range(1, 6):
        fake_checkpoint(tmp_path, step, sound=step <= 3)
    saver = checkpointer(tmp_path, 2)
    assert steps_of([saver.newest_sound()]) == [3]
    assert steps_of(saver.prune()) == [1, 2]
    assert steps_of(complete_checkpoints(tmp_path / "checkpoints")) == [3, 4, 5]
    fake_checkpoint(tmp_path, 6, sound=False)
    assert steps_of(saver.prune()) == [4]  # 3 (sound), 5 and 6 (the last two) stay
    assert steps_of(complete_checkpoints(tmp_path / "checkpoints")) == [3, 5, 6]


def test_prune_keep_last_zero_keeps_all(tmp_path):
    for step in range(1, 6):
        fake_checkpoint(tmp_path, step, sound=step % 2 == 0)
    assert checkpointer(tmp_path, 0).prune() == []
    assert steps_of(complete_checkpoints(tmp_path / "checkpoints")) == [1, 2, 3, 4, 5]


def test_prune_ignores_incomplete_folders(tmp_path):
    for step in range(1, 4):
        fake_checkpoint(tmp_path, step)
    partial = fake_checkpoint(tmp_path, 4, complete=False)
    (tmp_path / "checkpoints" / "notes").mkdir()
    saver = checkpointer(tmp_path, 2)
    assert steps_of(saver.prune()) == [1]  # the partial step 4 is not one of the last two
    assert steps_of(complete_checkpoints(tmp_path / "checkpoints")) == [2, 3]
    assert partial.is_dir() and (tmp_path / "checkpoints" / "notes").is_dir()
    assert checkpointer(tmp_path, 3).prune() == []


def test_soundness_of_a_checkpoint(tmp_path):
    assert is_sound(fake_checkpoint(tmp_path, 1, state={"step": 1}))  # saved before the flag existed
    assert not is_sound(fake_checkpoint(tmp_path, 2, sound=False))
    assert not is_sound(fake_checkpoint(tmp_path, 3, state="corrupt"))
    assert steps_of([checkpointer(tmp_path, 1).newest_sound()]) == [1]


def test_remove_checkpoint_deletes_the_marker_first(tmp_path, monkeypatch):
    folder = fake_checkpoint(tmp_path, 7)
    calls = []

    def interrupted_rmtree(path, *args, **kwargs):
        calls.append(path)
        assert not (folder / COMPLETE).exists(), "COMPLETE must go before the rest"
        raise KeyboardInterrupt  # the removal is cut short here

    monkeypatch.setattr(ckpt.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        remove_checkpoint(folder)
    assert calls == [folder]
    assert folder.is_dir() and complete_checkpoints(tmp_path / "checkpoints") == []
    monkeypatch.undo()
    remove_checkpoint(folder)
    assert not folder.exists()
    remove_checkpoint(folder)  # already gone: no error


def test_changed_settings_lists_what_differs():
    saved = run_config_from_dict({"train": {"out_dir": "runs/a"}})
    cfg = run_config_from_dict(
        {
            "optim": {"lr": 5e-4},
            "train": {"out_dir": "runs/b", "max_steps": 400},
            "checkpoint": {"resume": "runs/a/checkpoints/step_00000100"},
            "deepspeed": {"config": {"steps_per_print": 5}},
        }
    )
    assert changed_settings(saved, cfg) == [
        "optim.lr 0.001 -> 0.0005",
        "train.max_steps 200 -> 400",
        "deepspeed.config {} -> {'steps_per_print': 5}",
    ]
    assert changed_settings(saved, saved) == []


# ---- 9. safe loading ---------------------------------------------------------------------------


class RunsCode:
    """Unpickling this would call os.system("true")."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_safe_torch_load_reads_tensors(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(3), "step": 4, "name": "x"}, path)
    loaded = safe_torch_load(path)
    assert torch.equal(loaded["w"], torch.arange(3)) and loaded["step"] == 4


@pytest.mark.parametrize("payload", [RunsCode(), {"w": torch.zeros(2), "x": RunsCode()}], ids=["bare", "nested"])
def test_safe_torch_load_refuses_code(tmp_path, payload):
    path = tmp_path / "model_states.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        safe_torch_load(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    assert "holds Python objects" in message and "would run code" in message
    assert "system" in message  # names what it would call
    assert "weights_only" not in message


def test_safe_torch_load_truncated_and_missing(tmp_path):
    path = tmp_path / "optim_states.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 10):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"not a readable torch file: it is truncated or corrupt") as err:
            safe_torch_load(path)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        safe_torch_load(path)
    with pytest.raises(CheckpointError, match=r"nope\.pt: file missing"):
        safe_torch_load(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"hello world this is not torch", id="text"),
        pytest.param(b'{"a": 1}\n', id="json"),
        # what a crash can leave of a file whose data never reached the disk
        pytest.param(bytes(100), id="zeros-100"),
        pytest.param(bytes(4096), id="zeros-4096"),
    ],
)
def test_safe_torch_load_garbage_is_not_a_torch_file(tmp_path, data):
    path = tmp_path / "rng_rank00000.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a readable torch file") as err:
        safe_torch_load(path)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_trainer_state_errors(tmp_path):
    folder = fake_checkpoint(tmp_path, 1, state={"step": 1, "sound": True})
    assert load_trainer_state(folder) == {"step": 1, "sound": True}
    (folder / "trainer_state.json").write_text('{"step": 1, "sou')
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: corrupt"):
        load_trainer_state(folder)
    (folder / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: missing"):
        load_trainer_state(folder)


# ---- 10. the weights know their architecture ---------------------------------------------------

MODEL = dict(vocab_size=97, max_seq_len=32, d_model=32, n_layers=2, n_heads=4)


def write_checkpoint(folder, model_cfg, *, metadata=True):
    run_cfg = run_config_from_dict({"model": dataclasses.asdict(model_cfg)})
    model = build_model(model_cfg)
    folder.mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata=weights_metadata(run_cfg) if metadata else None)
    (folder / "config.yaml").write_text(dump_run_config(run_cfg))
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1, "sound": True}))
    (folder / COMPLETE).write_bytes(b"")
    return run_cfg, state


def rewrite_config(folder, model_cfg):
    (folder / "config.yaml").write_text(dump_run_config(run_config_from_dict({"model": dataclasses.asdict(model_cfg)})))


def test_load_model_from_a_checkpoint_folder(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    model_cfg = ModelConfig(**MODEL)
    run_cfg, state = write_checkpoint(folder, model_cfg)
    assert checkpoint_model_config(folder) == model_cfg
    for path in (folder, tmp_path / "run"):  # a checkpoint folder or its run folder
        model, cfg = load_model(path)
        assert cfg == run_cfg and not model.training
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_load_model_refuses_a_config_that_does_not_describe_the_weights(tmp_path):
    folder = tmp_path / "step_00000001"
    write_checkpoint(folder, ModelConfig(**MODEL))
    rewrite_config(folder, ModelConfig(**{**MODEL, "n_heads": 8}))  # same shapes, another function
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    message = str(err.value)
    assert "config.yaml does not describe the weights" in message and "model.n_heads" in message
    assert "\n" not in message


def test_load_model_accepts_other_runtime_settings(tmp_path):
    folder = tmp_path / "step_00000001"
    write_checkpoint(folder, ModelConfig(**MODEL))
    runtime = ModelConfig(**MODEL, activation_checkpointing=True, attn_impl="math", dropout=0.1, init_std=0.05)
    rewrite_config(folder, runtime)
    model, cfg = load_model(folder)
    assert cfg.model == runtime  # config.yaml's runtime settings apply
    assert set(ckpt.RUNTIME_MODEL_FIELDS) >= {"activation_checkpointing", "attn_impl", "dropout"}


def test_load_model_weights_without_metadata(tmp_path):
    folder = tmp_path / "step_00000001"
    _, state = write_checkpoint(folder, ModelConfig(**MODEL), metadata=False)
    assert checkpoint_model_config(folder) is None
    model, cfg = load_model(folder)
    assert cfg.model == ModelConfig(**MODEL)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_load_model_weights_that_do_not_fit(tmp_path):
    folder = tmp_path / "step_00000001"
    write_checkpoint(folder, ModelConfig(**MODEL), metadata=False)
    rewrite_config(folder, ModelConfig(**{**MODEL, "n_layers": 3}))
    with pytest.raises(CheckpointError, match=r"do not fit the model"):
        load_model(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="is not a crate_lm checkpoint"):
        load_model(folder)
