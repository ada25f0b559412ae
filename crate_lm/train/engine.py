"""Building the DeepSpeed engine: process group, derived DeepSpeed JSON, optimizer, engine.

``build_engine`` is the one way a model becomes a training engine, used by the trainer and
by ``tools/bench_train.py``. The learning rate is not a scheduler's state: the trainer writes
it before each step (``crate_lm.train.schedule``), and ``apply_optim_settings`` writes the
other ``optim.*`` values over whatever a resumed optimizer state carried.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from crate_lm.checkpoint import install_safe_loading
from crate_lm.config import ConfigError, OptimConfig, RunConfig

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def setup_distributed() -> None:
    """Join the process group the launcher describes (``crate_lm.train.launch``; plain ``python``
    is a world of one): gloo on CPU, nccl on GPU. Collectives time out after
    ``CRATE_LM_DIST_TIMEOUT`` seconds (default 1800), so a dead rank ends the job instead of hanging it."""
    import datetime

    import deepspeed

    from crate_lm.train.launch import LaunchError, launch_environment

    values, note = launch_environment(os.environ)
    if not values["MASTER_PORT"]:
        import socket

        with socket.socket() as s:  # a free port for a single-process run
            s.bind(("127.0.0.1", 0))
            values["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.update(values)
    if note and values["RANK"] == "0":
        print(note, flush=True)
    try:
        timeout = datetime.timedelta(seconds=float(os.environ.get("CRATE_LM_DIST_TIMEOUT", "1800")))
    except ValueError:
        raise LaunchError(
            f"CRATE_LM_DIST_TIMEOUT={os.environ['CRATE_LM_DIST_TIMEOUT']!r} is not a number of seconds"
        ) from None
    if torch.cuda.is_available():
        local, count = int(values["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= count and count != 1:
            raise LaunchError(
                f"local rank {local} but only {count} GPUs are visible on this node; start one process per GPU"
            )
        torch.cuda.set_device(local if count > 1 else 0)  # one visible GPU: the launcher chose it for this task
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False, timeout=timeout
        )


def client_clips(cfg: RunConfig) -> bool:
    """ZeRO-0 fp32 hands whole gradients to GuardedAdamW, which clips (and reports the norm) itself."""
    return cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "fp32"


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed JSON derived from the run config (``deepspeed.config`` merged over it)."""
    micro, accum, total = cfg.batch_plan(world_size)
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": total,
        "gradient_clipping": 0.0 if client_clips(cfg) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": cfg.optim.lr, "betas": [cfg.optim.beta1, cfg.optim.beta2], "eps": cfg.optim.eps},
        }
    for key, value in ds.config.items():
        if (
            key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
            and value != config[key]
        ):
            raise ConfigError(
                f"deepspeed.config.{key}={value} contradicts the batch sizes derived from train.* ({config[key]}); "
                "set batch sizes in the train section only"
            )
        config[key] = merged(config.get(key), value)
    return config


def merged(base, override):
    """``override`` over ``base``, mappings merged key by key at every depth."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merged(base.get(k), v) for k, v in override.items()}}
    return override


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that refuses a step whose gradients are not finite and says so through the
    ``overflow`` flag DeepSpeed reads (ZeRO's and the bf16 optimizers do the same themselves).

    Where DeepSpeed hands it whole gradients (ZeRO-0, fp32) it also clips them to
    ``max_grad_norm`` and reports the pre-clip norm as ``_global_grad_norm``. It mirrors its
    step count into every param group (torch ignores it there), which is where ZeRO's elastic
    checkpoints look for it when a run resumes with another number of ranks.
    """

    overflow = False

    def __init__(self, params, *, max_grad_norm: float = 0.0, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self._global_grad_norm = None
        for group in self.param_groups:
            group.setdefault("step", 0)

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        self._global_grad_norm = norm.item()
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        if self.max_grad_norm > 0 and self._global_grad_norm > self.max_grad_norm:
            torch._foreach_mul_(grads, self.max_grad_norm / (self._global_grad_norm + 1e-6))
        out = super().step(closure)
        for group in self.param_groups:
            group["step"] += 1
        return out


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, dictionaries, embeddings), none on vectors: groups [decay, none]."""
    def ndim(p: torch.nn.Parameter) -> int:  # a parameter partitioned by zero.Init is empty; ds_shape is its own
        return len(getattr(p, "ds_shape", p.shape))

    decay = [p for p in model.parameters() if p.requires_grad and ndim(p) >= 2]
    other = [p for p in model.parameters() if p.requires_grad and ndim(p) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def apply_optim_settings(optimizer, optim: OptimConfig) -> None:
    """Write betas, eps and weight decay of ``optim`` into the param groups (a loaded optimizer
    state brings the values it was saved with; the run's config is what applies)."""
    for i, group in enumerate(optimizer.param_groups):
        group["betas"] = (optim.beta1, optim.beta2)
        group["eps"] = optim.eps
        group["weight_decay"] = optim.weight_decay if i == 0 else 0.0


def construct_model(cfg: RunConfig, world_size: int) -> torch.nn.Module:
    """The model of ``cfg``, as training starts it (call after seeding, on every rank).

    ZeRO-3 with ``deepspeed.zero_init`` builds it inside ``deepspeed.zero.Init``: each module's parameters are partitioned
    as soon as the module is constructed, so no rank ever holds the whole model (a rank keeps
    about 1/world of the parameter bytes). The model's ``init_weights`` ran on the partitioned
    (empty) tensors there, so it is repeated module by module on gathered parameters, in the
    same order and from the same RNG stream as a whole build: in fp32 the weights are
    bit-identical to ``build_model`` with the same seed (tests/test_export.py). In bf16,
    zero.Init creates the parameters in bf16, so the init draws happen in bf16 (close to, not
    bit-identical with, a whole build cast to bf16). Otherwise the model is built whole."""
    from crate_lm.model import build_model

    if cfg.deepspeed.zero_stage != 3 or not cfg.deepspeed.zero_init:
        return build_model(cfg.model)
    import deepspeed

    with deepspeed.zero.Init(
        config_dict_or_path=deepspeed_config(cfg, world_size),
        remote_device="cpu" if cfg.deepspeed.offload_params else None,
    ):
        model = build_model(cfg.model)
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
            with torch.no_grad():
                model.init_module(module)
    return model


def build_engine(cfg: RunConfig, model: torch.nn.Module, world_size: int):
    """``deepspeed.initialize`` with the derived config and the project's optimizer; returns the engine.

    The optimizer is GuardedAdamW on ``parameter_groups`` (DeepSpeedCPUAdam with optimizer
    offload); checkpoint files are read weights-only; ``train.compile`` compiles the module.
    """
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size)
    groups = parameter_groups(model, cfg.optim.weight_decay)
    optimizer = None
    if not cfg.deepspeed.offload_optimizer:
        optimizer = GuardedAdamW(
            groups,
            max_grad_norm=cfg.optim.grad_clip if client_clips(cfg) else 0.0,
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        config=ds_config,
    )
    install_safe_loading(engine)
    if cfg.train.compile:
        engine.compile()
    return engine
