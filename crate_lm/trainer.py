"""The training loop under DeepSpeed: build, resume, train, evaluate, checkpoint, log.

DeepSpeed is the distributed engine (ZeRO 0-3, offload, precision, accumulation, clipping);
this module configures and drives it. Monitoring is a list of small callbacks, not code in the
loop. The run is resumable from any complete checkpoint: model, optimizer, scheduler, the
number of samples consumed (the data order is a function of it), and every rank's RNG.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from crate_lm import checkpoint as ckpt
from crate_lm.config import ConfigError, RunConfig, dump_run_config, to_dict
from crate_lm.data import (
    BlendedStream,
    DataError,
    MLMConfig,
    MLMStream,
    PackedTokenDataset,
    ShuffledStream,
    TokenShards,
    load_tokenizer,
    make_loader,
    read_meta,
)
from crate_lm.hardware import gpu_peak_flops, measure_matmul_flops, tune_cpu_allocator
from crate_lm.model import build_model, flops_per_token, generate, param_count

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def setup_distributed() -> None:
    """Join (or, under plain ``python``, form) the process group: gloo on CPU, nccl on GPU."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:  # a free port for a single-process run
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


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
        # ZeRO-0 fp32 hands whole gradients to GuardedAdamW, which clips (and reports the norm) itself
        "gradient_clipping": 0.0 if _client_clips(cfg) else cfg.optim.grad_clip,
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
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def _client_clips(cfg: RunConfig) -> bool:
    return cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "fp32"


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
    """Weight decay on matrices (projections, dictionaries, embeddings), none on vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warmup to optim.lr, then cosine to optim.min_lr at train.max_steps (as a factor of lr)."""
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    floor = o.min_lr / o.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good weights were saved."""


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0


# ---- callbacks --------------------------------------------------------------------------------


class MetricsFile:
    """Appends every record to ``metrics.jsonl`` in the run folder (rank 0)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "metrics.jsonl"

    def __call__(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")


def json_safe(record: dict) -> dict:
    """Non-finite numbers (a skipped step's loss or norm) are written as null: JSON has no NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


class Wandb:
    def __init__(self, cfg: RunConfig, out_dir: Path) -> None:
        import wandb

        os.environ.setdefault("WANDB_DIR", str(out_dir))
        self.run = wandb.init(
            mode=cfg.logging.wandb,
            project=cfg.logging.project,
            name=cfg.logging.run_name or out_dir.name,
            config=to_dict(cfg),
            dir=str(out_dir),
            resume="allow",
        )

    def __call__(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def plot_loss_curve(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("loss") is not None:
            train.append((record["step"], record["loss"]))
        if "val_loss" in record:
            val.append((record["step"], record["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(".loss_curve.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out_png)


# ---- the trainer --------------------------------------------------------------------------------


class Trainer:
    """Owns the engine, the data streams and the run state. ``fit()`` runs to train.max_steps."""

    def __init__(self, cfg: RunConfig) -> None:
        import deepspeed

        self.cfg = cfg
        setup_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.micro, self.accum, self.global_batch = cfg.batch_plan(self.world)
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if not torch.cuda.is_available():
            if cfg.deepspeed.precision == "fp16":
                raise ConfigError("deepspeed.precision: fp16 is not supported on CPU; use bf16 or fp32")
            tune_cpu_allocator()
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )

        self.seq_len = cfg.data.seq_len or cfg.model.max_seq_len
        self.tokenizer, self.train_stream, self.val_streams = self._build_data()

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
        self.n_params = param_count(cfg.model)
        ds_config = deepspeed_config(cfg, self.world)
        groups = parameter_groups(model, cfg.optim.weight_decay)
        optimizer = None
        if not cfg.deepspeed.offload_optimizer:
            optimizer = GuardedAdamW(
                groups,
                max_grad_norm=cfg.optim.grad_clip if _client_clips(cfg) else 0.0,
                lr=cfg.optim.lr,
                betas=(cfg.optim.beta1, cfg.optim.beta2),
                eps=cfg.optim.eps,
            )

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=groups if optimizer is None else None,
            lr_scheduler=scheduler,
            config=ds_config,
        )
        ckpt.install_safe_loading(self.engine)
        if cfg.train.compile:
            self.engine.compile()
        self.state = TrainState()
        self.flops_per_token = flops_per_token(cfg.model, self.seq_len)
        self.peak_flops = self._peak_flops()
        self._stop_signal = 0
        self._stop_agreed = False
        self.callbacks: list = []
        self.resumed_from: Path | None = None
        self.last_eval: dict = {}

    # ---- data ----
    def _build_data(self):
        cfg = self.cfg
        paths = cfg.data.path
        meta = read_meta(paths[0])
        tok_path = cfg.data.tokenizer or meta["tokenizer"].get("path")
        if tok_path is None:
            raise DataError(f"{paths[0]}: meta.json does not say which tokenizer made it; set data.tokenizer")
        tokenizer = load_tokenizer(tok_path)
        train_streams, val_streams = [], []
        for i, path in enumerate(paths):
            shards = TokenShards(
                path, "train", tokenizer_fingerprint=tokenizer.fingerprint, model_vocab_size=cfg.model.vocab_size
            )
            dataset = PackedTokenDataset(shards, self.seq_len, reset_at_documents=cfg.data.reset_at_documents)
            train_streams.append(ShuffledStream(dataset, seed=cfg.train.seed + i))
            val = TokenShards(path, "validation", tokenizer_fingerprint=tokenizer.fingerprint)
            if val.num_tokens > self.seq_len:
                val_set = PackedTokenDataset(val, self.seq_len, reset_at_documents=cfg.data.reset_at_documents)
                val_streams.append(ShuffledStream(val_set, seed=0))
        stream = train_streams[0]
        if len(train_streams) > 1:
            stream = BlendedStream(train_streams, cfg.data.weights or [1.0] * len(train_streams), seed=cfg.train.seed)
        if cfg.model.task == "masked":
            mlm = MLMConfig(
                mask_id=tokenizer.special_id("mask"),
                vocab_size=tokenizer.vocab_size,
                special_ids=tokenizer.all_special_ids,
                mask_prob=cfg.data.mlm_prob,
            )
            stream = MLMStream(stream, mlm, seed=cfg.train.seed)
            val_streams = [MLMStream(v, mlm, seed=0) for v in val_streams]
        return tokenizer, stream, val_streams

    def _loader(self, stream, consumed: int, num_batches: int | None = None):
        return make_loader(
            stream,
            micro_batch=self.micro,
            rank=self.rank,
            world_size=self.world,
            consumed_samples=consumed,
            num_batches=num_batches,
            num_workers=self.cfg.data.num_workers if num_batches is None else 0,
        )

    def _peak_flops(self) -> float:
        """Peak FLOP/s of all ranks together: vendor figures on GPU, a measured matmul on CPU."""
        if torch.cuda.is_available():
            peak = gpu_peak_flops(torch.cuda.get_device_name())
            return (peak or 0.0) * self.world
        dtype = PRECISION_DTYPES[self.cfg.deepspeed.precision]
        return (
            measure_matmul_flops("cpu", dtype if dtype != torch.float16 else torch.float32, n=1024, reps=5) * self.world
        )

    # ---- checkpoints ----
    def _trainer_state(self) -> dict:
        return {
            **self.state.__dict__,
            "world_size": self.world,
            "global_batch": self.global_batch,
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "seq_len": self.seq_len,
        }

    def save(self) -> Path:
        folder = ckpt.save_checkpoint(
            self.engine, self.ckpt_dir, self.state.step, self._trainer_state(), self.cfg, self.cfg.checkpoint.keep_last
        )
        self._emit({"step": self.state.step, "event": "checkpoint", "path": str(folder)})
        return folder

    def resume(self) -> None:
        choice = self.cfg.checkpoint.resume
        if choice == "never":
            return
        if choice == "auto":
            found = ckpt.complete_checkpoints(self.ckpt_dir)
            if not found:
                return
            folder = found[-1]
        else:
            folder = Path(choice)
            if not (folder / ckpt.COMPLETE).is_file():
                raise ckpt.CheckpointError(f"{folder} is not a complete checkpoint (no {ckpt.COMPLETE} marker)")
        ckpt.check_compatible(folder, self.cfg)
        saved = ckpt.load_trainer_state(folder)
        if saved["tokenizer_fingerprint"] != self.tokenizer.fingerprint:
            raise DataError(
                f"checkpoint {folder} was trained on data of tokenizer {saved['tokenizer_fingerprint']}, "
                f"but this run's data uses {self.tokenizer.fingerprint}; point data.path at data of the same tokenizer"
            )
        if saved["global_batch"] != self.global_batch or saved["seq_len"] != self.seq_len:
            raise ConfigError(
                f"checkpoint {folder} used global batch {saved['global_batch']} x seq {saved['seq_len']}; "
                f"this run has {self.global_batch} x {self.seq_len}: keep them equal to continue the same sample order"
            )
        same_world = saved["world_size"] == self.world
        stage = self.cfg.deepspeed.zero_stage
        if not same_world and stage == 3:
            raise ckpt.CheckpointError(
                f"checkpoint {folder} was saved by {saved['world_size']} ranks; DeepSpeed cannot re-partition "
                f"ZeRO-3 optimizer state for {self.world} ranks. Resume with {saved['world_size']} ranks"
            )
        if not same_world and stage in (1, 2):
            ckpt.load_zero12_resharded(self.engine, folder)
        else:
            load_path, _ = self.engine.load_checkpoint(
                str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if load_path is None:
                raise ckpt.CheckpointError(f"DeepSpeed could not load {folder}")
        for key in TrainState.__dataclass_fields__:
            setattr(self.state, key, saved[key])
        rng = ckpt.load_rng(folder, self.rank) if same_world else None
        if rng is not None:
            ckpt.restore_rng(rng)
        else:  # a new world size: each rank's RNG restarts from (seed, step, rank)
            torch.manual_seed(self.cfg.train.seed + 1000003 * self.state.step + self.rank)
        self.resumed_from = folder
        self._emit({"step": self.state.step, "event": "resumed", "path": str(folder), "world_size": self.world})

    # ---- logging ----
    def _emit(self, record: dict) -> None:
        if self.rank == 0:
            for callback in self.callbacks:
                callback(record)

    def _setup_logging(self) -> None:
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(dump_run_config(self.cfg))
        self.callbacks.append(MetricsFile(self.out_dir))
        if self.cfg.logging.wandb != "disabled":
            self.callbacks.append(Wandb(self.cfg, self.out_dir))

    # ---- signals ----
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    # ---- steps ----
    def _forward(self, batch: dict):
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return self.engine(inputs.pop("input_ids"), inputs.pop("labels"), **inputs)

    def train_step(self, batches) -> dict:
        self.engine.train()
        losses = []
        for batch in batches:
            loss = self._forward(batch).loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        # one collective per step: the mean loss and whether any rank was asked to stop (SIGTERM/SIGUSR1)
        stats = torch.stack([torch.stack(losses).mean(), torch.tensor(float(self._stop_signal), device=self.device)])
        dist.all_reduce(stats)
        mean, stop = stats.tolist()
        mean /= self.world
        self._stop_agreed = stop > 0
        applied = self.engine.was_step_applied() and math.isfinite(mean)
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return {"loss": mean, "applied": applied, "grad_norm": norm}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over the held-out split (and masked-token accuracy for MLM), across ranks."""
        if not self.val_streams:
            return {}
        self.engine.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # sum of losses, tokens, correct
        for stream in self.val_streams:
            for batch in self._loader(stream, 0, num_batches=self.cfg.train.eval_batches):
                out = self._forward(batch)
                labels = batch["labels"].to(self.device)
                scored = labels != -100
                totals[0] += out.loss.double() * scored.sum()  # accumulated on the device: no sync per batch
                totals[1] += scored.sum()
                if self.cfg.model.task == "masked":
                    totals[2] += ((out.logits.argmax(-1) == labels) & scored).sum()
        dist.all_reduce(totals)
        loss = (totals[0] / totals[1]).item()
        record = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}
        if self.cfg.model.task == "masked":
            record["val_mlm_accuracy"] = (totals[2] / totals[1]).item()
        return record

    def sample_text(self) -> str | None:
        if self.cfg.model.task != "causal":
            return None
        self.engine.eval()
        prompt = self.tokenizer.encode(self.cfg.train.sample_prompt) or [self.tokenizer.eod_id]
        ids = torch.tensor([prompt], device=self.device)
        new = max(0, min(self.cfg.train.sample_tokens, self.cfg.model.max_seq_len - len(prompt)))
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.deepspeed.precision == "bf16"):
            out = generate(self.engine.module, ids, new, temperature=0.8, top_k=50, generator=gen)
        return self.tokenizer.decode(out[0].tolist())

    def fit(self) -> TrainState:
        from tqdm import tqdm

        cfg = self.cfg
        self._setup_logging()
        self.resume()
        self._install_signal_handlers()
        if self.rank == 0:
            print(
                f"train: {cfg.model.arch} {cfg.model.task} ({self.n_params / 1e6:.2f}M params), world {self.world}, "
                f"global batch {self.global_batch} = {self.micro} x {self.accum} x {self.world}, seq {self.seq_len}, "
                f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}"
                + (f"; resumed from {self.resumed_from} at step {self.state.step}" if self.resumed_from else ""),
                flush=True,
            )
        loader = iter(self._loader(self.train_stream, self.state.consumed_samples))
        bar = tqdm(
            total=cfg.train.max_steps, initial=self.state.step, desc="train", unit="step", disable=self.rank != 0
        )
        window = {"loss": 0.0, "n": 0, "tokens": 0, "start": time.perf_counter()}
        stopped_by = None
        try:
            while self.state.step < cfg.train.max_steps:
                batches = [next(loader) for _ in range(self.accum)]
                result = self.train_step(batches)
                self.state.step += 1
                self.state.consumed_samples += self.global_batch
                tokens = self.global_batch * self.seq_len
                self.state.tokens_seen += tokens
                window["tokens"] += tokens
                if result["applied"]:
                    self.state.bad_steps = 0
                    window["loss"] += result["loss"]
                    window["n"] += 1
                else:
                    self.state.bad_steps += 1
                    self._emit(
                        {
                            "step": self.state.step,
                            "event": "skipped_nonfinite",
                            "loss": result["loss"],
                            "grad_norm": result["grad_norm"],
                        }
                    )
                    if self.rank == 0:
                        tqdm.write(f"step {self.state.step}: non-finite loss or gradient norm; update skipped")
                    if self.state.bad_steps >= cfg.train.max_bad_steps:
                        # skipped updates left the weights as they were: this checkpoint is the last good state
                        folder = self.save()
                        raise TrainingDiverged(
                            f"{self.state.bad_steps} non-finite steps in a row at step {self.state.step}; "
                            f"stopped with the last good weights saved in {folder}. Lower optim.lr or check the data"
                        )
                bar.update(1)
                if result["applied"]:
                    bar.set_postfix(loss=f"{result['loss']:.3f}")
                if self.state.step % cfg.train.log_interval == 0 or self.state.step == cfg.train.max_steps:
                    self._log_interval(window, result)
                    window = {"loss": 0.0, "n": 0, "tokens": 0, "start": time.perf_counter()}
                if cfg.train.eval_interval and self.state.step % cfg.train.eval_interval == 0:
                    self.last_eval = self.evaluate()
                    self._emit({"step": self.state.step, **self.last_eval})
                if self.state.step % cfg.checkpoint.interval == 0 and self.state.step < cfg.train.max_steps:
                    self.save()
                if self._stop_agreed:
                    stopped_by = self._stop_signal or "a signal on another rank"
                    break
        finally:
            bar.close()
        self.save()
        if stopped_by:
            if self.rank == 0:
                print(
                    f"train: stopped by signal {stopped_by} at step {self.state.step}; checkpoint saved, rerun to resume"
                )
            return self.state
        evaluated = cfg.train.eval_interval and self.state.step % cfg.train.eval_interval == 0
        final = self.last_eval if evaluated else self.evaluate()
        if not evaluated:
            self._emit({"step": self.state.step, **final})
        text = self.sample_text()
        if self.rank == 0:
            plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss_curve.png")
            if text is not None:
                print("sample:\n" + text.strip()[:2000])
            summary = f"train: done {self.state.step} steps, {self.state.tokens_seen:,} tokens"
            if final:
                summary += f", validation loss {final['val_loss']:.3f} (ppl {final['val_ppl']:.1f})"
            print(summary + f"; run folder {self.out_dir}", flush=True)
        return self.state

    def _log_interval(self, window: dict, result: dict) -> None:
        elapsed = time.perf_counter() - window["start"]
        tokens_per_s = window["tokens"] / max(elapsed, 1e-9)
        record = {
            "step": self.state.step,
            "loss": window["loss"] / window["n"] if window["n"] else None,  # every step of the window was skipped
            "lr": self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.cfg.optim.lr,
            "grad_norm": result["grad_norm"],
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops if self.peak_flops else None,
            "memory_gb": memory_gb(),
            "tokens_seen": self.state.tokens_seen,
        }
        self._emit(record)

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def run(cfg: RunConfig) -> TrainState:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    """``pretrain.py --config FILE [--section.key VALUE ...]``; bad input is a one-line error."""
    import argparse

    from crate_lm.config import load_run_config

    parser = argparse.ArgumentParser(description="Pretrain a CRATE (or GPT baseline) language model under DeepSpeed.")
    parser.add_argument("--config", help="run YAML (see configs/); default: built-in defaults")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_run_config(args.config, overrides)
        run(cfg)
    except (ConfigError, DataError, ckpt.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0
