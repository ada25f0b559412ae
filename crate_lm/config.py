"""Typed configuration: the dataclasses here *are* the YAML schema and the CLI.

A config file is YAML whose top-level keys name sections (``model:``, later ``data:``,
``train:``...). Each section is checked against its dataclass: unknown keys, wrong types and
impossible values are one-line :class:`ConfigError` messages that name the key and the fix.
Dotted command-line overrides (``--model.d_model 256``) are applied to the parsed mapping
before it is checked, so they obey the same rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from crate_lm.errors import CrateLMError


class ConfigError(CrateLMError):
    """A configuration value, key or file is wrong; the message says which and how to fix it."""


# --------------------------------------------------------------------------------------------
# Generic dataclass <-> mapping conversion
# --------------------------------------------------------------------------------------------


def _suggest(key: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}"
                + (_suggest(str(value), map(str, allowed)) if isinstance(value, str) else "")
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML 1.1 reads "3e-4" as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{name}'{_suggest(str(key), fields)}; valid keys: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _coerce(value, hints[key], name)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where and not str(err).startswith(where) else str(err)) from None


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise ConfigError ``key must be RULE, got VALUE`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain, YAML-safe mapping of a config dataclass (nested ones included)."""
    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------------------------
# YAML files and dotted overrides
# --------------------------------------------------------------------------------------------


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a YAML syntax error is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (check the path passed to --config)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"malformed YAML in {path}{at}: {problem}; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_overrides(args: typing.Sequence[str]) -> dict[str, Any]:
    """Turn ``["--train.lr", "3e-4", "--model.preset=125m"]`` into ``{"train.lr": "3e-4", ...}``."""
    out: dict[str, Any] = {}
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
                raise ConfigError(f"override --{key} has no value: write --{key} VALUE")
            raw = args[i + 1]
            i += 2
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key] = raw
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys inside a nested mapping (returns a new mapping)."""
    import copy

    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override --{dotted}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


# --------------------------------------------------------------------------------------------
# Model configuration and presets
# --------------------------------------------------------------------------------------------

Arch = Literal["crate", "gpt"]
Task = Literal["causal", "masked"]
IstaVariant = Literal["crate", "overcomplete", "alpha"]
AttnImpl = Literal["sdpa", "math"]


@dataclasses.dataclass
class ModelConfig:
    """Shape and options of a CRATE (or baseline GPT) language model. Notation as in CRATE.md."""

    arch: Arch = "crate"
    """'crate' (MSSA + ISTA blocks) or 'gpt' (standard pre-LN attention + MLP baseline)."""
    task: Task = "causal"
    """'causal' (decoder-only, next-token loss) or 'masked' (BERT-style, masked-LM loss)."""
    vocab_size: int = 8192
    """Embedding rows; must be >= the tokenizer's vocabulary."""
    max_seq_len: int = 256
    """Number of learned positions: the longest sequence the model accepts."""
    d_model: int = 128
    """Width d of the token representations."""
    n_layers: int = 4
    """Number of blocks L."""
    n_heads: int = 4
    """Number of heads / subspaces K; p = d / K."""
    ista: IstaVariant = "alpha"
    """ISTA variant: 'crate' (d x d, no residual), 'overcomplete' (d x m, no residual), 'alpha' (d x m, D_1, residual)."""
    ista_steps: int | None = None
    """ISTA iterations per block; None means 1 for 'crate' and 2 for 'overcomplete'/'alpha'."""
    ista_dict_mult: int = 4
    """Dictionary width m = ista_dict_mult * d ('overcomplete' and 'alpha')."""
    ista_eta: float = 0.1
    """ISTA step size eta."""
    ista_lambda: float = 0.1
    """ISTA sparsity penalty lambda."""
    mlp_mult: int = 4
    """GPT baseline only: MLP hidden width = mlp_mult * d."""
    dropout: float = 0.0
    """Dropout on embeddings and residual branches."""
    attn_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_std: float = 0.02
    """Std of the normal init of embeddings and projections (output projections: / sqrt(2L))."""
    ln_eps: float = 1e-5
    """LayerNorm epsilon."""
    attn_impl: AttnImpl = "sdpa"
    """'sdpa' (torch scaled_dot_product_attention: flash / memory-efficient kernels) or 'math' (reference)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "ista_dict_mult", "mlp_mult"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}); "
                "pick n_heads that divides d_model"
            )
        if self.ista_steps is not None and self.ista_steps < 1:
            raise ConfigError(f"model.ista_steps must be >= 1, got {self.ista_steps}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.ista_eta <= 0 or self.ista_lambda < 0:
            raise ConfigError("model.ista_eta must be > 0 and model.ista_lambda >= 0")

    @property
    def head_dim(self) -> int:
        """p = d / K."""
        return self.d_model // self.n_heads

    @property
    def n_ista_steps(self) -> int:
        return self.ista_steps if self.ista_steps is not None else (1 if self.ista == "crate" else 2)

    @property
    def dict_width(self) -> int:
        """m: the number of dictionary atoms (d for the 'crate' variant)."""
        return self.d_model if self.ista == "crate" else self.ista_dict_mult * self.d_model

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size (see ``MODEL_PRESETS``), optionally with some fields changed."""
        return model_config_from_dict({"preset": name, **overrides})


