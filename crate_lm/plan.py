"""Memory planner: per-GPU memory of a training run before it is launched (``crate-lm plan``).

Everything is computed from the model config (``ModelConfig.from_preset``) and the parallel
setup, in bytes per GPU, reported in GiB (2**30 bytes):

* **Model states** (P parameters, N data-parallel GPUs, L the largest module's own parameters),
  as DeepSpeed ZeRO holds them under bf16/fp16 mixed precision: 16-bit parameters (2P) and
  gradients (2P), and for the optimizer an fp32 gradient partition (4P), fp32 master weights
  (4P) and AdamW's two moments (8P). Stage 0 (DeepSpeed's BF16_Optimizer) keeps full 16-bit
  and fp32 gradients and partitions master weights and moments; stage 1 partitions the fp32
  state; stage 2 also the gradients; stage 3 also the parameters, reduce-scatters the 16-bit
  gradients straight into the fp32 partition (no 16-bit gradient partition is kept), and holds
  the gathered largest module (16-bit parameters and gradients, 4L). ``offload optimizer`` moves the fp32 gradient
  partition, master weights and moments to the CPU; ``offload params`` moves the parameters
  too (and the optimizer: DeepSpeed's estimator makes the same pairing). Under ZeRO-2/3 these
  are exactly DeepSpeed's own ``estimate_zero2/3_model_states_mem_needs`` (2P + 18P/N;
  4L + 18P/N; offloaded: 2P; 4L + 2P/N; 4L); the ZeRO-2 estimator, asked about stage 1,
  is 2P - 2P/N below ours (it partitions the 16-bit gradients, which stage 1 does not).
  ``precision fp32``: 4-byte parameters and gradients, the moments (8P), no master copy.
* **Activations** (``activation_bytes``): the tensors autograd saves for the backward pass,
  counted operator by operator from ``crate.py`` / ``gpt.py`` (N = micro batch x sequence
  tokens, a = bytes per activation, LayerNorm statistics and the attention log-sum-exp in fp32):

  - CRATE MSSA (q = k = v: one projection): LN input, LN output, q, attention output: 4 N d a;
    log-sum-exp N K 4; LN mean and rstd 2 N 4. SDPA (flash / memory-efficient kernels, and
    the CPU flash kernel) never stores the T x T pattern; ``attn_impl: math`` would (counted
    then: scores and probabilities, 2 B K T^2 a, ``_attention_pattern_bytes``).
  - ISTA with S steps and m atoms: LN input and output 2 N d a, each step's code (ReLU output)
    N m a, each later step's residual Y - A D^T N d a (``crate``: every step's, less the last
    code, which is the block's output and counted as the next block's input), the
    scaled dictionary eta D (d m a), LN statistics 2 N 4.
  - GPT baseline: LN input and output, q k v (3 N d), attention output, LN input and output
    of the MLP: 8 N d a; MLP hidden before and after GELU 2 N h a; log-sum-exp and statistics.
  - Head: token and position ids (8 bytes each), final LN input and output 2 N d a, the fp32
    log-softmax N V 4, targets. With activation checkpointing only each block's input
    (N d a per layer) is kept, and one block is recomputed at a time.
  - Peak = saved + the transients of the loss (the logits the caller holds, N V a, and two
    fp32 N x V gradient buffers in its backward) + under checkpointing one block's saved
    tensors during its recomputation.

  The saved-tensor part is checked against a measurement (``measure_saved_bytes``: every
  tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` during a real forward, by
  storage, parameters excluded, plus what the checkpoint keeps) in ``tools/bench_plan.py`` and
  the tests. Dropout is assumed 0 (the presets' value); a dropout mask would add N d bytes per
  dropout site.
* **Buffers**: DeepSpeed's communication buckets at their defaults (16-bit elements): the
  gradient reduce bucket (``reduce_bucket_size`` 5e8) at every stage, the all-gather bucket
  (``allgather_bucket_size`` 5e8) at stages 1-2, the ZeRO-3 prefetch bucket
  (``stage3_prefetch_bucket_size`` 5e7) of gathered parameters beyond the current module
  (bounded by ``stage3_max_live_parameters`` 1e9), each capped at the model's size; and a fixed
  1 GiB for the CUDA context, cuBLAS workspace and NCCL.

Not counted: allocator fragmentation (keep ~10% headroom), the CPU side of offloading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from crate_lm.config import ModelConfig
from crate_lm.errors import CrateLMError

GIB = 2**30
OVERHEAD_BYTES = GIB  # CUDA context, cuBLAS workspace, NCCL
REDUCE_BUCKET = int(5e8)  # DeepSpeed defaults (elements)
ALLGATHER_BUCKET = int(5e8)
PREFETCH_BUCKET = int(5e7)
MAX_LIVE_PARAMETERS = int(1e9)
OFFLOADS = (None, "optimizer", "params")
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class PlanError(CrateLMError):
    """A planner argument that cannot describe a run."""


def largest_module_params(cfg: ModelConfig) -> int:
    """The largest number of parameters any one module holds itself (not in its children):
    what DeepSpeed's ZeRO-3 estimator calls the largest layer (``model_to_params``)."""
    d, v, t, m = cfg.d_model, cfg.vocab_size, cfg.max_seq_len, cfg.dict_width
    sizes = [v * d, t * d, 2 * d]
    if cfg.arch == "gpt":
        h = cfg.mlp_mult * d
        sizes += [3 * d * d + 3 * d, d * d + d, d * h + h, h * d + d]
    else:
        sizes += [d * d, d * d + d, d * m * (2 if cfg.ista == "alpha" else 1)]
    if cfg.task == "masked":
        sizes += [d * d + d, v]
    return max(sizes)


