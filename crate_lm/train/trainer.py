"""The training loop under DeepSpeed; everything around it is a component.

``Trainer.__init__`` validates the whole run (config, data, the checkpoint to resume and
whether this config can continue it) before it writes anything into the run folder, then
builds the engine and resumes. ``fit`` is the loop: step, account, log, evaluate, save, stop.
Checkpoint policy is the :class:`Checkpointer`'s, monitoring the callbacks', divergence the
:class:`HealthMonitor`'s, stop signals the :class:`StopRequest`'s.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from crate_lm.config import ConfigError, RunConfig, dump_run_config
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
from crate_lm.errors import CrateLMError
from crate_lm.fsutil import atomic_write_bytes
from crate_lm.hardware import gpu_peak_flops, measure_matmul_flops, tune_cpu_allocator
from crate_lm.model import flops_per_token, generate, param_count
from crate_lm.train.callbacks import Callback, LossCurve, LossWindow, MetricsFile, ProgressBar, SpeedMonitor, Wandb
from crate_lm.train.checkpointer import Checkpointer, changed_settings
from crate_lm.train.engine import (
    PRECISION_DTYPES,
    apply_optim_settings,
    build_engine,
    construct_model,
    setup_distributed,
)
from crate_lm.train.health import HealthMonitor
from crate_lm.train.schedule import learning_rate, resolve_schedule, set_learning_rate
from crate_lm.train.signals import StopRequest


class TrainingDiverged(CrateLMError):
    """The run stopped on repeated non-finite steps or loss spikes; the message names the newest
    sound checkpoint."""

    exit_code = 3


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    tokens_seen: int = 0


@dataclass
class StepResult:
    loss: float
    applied: bool
    grad_norm: float
    lr: float
    tokens: int
    seconds: float = 0.0


def build_data(cfg: RunConfig, seq_len: int):
    """(tokenizer, training stream, validation streams) of the run's prepared data, checked."""
    paths = cfg.data.path
    meta = read_meta(paths[0])
    tok_path = cfg.data.tokenizer or meta["tokenizer"].get("path")
    if tok_path is None:
        raise DataError(f"{paths[0]}: meta.json does not say which tokenizer made it; set data.tokenizer")
    tokenizer = load_tokenizer(tok_path)
    checks = {"tokenizer_fingerprint": tokenizer.fingerprint, "tokenizer_vocab_size": tokenizer.vocab_size}
    train_streams, val_streams = [], []
    for i, path in enumerate(paths):
        shards = TokenShards(path, "train", model_vocab_size=cfg.model.vocab_size, **checks)
        dataset = PackedTokenDataset(shards, seq_len, reset_at_documents=cfg.data.reset_at_documents)
        train_streams.append(ShuffledStream(dataset, seed=cfg.train.seed + i))
        val = TokenShards(path, "validation", **checks)
        if val.num_tokens > seq_len:
            val_set = PackedTokenDataset(val, seq_len, reset_at_documents=cfg.data.reset_at_documents)
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