# Sizes follow the GPT-2/GPT-3 ladder (d, L, K). Counts differ by `ista` variant and `arch`;
# `tools/model_table.py` prints the exact numbers quoted in the README.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, vocab_size=8192, max_seq_len=256),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, vocab_size=50304, max_seq_len=1024),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, vocab_size=50304, max_seq_len=2048),
    "760m": dict(d_model=1536, n_layers=24, n_heads=16, vocab_size=50304, max_seq_len=2048),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=16, vocab_size=50304, max_seq_len=2048),
    "2.7b": dict(d_model=2560, n_layers=32, n_heads=32, vocab_size=50304, max_seq_len=2048),
    "7b": dict(d_model=4096, n_layers=40, n_heads=32, vocab_size=50304, max_seq_len=2048),
}


def model_config_from_dict(data: dict[str, Any], where: str = "model") -> ModelConfig:
    """Build a ModelConfig from a mapping that may name a ``preset`` to start from."""
    data = dict(data or {})
    preset = data.pop("preset", None)
    base: dict[str, Any] = {}
    if preset is not None:
        preset = str(preset)
        if preset not in MODEL_PRESETS:
            raise ConfigError(
                f"unknown model preset '{preset}'{_suggest(preset, MODEL_PRESETS)}; "
                f"choose one of: {', '.join(MODEL_PRESETS)}"
            )
        base = dict(MODEL_PRESETS[preset])
    base.update(data)
    return from_dict(ModelConfig, base, where)


# --------------------------------------------------------------------------------------------
# A training run: one YAML file, one dataclass per section
# --------------------------------------------------------------------------------------------

Precision = Literal["fp32", "bf16", "fp16"]
WandbMode = Literal["disabled", "offline", "online"]


@dataclasses.dataclass
class DataConfig:
    """Which prepared shards to read and how to cut them into samples."""

    path: list[str] = dataclasses.field(default_factory=lambda: ["data/shakespeare/shards"])
    """Prepared dataset folder(s) (tools/prepare_data.py); several are blended."""
    weights: list[float] | None = None
    """Blend weights, one per path (default: equal)."""
    tokenizer: str | None = None
    """Tokenizer path; default: the one recorded in the data's meta.json. Must match the data."""
    seq_len: int | None = None
    """Tokens per sample; default model.max_seq_len."""
    reset_at_documents: bool = False
    """Restart positions and block attention at document boundaries."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""
    mlm_prob: float = 0.15
    """Masked-LM selection rate (task: masked)."""

    def __post_init__(self) -> None:
        require(len(self.path) > 0, "data.path", "at least one prepared data folder", self.path)
        if self.weights is not None:
            require(
                all(w >= 0 for w in self.weights) and sum(self.weights) > 0,
                "data.weights",
                "non-negative and not all zero",
                self.weights,
            )
        require(self.seq_len is None or self.seq_len >= 1, "data.seq_len", ">= 1", self.seq_len)
        require(self.num_workers >= 0, "data.num_workers", ">= 0 (0 reads in the training process)", self.num_workers)
        require(0.0 < self.mlm_prob < 1.0, "data.mlm_prob", "in (0, 1)", self.mlm_prob)


Schedule = Literal["cosine", "wsd", "constant"]


@dataclasses.dataclass
class OptimConfig:
    """AdamW (decay on matrices only), linear warmup, then a decay to a floor; clipping.

    Every field here may change when a run resumes: the new values are applied from the resumed
    step on (the schedule is a function of the step and these fields, nothing else is restored).
    """

    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-4
    """Floor the decay ends at (0 <= min_lr <= lr)."""
    warmup_steps: int = 20
    """Linear warmup from lr / warmup_steps to lr."""
    schedule: Schedule = "cosine"
    """'cosine': decay right after warmup over decay_steps, then min_lr. 'wsd' (warmup-stable-decay):
    lr until the last decay_steps of train.max_steps, then linear to min_lr; extending max_steps on
    resume before the decay began just moves the decay. 'constant': lr after warmup."""
    decay_steps: int | None = None
    """Length of the decay phase. Default, fixed when the run first starts and kept on resume:
    cosine max_steps - warmup_steps; wsd 20% of max_steps. Steps past a cosine decay stay at min_lr."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr", "> 0", self.lr)
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"between 0 and optim.lr ({self.lr})", self.min_lr)
        require(self.warmup_steps >= 0, "optim.warmup_steps", ">= 0", self.warmup_steps)
        require(
            self.decay_steps is None or self.decay_steps >= 1, "optim.decay_steps", ">= 1 (or unset)", self.decay_steps
        )
        require(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"optim.{name}", "in [0, 1)", getattr(self, name))
        require(self.eps > 0, "optim.eps", "> 0", self.eps)
        require(self.grad_clip >= 0, "optim.grad_clip", ">= 0 (0 disables clipping)", self.grad_clip)