# ---- model states ------------------------------------------------------------------------------


def model_state_bytes(
    params: int, largest: int, zero_stage: int, gpus: int, precision: str = "bf16", offload: str | None = None
) -> dict[str, int]:
    """Bytes per GPU of parameters, gradients and optimizer state (see the module docstring)."""
    p, n = params, gpus
    if precision == "fp32":
        w, g, opt, fp32_grad = 4, 4, 8, 0  # no master copy; the moments
    else:
        w, g, opt, fp32_grad = 2, 2, 12, 4  # 16-bit weights and grads; master + moments; fp32 grad partition
    on_cpu_opt = offload in ("optimizer", "params")
    if zero_stage == 0:
        states = {"params": w * p, "gradients": g * p + fp32_grad * p, "optimizer": opt * p // n}
    elif zero_stage == 1:
        states = {"params": w * p, "gradients": g * p + fp32_grad * p // n, "optimizer": opt * p // n}
    elif zero_stage == 2:
        states = {"params": w * p, "gradients": (g + fp32_grad) * p // n, "optimizer": opt * p // n}
        if on_cpu_opt:
            states["gradients"] = states["optimizer"] = 0
    else:
        gathered = (w + g) * largest  # the module being computed: its full parameters and gradients
        # the 16-bit gradients are reduce-scattered straight into the partition's fp32 (or, in fp32, own) buffer
        states = {"params": w * p // n + gathered, "gradients": (fp32_grad or g) * p // n, "optimizer": opt * p // n}
        if on_cpu_opt:
            states["gradients"] = states["optimizer"] = 0
        if offload == "params":
            states["params"] = gathered
    return states


def deepspeed_estimate(
    params: int, largest: int, zero_stage: int, gpus: int, gpus_per_node: int = 8, offload: str | None = None
) -> dict[str, Any] | None:
    """DeepSpeed's own model-state estimate (``estimate_zero2_model_states_mem_needs`` for stages
    1-2, ``estimate_zero3_model_states_mem_needs`` for stage 3, zero_init, buffer factor 1.5):
    ``{"gpu_bytes", "cpu_bytes_per_node", "function"}``; None for stage 0 (it has none) or where
    deepspeed is not installed."""
    if zero_stage == 0:
        return None
    import contextlib
    import io

    per_node = min(gpus, gpus_per_node)
    nodes = math.ceil(gpus / per_node)
    # deepspeed logs its accelerator choice on stdout on import, which would break --json
    with contextlib.redirect_stdout(io.StringIO()):
        return _deepspeed_estimate(params, largest, zero_stage, per_node, nodes, offload)


def _deepspeed_estimate(
    params: int, largest: int, zero_stage: int, per_node: int, nodes: int, offload: str | None
) -> dict[str, Any] | None:
    try:
        if zero_stage in (1, 2):
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as fn

            cpu, gpu = fn(params, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=offload is not None)
        else:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as fn

            cpu, gpu, _ = fn(params, largest, num_gpus_per_node=per_node, num_nodes=nodes,
                             cpu_offload=offload is not None, cpu_offload_params=offload == "params")  # fmt: skip
    except ImportError:
        return None
    return {"gpu_bytes": int(gpu), "cpu_bytes_per_node": int(cpu), "function": fn.__name__}


def buffer_bytes(params: int, zero_stage: int, precision: str = "bf16") -> dict[str, int]:
    """DeepSpeed's communication buckets at their defaults, and the fixed framework overhead."""
    e = 2 if precision != "fp32" else 4
    out = {"reduce_bucket": e * min(REDUCE_BUCKET, params)}
    if zero_stage in (1, 2):
        out["allgather_bucket"] = e * min(ALLGATHER_BUCKET, params)
    if zero_stage == 3:
        out["prefetch_bucket"] = e * min(PREFETCH_BUCKET, MAX_LIVE_PARAMETERS, params)
    out["cuda_context_nccl"] = OVERHEAD_BYTES
    return out


# ---- activations --------------------------------------------------------------------------------


def _block_saved(cfg: ModelConfig, n: int, a: int, st: int) -> int:
    """Bytes one block saves for backward over n tokens (a: activation bytes, st: LN statistics)."""
    d, k, m, s = cfg.d_model, cfg.n_heads, cfg.dict_width, cfg.n_ista_steps
    lse = n * k * 4
    if cfg.arch == "gpt":
        h = cfg.mlp_mult * d
        return (8 * n * d + 2 * n * h) * a + lse + 4 * n * st
    mssa = 4 * n * d * a + lse + 2 * n * st
    later = s - 1  # residuals Y - A D^T ('crate': s of them, but its last code is the block's output,
    # counted as the next block's LN input)
    ista = (2 * n * d + s * n * m + later * n * d + d * m) * a + 2 * n * st
    return mssa + ista


def _attention_pattern_bytes(cfg: ModelConfig, batch: int, seq: int, a: int) -> int:
    """What ``attn_impl: math`` adds per block: the scores and the probabilities (B K T^2)."""
    return 2 * batch * cfg.n_heads * seq * seq * a if cfg.attn_impl == "math" else 0


def activation_bytes(
    cfg: ModelConfig,
    batch: int,
    seq: int,
    *,
    act_bytes: int = 2,
    checkpointing: bool | None = None,
    stats_bytes: int = 4,
) -> dict[str, int]:
    """Activation memory of one micro batch: ``saved`` (held for backward after the forward; what
    ``measure_saved_bytes`` measures) and ``peak`` (saved plus the transients of the loss and,
    under checkpointing, one recomputed block). ``stats_bytes``: LayerNorm mean/rstd (fp32 on
    GPU; the activation dtype on CPU)."""
    ckpt = cfg.activation_checkpointing if checkpointing is None else checkpointing
    n, d, v, a = batch * seq, cfg.d_model, cfg.vocab_size, act_bytes
    block = _block_saved(cfg, n, a, stats_bytes) + _attention_pattern_bytes(cfg, batch, seq, a)
    head = 8 * n + 8 * seq + 2 * n * d * a + 2 * n * stats_bytes + 4 * n * v + 8 * n + 4
    if cfg.task == "masked":  # dense input, GELU input, LN input and output of the MLM head
        head += 4 * n * d * a + 2 * n * stats_bytes
    blocks = cfg.n_layers * (n * d * a if ckpt else block)
    saved = blocks + head
    transient = n * v * a + 2 * n * v * 4 + (block if ckpt else 0)
    return {"saved": saved, "peak": saved + transient, "per_block": block, "head": head}


def measure_saved_bytes(cfg: ModelConfig, batch: int, seq: int, dtype: Any = None, seed: int = 0) -> int:
    """Measured activation memory of a real forward (training mode, with the loss): the bytes of
    every distinct storage autograd saves for backward (``saved_tensors_hooks``), parameters
    excluded, plus, under activation checkpointing, the block inputs the checkpoint keeps."""
    import torch

    from crate_lm.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg).to(dtype or torch.float32).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    recording = [True]

    def note(t: Any) -> None:
        if recording[0] and isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen.setdefault(storage.data_ptr(), storage.nbytes())

    def pack(t: Any) -> Any:
        note(t)
        return t

    handles = [b.register_forward_pre_hook(lambda _m, args: note(args[0])) for b in model.blocks] if (
        cfg.activation_checkpointing) else []  # fmt: skip
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    inputs, labels = ids[:, :-1].clone(), ids[:, 1:].clone()  # own storages, as a data loader gives them
    if cfg.task == "masked":
        labels = inputs.clone()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(inputs, labels=labels)
    recording[0] = False
    total = sum(seen.values())
    out.loss.backward()
    for h in handles:
        h.remove()
    return total


# ---- the plan -------------------------------------------------------------------------------------


@dataclass
class PlanRequest:
    preset: str = "7b"
    zero_stage: int = 3
    gpus: int = 64
    micro_batch: int = 1
    seq_len: int | None = None
    activation_checkpointing: bool = False
    offload: str | None = None
    arch: str = "crate"
    ista: str = "alpha"
    precision: str = "bf16"
    gpu_memory: float = 80.0
    gpus_per_node: int = 8

    def check(self) -> None:
        ints = {"zero_stage": self.zero_stage, "gpus": self.gpus, "micro_batch": self.micro_batch,
                "gpus_per_node": self.gpus_per_node}  # fmt: skip
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise PlanError(f"--{name} must be a whole number, got {value!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise PlanError(f"--zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        for name in ("gpus", "micro_batch", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise PlanError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len is not None and (isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int)
                                         or self.seq_len < 1):  # fmt: skip
            raise PlanError(f"--seq_len must be a whole number >= 1, got {self.seq_len!r}")
        if self.offload not in OFFLOADS:
            raise PlanError(f"--offload must be optimizer or params, got {self.offload!r}")
        if self.offload == "optimizer" and self.zero_stage < 2:
            raise PlanError("--offload optimizer needs --zero_stage 2 or 3 (as deepspeed.offload_optimizer)")
        if self.offload == "params" and self.zero_stage != 3:
            raise PlanError("--offload params needs --zero_stage 3 (as deepspeed.offload_params)")
        if self.precision not in PRECISION_BYTES:
            raise PlanError(f"--precision must be one of {', '.join(PRECISION_BYTES)}, got {self.precision!r}")
        if isinstance(self.gpu_memory, bool) or not isinstance(self.gpu_memory, (int, float)) or self.gpu_memory <= 0:
            raise PlanError(f"--gpu_memory must be a number of GiB > 0, got {self.gpu_memory!r}")


def _config(req: PlanRequest) -> ModelConfig:
    from crate_lm.config import ConfigError

    try:
        cfg = ModelConfig.from_preset(str(req.preset), arch=req.arch, ista=req.ista,
                                      activation_checkpointing=bool(req.activation_checkpointing))  # fmt: skip
    except ConfigError as err:
        raise PlanError(str(err)) from None
    seq = req.seq_len or cfg.max_seq_len
    if seq > cfg.max_seq_len:
        cfg = ModelConfig.from_preset(str(req.preset), arch=req.arch, ista=req.ista, max_seq_len=seq,
                                      activation_checkpointing=bool(req.activation_checkpointing))  # fmt: skip
    return cfg


def plan(req: PlanRequest) -> dict[str, Any]:
    """The per-GPU memory plan of ``req`` (bytes and GiB), DeepSpeed's estimate beside it,
    whether it fits ``gpu_memory`` GiB, and the largest micro batch that fits."""
    from crate_lm.model import param_count

    req.check()
    cfg = _config(req)
    seq = req.seq_len or cfg.max_seq_len
    p, largest = param_count(cfg), largest_module_params(cfg)
    a = PRECISION_BYTES[req.precision]
    states = model_state_bytes(p, largest, req.zero_stage, req.gpus, req.precision, req.offload)
    buffers = buffer_bytes(p, req.zero_stage, req.precision)
    fixed = sum(states.values()) + sum(buffers.values())
    limit = req.gpu_memory * GIB

    def acts(b: int) -> dict[str, int]:
        return activation_bytes(cfg, b, seq, act_bytes=a)

    act = acts(req.micro_batch)
    total = fixed + act["peak"]
    best, b = 0, 1
    while fixed + acts(b)["peak"] <= limit and b <= 1 << 20:
        best, b = b, b * 2
    lo, hi = best, b  # best fits, hi does not (or the search bound)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fixed + acts(mid)["peak"] <= limit else (lo, mid)
    ds = deepspeed_estimate(p, largest, req.zero_stage, req.gpus, req.gpus_per_node, req.offload)
    gib = lambda x: round(x / GIB, 3)  # noqa: E731
    return {
        "model": {"preset": req.preset, "arch": cfg.arch, "ista": cfg.ista if cfg.arch == "crate" else None,
                  "params": p, "largest_module_params": largest, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                  "n_heads": cfg.n_heads, "vocab_size": cfg.vocab_size},  # fmt: skip
        "setup": {"zero_stage": req.zero_stage, "gpus": req.gpus, "gpus_per_node": req.gpus_per_node,
                  "micro_batch": req.micro_batch, "seq_len": seq, "precision": req.precision,
                  "activation_checkpointing": bool(req.activation_checkpointing), "offload": req.offload,
                  "gpu_memory_gib": req.gpu_memory},  # fmt: skip
        "per_gpu_gib": {
            **{k: gib(v) for k, v in states.items()},
            "model_states": gib(sum(states.values())),
            "activations": gib(act["peak"]),
            "activations_saved": gib(act["saved"]),
            "buffers": gib(sum(buffers.values())),
            "total": gib(total),
        },
        "buffers_gib": {k: gib(v) for k, v in buffers.items()},
        "deepspeed_model_states_gib": None if ds is None else gib(ds["gpu_bytes"]),
        "deepspeed_cpu_per_node_gib": None if ds is None else gib(ds["cpu_bytes_per_node"]),
        "deepspeed_function": None if ds is None else ds["function"],
        "fits": total <= limit,
        "max_micro_batch": lo,
    }


def format_plan(result: dict[str, Any]) -> str:
    """The plan as a readable table."""
    m, s, g = result["model"], result["setup"], result["per_gpu_gib"]
    offload = s["offload"] or "none"
    name = f"{m['preset']} {m['arch']}" + (f" ({m['ista']})" if m["ista"] else "")
    lines = [
        f"plan: {name}, {m['params'] / 1e9:.2f}B params (largest module {m['largest_module_params'] / 1e6:.1f}M), "
        f"ZeRO-{s['zero_stage']} on {s['gpus']} GPUs, micro batch {s['micro_batch']} x {s['seq_len']} tokens, "
        f"{s['precision']}, activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}, "
        f"offload {offload}",
        "per GPU (GiB):",
        f"  parameters     {g['params']:10.2f}",
        f"  gradients      {g['gradients']:10.2f}",
        f"  optimizer      {g['optimizer']:10.2f}",
        f"  model states   {g['model_states']:10.2f}"
        + (f"   (DeepSpeed's estimator: {result['deepspeed_model_states_gib']:.2f})"
           if result["deepspeed_model_states_gib"] is not None else "   (DeepSpeed has no stage-0 estimator)"),
        f"  activations    {g['activations']:10.2f}   (saved for backward {g['activations_saved']:.2f})",
        f"  buffers        {g['buffers']:10.2f}   ("
        + ", ".join(f"{k} {v:.2f}" for k, v in result["buffers_gib"].items()) + ")",
        f"  total          {g['total']:10.2f}   of {s['gpu_memory_gib']:g}: "
        + ("fits" if result["fits"] else "does NOT fit"),
        f"largest micro batch that fits: {result['max_micro_batch']}",
    ]  # fmt: skip
    return "\n".join(lines)


__all__ = [
    "PlanError",
    "PlanRequest",
    "activation_bytes",
    "buffer_bytes",
    "deepspeed_estimate",
    "format_plan",
    "largest_module_params",
    "measure_saved_bytes",
    "model_state_bytes",
    "plan",
]