class Evaluator:
    """Mean loss over the held-out split (and masked-token accuracy for MLM), across ranks."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer

    @torch.no_grad()
    def __call__(self) -> dict:
        t = self.t
        if not t.val_streams:
            return {}
        t.engine.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=t.device)  # sum of losses, tokens, correct
        for stream in t.val_streams:
            for batch in t.loader(stream, 0, num_batches=t.cfg.train.eval_batches):
                out = t.forward(batch)
                labels = batch["labels"].to(t.device)
                scored = labels != -100
                totals[0] += out.loss.double() * scored.sum()  # accumulated on the device: no sync per batch
                totals[1] += scored.sum()
                if t.cfg.model.task == "masked":
                    totals[2] += ((out.logits.argmax(-1) == labels) & scored).sum()
        dist.all_reduce(totals)
        loss = (totals[0] / totals[1]).item()
        record = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}
        if t.cfg.model.task == "masked":
            record["val_mlm_accuracy"] = (totals[2] / totals[1]).item()
        return record


class Trainer:
    """Owns the engine, the data streams and the run state. ``fit()`` runs to train.max_steps."""

    def __init__(self, cfg: RunConfig, stop: StopRequest | None = None) -> None:
        self.stop = stop or StopRequest().install()
        setup_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.micro, self.accum, self.global_batch = cfg.batch_plan(self.world)
        if cfg.train.global_batch not in (None, self.global_batch):  # train.round_global_batch chose another
            if self.rank == 0:
                print(f"train: global batch {cfg.train.global_batch} does not divide by micro_batch x world size = "
                      f"{self.micro} x {self.world}; using the nearest multiple, {self.global_batch} = "
                      f"{self.micro} x {self.accum} x {self.world} (train.round_global_batch)", flush=True)  # fmt: skip
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch=self.global_batch))
        if not torch.cuda.is_available():
            if cfg.deepspeed.precision == "fp16":
                raise ConfigError("deepspeed.precision: fp16 is not supported on CPU; use bf16 or fp32")
            tune_cpu_allocator()
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.seq_len = cfg.data.seq_len or cfg.model.max_seq_len
        self.tokenizer, self.train_stream, self.val_streams = build_data(cfg, self.seq_len)

        # everything is checked before anything is written: a refused resume leaves the run folder as it was
        self.checkpointer = Checkpointer(cfg, self.rank, self.world)
        self.resumed_from, skipped = self.checkpointer.choose()
        saved_cfg, saved_state = None, None
        if self.resumed_from is not None:
            saved_cfg, saved_state = self.checkpointer.compatible(
                self.resumed_from,
                cfg,
                fingerprint=self.tokenizer.fingerprint,
                global_batch=self.global_batch,
                seq_len=self.seq_len,
            )
        self.cfg = cfg = resolve_schedule(cfg, saved_cfg)
        self.checkpointer.cfg = cfg
        self.changes = changed_settings(saved_cfg, cfg) if saved_cfg is not None else []

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.engine = build_engine(cfg, construct_model(cfg, self.world), self.world)
        self.state = TrainState()
        self.health = HealthMonitor(cfg.train)
        if self.resumed_from is not None:
            self.checkpointer.resume(self.engine, self.resumed_from, saved_state)
            for key in TrainState.__dataclass_fields__:
                setattr(self.state, key, saved_state[key])
            self.health.load_state_dict(saved_state.get("health", {}))
        apply_optim_settings(self.engine.optimizer, cfg.optim)
        self.n_params = param_count(cfg.model)
        self.evaluate = Evaluator(self)
        self.last_eval: dict | None = None
        self.out_dir = Path(cfg.train.out_dir)
        self.callbacks = self._start_output()
        if self.resumed_from is not None:
            self.emit(
                {
                    "step": self.state.step,
                    "event": "resumed",
                    "path": str(self.resumed_from),
                    "world_size": self.world,
                    "changed": self.changes,
                    "skipped_unsound": [str(p) for p in skipped],
                }  # fmt: skip
            )

    # ---- output ----
    def _start_output(self) -> list[Callback]:
        """Create the run folder, record the effective config, start the callbacks (rank 0)."""
        if self.rank != 0:
            return []
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.out_dir / "config.yaml", dump_run_config(cfg).encode())
        callbacks: list[Callback] = [
            LossWindow(),
            SpeedMonitor(flops_per_token(cfg.model, self.seq_len), self._peak_flops()),
            ProgressBar(cfg.train.max_steps),
            MetricsFile(self.out_dir),
            LossCurve(self.out_dir),
        ]
        if cfg.logging.wandb != "disabled":
            callbacks.append(Wandb(cfg, self.out_dir))
        return callbacks

    def _peak_flops(self) -> float:
        """Peak FLOP/s of all ranks together: vendor figures on GPU, a measured matmul on CPU."""
        if torch.cuda.is_available():
            return (gpu_peak_flops(torch.cuda.get_device_name()) or 0.0) * self.world
        dtype = PRECISION_DTYPES[self.cfg.deepspeed.precision]
        return (
            measure_matmul_flops("cpu", dtype if dtype != torch.float16 else torch.float32, n=1024, reps=5) * self.world
        )

    def emit(self, record: dict) -> None:
        for callback in self.callbacks:
            callback.on_record(record)

    def print(self, text: str) -> None:
        if self.rank == 0:
            from tqdm import tqdm

            tqdm.write(text)

    # ---- data and steps ----
    def loader(self, stream, consumed: int, num_batches: int | None = None):
        return make_loader(
            stream,
            micro_batch=self.micro,
            rank=self.rank,
            world_size=self.world,
            consumed_samples=consumed,
            num_batches=num_batches,
            num_workers=self.cfg.data.num_workers if num_batches is None else 0,
        )

    def forward(self, batch: dict):
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return self.engine(inputs.pop("input_ids"), inputs.pop("labels"), **inputs)

    def train_step(self, loader) -> StepResult:
        """One optimizer step over ``accum`` micro-batches, and one collective: the mean loss and
        whether any rank was asked to stop."""
        start = time.perf_counter()
        lr = learning_rate(self.state.step, self.cfg.optim, self.cfg.train.max_steps)
        set_learning_rate(self.engine.optimizer, lr)
        self.engine.train()
        losses = []
        for _ in range(self.accum):
            loss = self.forward(next(loader)).loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        stats = torch.stack([torch.stack(losses).mean(), torch.tensor(float(self.stop.signum), device=self.device)])
        dist.all_reduce(stats)
        mean, stop = stats.tolist()
        mean /= self.world
        self.stop_agreed = stop > 0
        norm = self.engine.get_global_grad_norm()
        return StepResult(
            loss=mean,
            applied=self.engine.was_step_applied() and math.isfinite(mean),
            grad_norm=float(norm) if norm is not None else float("nan"),
            lr=lr,
            tokens=self.global_batch * self.seq_len,
            seconds=time.perf_counter() - start,
        )

    def stop_requested(self) -> bool:
        """Whether any rank was asked to stop (a collective; used where no step is taken)."""
        flag = torch.tensor([float(self.stop.signum)], device=self.device)
        dist.all_reduce(flag)
        return flag.item() > 0

    # ---- the loop ----
    def fit(self) -> str:
        """Train to ``train.max_steps``; returns 'done' or 'stopped' (a stop signal, checkpoint saved)."""
        cfg, state = self.cfg, self.state
        self.stop_agreed = False
        self._announce()
        status = "failed"
        for callback in self.callbacks:
            callback.on_fit_start(self)
        try:
            if self.stop_requested():  # a signal during start-up: the resumed checkpoint is the state
                status = "stopped"
                return self._finish_stopped(saved=False)
            loader = iter(self.loader(self.train_stream, state.consumed_samples))
            while state.step < cfg.train.max_steps and not self.stop_agreed:
                result = self.train_step(loader)
                state.step += 1
                state.consumed_samples += self.global_batch
                state.tokens_seen += result.tokens
                for callback in self.callbacks:
                    callback.on_step(self, result)
                event = self.health.observe(state.step, result.loss, result.applied)
                if event is not None:
                    self.emit({**event, "grad_norm": result.grad_norm})
                if reason := self.health.diverged():
                    status = "diverged"
                    raise self._diverged(reason)
                if state.step % cfg.train.log_interval == 0 or state.step == cfg.train.max_steps:
                    self.log()
                if cfg.train.eval_interval and state.step % cfg.train.eval_interval == 0:
                    self.last_eval = self.evaluate()
                    self.emit({"step": state.step, **self.last_eval})
                if self.checkpointer.should_save(state.step) and state.step < cfg.train.max_steps:
                    self.save()
            for callback in self.callbacks:
                callback.on_loop_end(self)
            self.save()
            if self.stop_agreed:
                status = "stopped"
                return self._finish_stopped(saved=True)
            status = "done"
            self._finish_done()
            return status
        finally:
            for callback in self.callbacks:
                callback.on_fit_end(self, status)

    def log(self) -> None:
        record = {"step": self.state.step}
        for callback in self.callbacks:
            callback.on_log(self, record)
        self.emit(record)

    def save(self) -> Path:
        trainer_state = {
            **dataclasses.asdict(self.state),
            "world_size": self.world,
            "global_batch": self.global_batch,
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "seq_len": self.seq_len,
            "sound": self.health.sound,
            "health": self.health.state_dict(),
        }
        folder = self.checkpointer.save(self.engine, self.state.step, trainer_state, self.tokenizer)
        self.emit({"step": self.state.step, "event": "checkpoint", "path": str(folder), "sound": self.health.sound})
        return folder

    def _announce(self) -> None:
        cfg = self.cfg
        line = (
            f"train: {cfg.model.arch} {cfg.model.task} ({self.n_params / 1e6:.2f}M params), world {self.world}, "
            f"global batch {self.global_batch} = {self.micro} x {self.accum} x {self.world}, seq {self.seq_len}, "
            f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}, lr {cfg.optim.schedule} "
            f"{cfg.optim.lr:g} -> {cfg.optim.min_lr:g}"
        )
        if self.resumed_from is not None:
            line += f"; resumed from {self.resumed_from} at step {self.state.step}"
            if self.changes:
                line += "; applied changed settings: " + ", ".join(self.changes)
        self.print(line)

    def _diverged(self, reason: str) -> TrainingDiverged:
        """The error that ends a diverging run; no checkpoint of its weights is written."""
        sound = self.checkpointer.newest_sound()
        where = f"training diverged at step {self.state.step}: {reason}"
        lower = f"--optim.lr {self.cfg.optim.lr / 2:g}"
        if sound is None:
            return TrainingDiverged(f"{where}; no sound checkpoint was saved. Start again with a lower lr ({lower})")
        step = int(ckpt_step(sound))
        return TrainingDiverged(
            f"{where}; the newest sound checkpoint is {sound} (step {step}). Run the same command with a lower lr "
            f"({lower}): it resumes from that checkpoint, passing over newer unsound ones"
        )

    def _finish_stopped(self, saved: bool) -> str:
        what = "checkpoint saved" if saved else "nothing new to save"
        self.print(f"train: stopped by {self.stop.name or 'a signal on another rank'} at step {self.state.step}; "
                   f"{what}, rerun the same command to resume")  # fmt: skip
        return "stopped"

    def _finish_done(self) -> None:
        cfg = self.cfg
        evaluated = cfg.train.eval_interval and self.state.step % cfg.train.eval_interval == 0
        final = self.last_eval if evaluated and self.last_eval is not None else self.evaluate()
        if final is not self.last_eval:
            self.emit({"step": self.state.step, **final})
        text = self.sample_text()
        if self.rank == 0:
            if text is not None:
                print("sample:\n" + text.strip()[:2000])
            summary = f"train: done {self.state.step} steps, {self.state.tokens_seen:,} tokens"
            if final:
                summary += f", validation loss {final['val_loss']:.3f} (ppl {final['val_ppl']:.1f})"
            print(summary + f"; run folder {self.out_dir}", flush=True)

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

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def ckpt_step(folder: Path) -> int:
    return int(folder.name.split("_")[1])


def run(cfg: RunConfig, stop: StopRequest | None = None) -> str:
    """Train one run to the end (or to a stop signal); returns 'done' or 'stopped'."""
    stop = stop or StopRequest().install()
    trainer = None
    try:
        trainer = Trainer(cfg, stop)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        elif dist.is_initialized():
            dist.destroy_process_group()