@dataclasses.dataclass
class TrainConfig:
    """Batch sizes, length of the run, evaluation and sampling."""

    out_dir: str = "runs/default"
    """Run folder: checkpoints, effective config, metrics.jsonl, loss curve."""
    micro_batch: int = 8
    """Samples per rank per forward/backward."""
    grad_accum: int | None = None
    """Micro-steps per optimizer step; default derived from global_batch, else 1."""
    global_batch: int | None = None
    """Samples per optimizer step over all ranks = micro_batch x grad_accum x world size."""
    round_global_batch: bool = False
    """Where global_batch does not divide by micro_batch x world size (e.g. 512 on 24 GPUs), use the
    nearest multiple instead of refusing; the run says what it chose and records it in config.yaml."""
    max_steps: int = 200
    """Optimizer steps in the whole run."""
    seed: int = 1234
    eval_interval: int = 50
    """Validation every this many steps (0: only at the end)."""
    eval_batches: int = 8
    """Micro-batches per rank in a validation pass."""
    log_interval: int = 10
    compile: bool = False
    """torch.compile the model."""
    max_bad_steps: int = 5
    """Stop after this many non-finite steps in a row (each is skipped: the weights stay as they were)."""
    spike_sigmas: float = 6.0
    """A step whose loss is more than this many standard deviations above the mean of the last
    spike_window applied steps is a loss spike (0 disables detection)."""
    spike_window: int = 50
    """Steps of loss history the spike test compares with (it starts once half of them are seen)."""
    max_spike_steps: int = 10
    """Stop after this many loss spikes in a row: the run is diverging; the error names the newest
    sound checkpoint (one saved while the loss and the weights were healthy)."""
    sample_prompt: str = ""
    """Text to continue at the end of a causal run (empty: start from end-of-document)."""
    sample_tokens: int = 64

    def __post_init__(self) -> None:
        require(bool(self.out_dir), "train.out_dir", "a folder path", self.out_dir)
        for name in (
            "micro_batch",
            "max_steps",
            "eval_batches",
            "log_interval",
            "max_bad_steps",
            "spike_window",
            "max_spike_steps",
        ):
            require(getattr(self, name) >= 1, f"train.{name}", ">= 1", getattr(self, name))
        require(self.grad_accum is None or self.grad_accum >= 1, "train.grad_accum", ">= 1 (or unset)", self.grad_accum)
        require(
            self.global_batch is None or self.global_batch >= 1,
            "train.global_batch",
            ">= 1 (or unset)",
            self.global_batch,
        )
        require(
            self.eval_interval >= 0, "train.eval_interval", ">= 0 (0: evaluate only at the end)", self.eval_interval
        )
        require(self.spike_sigmas >= 0, "train.spike_sigmas", ">= 0 (0 disables spike detection)", self.spike_sigmas)
        require(self.sample_tokens >= 0, "train.sample_tokens", ">= 0", self.sample_tokens)


@dataclasses.dataclass
class DeepSpeedSection:
    """How DeepSpeed runs the model; the DeepSpeed JSON is derived from this and the batch sizes."""

    zero_stage: int = 0
    precision: Precision = "fp32"
    offload_optimizer: bool = False
    """ZeRO-2/3: keep optimizer states on the CPU (DeepSpeedCPUAdam)."""
    offload_params: bool = False
    """ZeRO-3: keep parameters on the CPU."""
    zero_init: bool = True
    """ZeRO-3 only: construct the model inside ``deepspeed.zero.Init`` so no rank ever holds all
    of it (each keeps ~1/world of the parameters; the init is bit-identical to a whole build in
    fp32, and training from it matches a whole construction). ``false`` builds the whole model on
    every rank first."""
    config: dict = dataclasses.field(default_factory=dict)
    """Raw DeepSpeed JSON entries merged over the derived config (batch sizes may not be contradicted)."""

    def __post_init__(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "0, 1, 2 or 3", self.zero_stage)
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage: 3")
        if self.offload_optimizer and self.zero_stage < 2:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage 2 or 3")


@dataclasses.dataclass
class CheckpointConfig:
    interval: int = 100
    """Save every this many steps (and at the end, and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Complete checkpoints kept (0 keeps all); the newest sound one is never removed."""
    resume: str = "auto"
    """'auto' (newest complete and sound checkpoint in out_dir, if any), 'never', or a checkpoint folder."""
    weights: Literal["module", "fp32"] = "module"
    """What model.safetensors holds in a bf16/fp16 run: the module's weights as computed with
    ('module', bf16) or the optimizer's fp32 master weights ('fp32', twice the size). Recorded in
    the file's metadata (crate_lm.weights, crate_lm.dtype)."""
    export_weights: bool | None = None
    """Whether each checkpoint also writes the consolidated model.safetensors. None (default):
    yes for ZeRO 0-2, where the module is whole on rank 0 anyway (one file write, no gather;
    checkpoints stay readable by any safetensors tool), no for ZeRO-3, where it would gather the
    whole model on rank 0 at every save (28 GB of fp32 at 7B). Without it, ``crate_lm.load`` reads
    DeepSpeed's files and ``crate-lm export`` writes sharded safetensors from them offline."""

    def __post_init__(self) -> None:
        require(self.interval >= 1, "checkpoint.interval", ">= 1", self.interval)
        require(self.keep_last >= 0, "checkpoint.keep_last", ">= 0 (0 keeps all)", self.keep_last)
        require(bool(self.resume), "checkpoint.resume", "'auto', 'never' or a checkpoint folder", self.resume)


@dataclasses.dataclass
class LoggingConfig:
    wandb: WandbMode = "disabled"
    project: str = "crate_lm"
    run_name: str | None = None


@dataclasses.dataclass
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = dataclasses.field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.data.weights is not None and len(self.data.weights) != len(self.data.path):
            raise ConfigError(
                f"data.weights has {len(self.data.weights)} entries for {len(self.data.path)} data.path entries"
            )
        seq = self.data.seq_len or self.model.max_seq_len
        if seq > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len ({seq}) exceeds model.max_seq_len ({self.model.max_seq_len})")

    def batch_plan(self, world_size: int) -> tuple[int, int, int]:
        """(micro_batch, grad_accum, global_batch) for ``world_size`` ranks; a clear error when they cannot agree."""
        micro, accum, total = self.train.micro_batch, self.train.grad_accum, self.train.global_batch
        if total is None:
            accum = accum or 1
            return micro, accum, micro * accum * world_size
        per_step = micro * world_size
        if total % per_step and self.train.round_global_batch and accum is None:
            low = total // per_step * per_step
            total = low if low and total - low < low + per_step - total else low + per_step
        if total % per_step:
            raise ConfigError(
                f"train.global_batch={total} is not divisible by train.micro_batch x world size = "
                f"{micro} x {world_size} = {per_step}; change global_batch or micro_batch, or set "
                "train.round_global_batch: true to use the nearest multiple"
            )
        if accum is not None and micro * accum * world_size != total:
            raise ConfigError(
                f"train.global_batch={total} contradicts micro_batch x grad_accum x world size = "
                f"{micro} x {accum} x {world_size}; set only two of them"
            )
        return micro, total // per_step, total


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from the mapping of a YAML file (sections may be missing: defaults apply)."""
    data = dict(data or {})
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"unknown config section '{key}'{_suggest(str(key), fields)}; sections: {', '.join(sorted(fields))}"
            )
    if isinstance(data.get("data", {}).get("path"), str):
        data["data"] = {**data["data"], "path": [data["data"]["path"]]}
    model = model_config_from_dict(data.pop("model", {}) or {})
    sections = {k: from_dict(typing.get_type_hints(RunConfig)[k], v or {}, k) for k, v in data.items()}
    try:
        return RunConfig(model=model, **sections)
    except ConfigError:
        raise
    except TypeError as err:
        raise ConfigError(str(err)) from None


def load_run_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a run's YAML (or start from defaults when ``path`` is None) and apply dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    return run_config_from_dict(apply_overrides(data, parse_overrides(overrides)))


def dump_run_config(cfg: RunConfig) -> str:
    """YAML of the effective config: loading it gives the same RunConfig."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
