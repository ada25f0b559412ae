"""Checkpoints: DeepSpeed state for exact resume, plus a self-describing copy for everyone else.

A run's ``checkpoints/`` folder holds one folder per saved step::

    step_00000200/
        (DeepSpeed's model / optimizer / scheduler shards, written by engine.save_checkpoint)
        rng_rank00000.pt ...       each rank's RNG states (python, numpy, torch, cuda)
        trainer_state.json         step, samples and tokens consumed, tokenizer fingerprint, world size,
                                   health (``sound``: saved while the loss and the weights were healthy)
        config.yaml                the effective run config
        model.safetensors          consolidated weights (load with ``load``); its metadata
                                   records the model config, so the weights know their architecture.
                                   Only with ``checkpoint.export_weights`` (default: ZeRO 0-2); without
                                   it ``load`` reads DeepSpeed's files (``checkpoint_weights``)
        tokenizer/                 the run's tokenizer: tokenizer.json (tokenizers) or tokenizer.model
                                   (sentencepiece), special tokens included, and tokenizer_info.json;
                                   ``load_tokenizer`` on the folder gives the run's fingerprint
        COMPLETE                   written last: only folders that have it are ever resumed from

A checkpoint folder is self-contained: ``crate_lm.load(folder)`` (or the run folder, or a copy of
either moved anywhere) gives the model, its config and its tokenizer without the run's data.
Checkpoints written before ``tokenizer/`` existed find the tokenizer through the run config's
data paths (see ``load``).

Loading never unpickles code: DeepSpeed's files are read with ``torch.load(weights_only=True)``
(a few DeepSpeed value classes allowlisted), the rest is JSON, YAML and safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from crate_lm.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    dump_run_config,
    load_run_config,
    model_config_from_dict,
    to_dict,
)
from crate_lm.errors import CrateLMError
from crate_lm.fsutil import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from crate_lm.data import Tokenizer

COMPLETE = "COMPLETE"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
TOKENIZER_DIR = "tokenizer"


class CheckpointError(CrateLMError):
    """A checkpoint cannot be used as asked; the message says why and what to do."""


def _safe_globals() -> list:
    """DeepSpeed value classes that appear inside its checkpoint files."""
    allowed: list = [argparse.Namespace]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


def safe_torch_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load that never runs code from the file (weights_only, with the allowlist above).

    ``mmap``: tensors map the file (zip-format files only; others are read whole), so only the
    pages a caller touches are read. A file that holds anything but tensors and plain values, or
    that is not a torch file at all, is a one-line CheckpointError naming it."""
    import pickle
    import zipfile

    try:
        mmap = mmap and zipfile.is_zipfile(path)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing; the checkpoint is incomplete, resume from another one") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        found = re.search(r"(?:GLOBAL|global|Unsupported class) ([\w.]+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and found:
            raise CheckpointError(
                f"{path}: refused to load: it holds Python objects ({found.group(1)}) that would run code when "
                "read, not just tensors; crate_lm never writes such files, so it was replaced or tampered with. "
                "Use a checkpoint from a run you trust"
            ) from None
        raise CheckpointError(f"{path}: not a readable torch file: it is truncated or corrupt") from None


def install_safe_loading(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files with ``safe_torch_load``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location=map_location)

    engine.checkpoint_engine = SafeTorchCheckpointEngine(getattr(engine, "_config", None))


# ---- RNG states -----------------------------------------------------------------------------


def capture_rng() -> dict:
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((state["python_version"], tuple(py[:-1]), None if py[-1] == 0 else py[-1]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the checkpoint folder -------------------------------------------------------------------


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if TAG_PATTERN.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(TAG_PATTERN.match(p.name).group(1)))


def finished_step(run: str | Path) -> int | None:
    """The step of a run folder's newest complete checkpoint, or None when it has none."""
    folders = complete_checkpoints(Path(run) / "checkpoints") if (Path(run) / "checkpoints").is_dir() else []
    return int(load_trainer_state(folders[-1])["step"]) if folders else None


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    engine, root: Path, step: int, trainer_state: dict, cfg: RunConfig, tokenizer: Tokenizer | None = None
) -> Path:
    """Save on every rank (collective); rank 0 writes the consolidated weights, the config, the
    trainer state and (given one) the run's tokenizer into ``tokenizer/``, checks the weights
    (``weights_finite``, ``max_abs_weight`` join the trainer state), and marks the folder COMPLETE
    last."""
    import torch.distributed as dist

    rank = dist.get_rank()
    tag = tag_for(step)
    folder = root / tag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    done = torch.tensor([int((folder / COMPLETE).is_file())], device=device)  # nccl needs device tensors
    dist.broadcast(done, src=0)  # rank 0 decides, so every rank takes the same (collective) path
    if done.item():
        return folder  # a complete checkpoint is never rewritten
    if rank == 0 and folder.exists():
        shutil.rmtree(folder)  # an incomplete earlier attempt at this step
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    buffer = _to_bytes(capture_rng())
    atomic_write_bytes(folder / f"rng_rank{rank:05d}.pt", buffer)
    consolidate = writes_weights(cfg)
    state_dict = consolidated_state_dict(engine, cfg) if consolidate else {}
    finite, max_abs = (None, None) if consolidate else _weights_health(engine)  # a collective
    dist.barrier()
    if rank == 0:
        from safetensors.torch import save_file

        if consolidate:
            finite = all(bool(torch.isfinite(v).all()) for v in state_dict.values() if v.is_floating_point())
            max_abs = max((float(v.abs().max()) for v in state_dict.values() if v.numel() and finite), default=0.0)
        trainer_state = {**trainer_state, "weights_finite": finite, "max_abs_weight": max_abs if finite else None}
        trainer_state["sound"] = bool(trainer_state.get("sound", True) and finite)
        if consolidate:
            tmp = folder / ".model.safetensors.tmp"
            dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
            dtype = dtypes.pop() if len(dtypes) == 1 else None
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=weights_metadata(cfg, dtype))
            tmp.rename(folder / "model.safetensors")
        atomic_write_bytes(folder / "config.yaml", dump_run_config(cfg).encode())
        atomic_write_json(folder / "trainer_state.json", trainer_state)
        if tokenizer is not None:
            write_tokenizer(folder, tokenizer)
        atomic_write_bytes(folder / COMPLETE, b"")
    dist.barrier()
    return folder


def writes_weights(cfg: RunConfig) -> bool:
    """Whether checkpoints of ``cfg`` carry model.safetensors (``checkpoint.export_weights``;
    default: ZeRO 0-2 yes, ZeRO-3 no)."""
    flag = cfg.checkpoint.export_weights
    return flag if flag is not None else cfg.deepspeed.zero_stage < 3


def _weights_health(engine) -> tuple[bool, float]:
    """(all weights finite, largest |weight|) over every rank's own share, without gathering
    (a collective: ZeRO-3 ranks look at their partitions, other stages at the whole module)."""
    import torch.distributed as dist

    finite, max_abs = True, 0.0
    with torch.no_grad():
        for param in engine.module.parameters():
            local = getattr(param, "ds_tensor", param).detach()
            if not local.numel() or not local.is_floating_point():
                continue
            if not bool(torch.isfinite(local).all()):
                finite = False
            else:
                max_abs = max(max_abs, float(local.abs().max()))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    flags = torch.tensor([0.0 if finite else 1.0, max_abs], dtype=torch.float64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item() == 0.0), float(flags[1].item())


def write_tokenizer(folder: str | Path, tokenizer: Tokenizer) -> Path:
    """Write ``tokenizer``'s files into ``folder/tokenizer/`` atomically: into a temporary folder,
    checked to load back with the same fingerprint, then renamed into place. Returns the folder."""
    from crate_lm.data import load_tokenizer

    folder = Path(folder)
    target = folder / TOKENIZER_DIR
    tmp = folder / f".{TOKENIZER_DIR}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tokenizer.save(tmp)
    copy = load_tokenizer(tmp)
    if copy.fingerprint != tokenizer.fingerprint:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{tmp}: the copied tokenizer has fingerprint {copy.fingerprint}, not {tokenizer.fingerprint}; "
            "the disk altered it, save the checkpoint again"
        )
    _fsync(tmp)  # its files were flushed as they were written
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    _fsync(folder)
    return target


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk (best effort: some filesystems refuse folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder, its COMPLETE marker first: an interrupted removal never
    leaves a partial folder that still looks complete."""
    (folder / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


# ---- what a checkpoint is ------------------------------------------------------------------

WEIGHTS_MODEL_KEY = "crate_lm.model"
"""safetensors metadata key holding the model config (JSON) the weights belong to."""

RUNTIME_MODEL_FIELDS = ("activation_checkpointing", "attn_impl", "dropout", "attn_dropout", "init_std")
"""Model settings that change neither the parameters nor the function a checkpoint computes:
they may differ between a checkpoint and the run that resumes or loads it."""


def architecture(model: ModelConfig) -> dict[str, Any]:
    """The model config fields that define the parameters and the function."""
    return {k: v for k, v in to_dict(model).items() if k not in RUNTIME_MODEL_FIELDS}


def weights_metadata(cfg: RunConfig, dtype: torch.dtype | None = None) -> dict[str, str]:
    """What model.safetensors holds: its model config, the run's precision, and which weights
    (``module`` bf16/fp32 as computed with, or the ``fp32`` master copy) in which dtype."""
    masters = cfg.checkpoint.weights == "fp32" and cfg.deepspeed.precision != "fp32"
    return {
        "format": "pt",
        WEIGHTS_MODEL_KEY: json.dumps(to_dict(cfg.model), sort_keys=True),
        "crate_lm.precision": cfg.deepspeed.precision,
        "crate_lm.weights": "fp32 master" if masters else "module",
        "crate_lm.dtype": str(dtype).removeprefix("torch.") if dtype is not None else "",
    }


def checkpoint_model_config(folder: Path) -> ModelConfig | None:
    """The model config recorded inside ``folder/model.safetensors`` (or the first shard of an
    exported folder; None for files written before it was recorded, or without safetensors)."""
    from safetensors import safe_open

    files = weight_files(folder)
    if not files:
        return None
    weights = files[0]
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise CheckpointError(
            f"{weights}: not a readable safetensors file ({err}); it is truncated or corrupt"
        ) from None
    if WEIGHTS_MODEL_KEY not in meta:
        return None
    return model_config_from_dict(json.loads(meta[WEIGHTS_MODEL_KEY]), where=f"{weights} metadata")


def differing(a: dict, b: dict, prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in a if a.get(k) != b.get(k)]


def read_checkpoint_config(folder: Path) -> RunConfig:
    """``folder/config.yaml``, checked against the architecture recorded in the weights."""
    config = folder / "config.yaml"
    try:
        cfg = load_run_config(config)
    except ConfigError as err:
        raise CheckpointError(f"{config}: {err}") from None
    recorded = checkpoint_model_config(folder)
    if recorded is not None and architecture(recorded) != architecture(cfg.model):
        diff = differing(architecture(recorded), architecture(cfg.model), "model")
        raise CheckpointError(
            f"{config} does not describe the weights in {folder} ({', '.join(diff)} differ): "
            "the config file was replaced; restore the checkpoint's own config.yaml"
        )
    return cfg


def _to_bytes(obj: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def consolidated_state_dict(engine, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Full weights on rank 0 (a collective; empty dict on other ranks).

    ``checkpoint.weights: module`` gives the module's weights as it computes with them (bf16 in a
    bf16 run); ``fp32`` gives the optimizer's fp32 master weights, gathered from their ZeRO
    partitions (in an fp32 run the two are the same)."""
    import torch.distributed as dist

    module = engine.module
    rank = dist.get_rank()
    if cfg.checkpoint.weights == "fp32" and cfg.deepspeed.precision != "fp32":
        from deepspeed.utils import safe_get_full_fp32_param

        replicated = _replicated_fp32_masters(engine.optimizer)
        out = {}
        for name, param in module.named_parameters():
            full = replicated.get(id(param))
            if full is None:
                full = safe_get_full_fp32_param(param)  # ZeRO-1/2/3 partitions: a collective, same order on every rank
            if full is None:
                raise CheckpointError(f"DeepSpeed has no fp32 master copy of {name}; set checkpoint.weights: module")
            if rank == 0:
                out[name] = full.detach().float().cpu().clone()
        return out
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        out = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    out[name] = param.detach().cpu().clone()
        return out
    if rank != 0:
        return {}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _replicated_fp32_masters(optimizer) -> dict[int, torch.Tensor]:
    """Parameter id -> its fp32 master, for DeepSpeed's ZeRO-0 bf16/fp16 optimizers, which keep
    an fp32 copy of each param group on every rank (no ZeRO partitions to gather): one flat
    tensor per group (fused) or one tensor per parameter (unfused)."""
    from torch._utils import _unflatten_dense_tensors

    groups = getattr(optimizer, "fp16_groups", None)
    if not groups:
        return {}
    if getattr(optimizer, "fp32_groups_flat", None):
        masters = [
            _unflatten_dense_tensors(flat.detach(), params) for params, flat in zip(groups, optimizer.fp32_groups_flat)
        ]
    elif getattr(optimizer, "fp32_groups", None):
        masters = optimizer.fp32_groups
    else:
        return {}
    return {id(p): m for params, group in zip(groups, masters) for p, m in zip(params, group)}


def load_trainer_state(folder: Path) -> dict:
    path = folder / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {folder} is not a complete crate_lm checkpoint") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt ({err.msg}); resume from another checkpoint") from None


def check_compatible(folder: Path, cfg: RunConfig) -> RunConfig:
    """Refuse to resume a checkpoint of another architecture (the differing fields named);
    returns the checkpoint's own config. Runtime-only model settings may differ."""
    saved = read_checkpoint_config(folder)
    if architecture(saved.model) != architecture(cfg.model):
        diff = differing(architecture(cfg.model), architecture(saved.model), "model")
        raise CheckpointError(
            f"checkpoint {folder} is of another architecture ({', '.join(diff)} differ); "
            "use the model config it was trained with, or a new train.out_dir"
        )
    return saved


def load_rng(folder: Path, rank: int) -> dict | None:
    path = folder / f"rng_rank{rank:05d}.pt"
    return safe_torch_load(path) if path.is_file() else None


def _overlaps(lengths: list[int], start: int, stop: int) -> list[tuple[int, int, int, int]]:
    """Where [start, stop) of the vector that slices of ``lengths`` make end to end comes from:
    ``(old rank, from, to, at)`` copies that slice's [from, to) to ``at`` in the new slice."""
    out, offset = [], 0
    for r, n in enumerate(lengths):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((r, lo - offset, hi - offset, lo - start))
        offset += n
    return out


def load_zero12_resharded(engine, folder: Path) -> None:
    """Resume a ZeRO-1/2 checkpoint written by another number of ranks.

    DeepSpeed loads the module and refuses the optimizer shards of another world size (and its
    elastic path, in the version pinned here, does not restore Adam's moments exactly). Each
    saved shard is a rank's slice of one flat vector per parameter group, padded at its tail, so
    the old world's slices are joined, stripped of padding, and cut again for this world: fp32
    master weights, exp_avg, exp_avg_sq and the step count.

    Memory: shards are memory-mapped; their lengths come from tensor metadata, then each old
    shard that overlaps this rank's range is opened in turn and only the overlap is copied, so a
    rank holds about its own share plus (part of) one shard, never the whole optimizer state.
    """
    import torch.distributed as dist

    engine.load_checkpoint(
        str(folder.parent),
        tag=folder.name,
        load_module_only=True,
        load_optimizer_states=False,
        load_lr_scheduler_states=False,
    )
    states = safe_torch_load(folder / "mp_rank_00_model_states.pt", mmap=True)  # its weights stay unread
    engine.global_steps = states["global_steps"]
    engine.global_samples = states["global_samples"]
    engine.skipped_steps = states["skipped_steps"]
    del states

    def rank_of(path: Path) -> int:
        return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))

    def sources(sd: dict, i: int) -> dict[str, torch.Tensor]:
        state = sd["base_optimizer_state"]["state"][i]
        return {"master": sd["single_partition_of_fp32_groups"][i], "exp_avg": state["exp_avg"],
                "exp_avg_sq": state["exp_avg_sq"]}  # fmt: skip

    files = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=rank_of)
    zero = engine.optimizer
    groups = zero.optimizer.param_groups
    rank, world = dist.get_rank(), dist.get_world_size()
    # pass 1: every shard's unpadded lengths, from metadata only (no tensor data is read)
    lengths: list[list[dict[str, int]]] = []  # [old rank][group] -> {key: unpadded length}
    dtypes: list[dict[str, torch.dtype]] = []
    refused = not files
    for n, path in enumerate(files):
        sd = safe_torch_load(path, mmap=True)["optimizer_state_dict"]
        refused = refused or any(any(p) for p in sd.get("param_alignment_paddings", []))
        if refused:
            break
        per_group = []
        for i in range(len(groups)):
            pad = {"master": 0, "exp_avg": sd["group_paddings"][i], "exp_avg_sq": sd["group_paddings"][i]}
            per_group.append({k: t.numel() - pad[k] for k, t in sources(sd, i).items()})
            if n == 0:
                dtypes.append({k: t.dtype for k, t in sources(sd, i).items()})
        lengths.append(per_group)
        if n == 0:  # the step counts, as rank 0 saved them
            steps = [sd["base_optimizer_state"]["state"][i]["step"].clone() for i in range(len(groups))]
            group_steps = [sd["base_optimizer_state"]["param_groups"][i].get("step", 0) for i in range(len(groups))]
        del sd
    if refused:
        raise CheckpointError(
            f"{folder}: its ZeRO shards use a layout that cannot be re-partitioned; resume with the same number of ranks"
        )
    # this rank's range of each joined vector, and which parts of which shards fill it
    plans: dict[int, list[tuple[int, str, int, int, int]]] = {}  # old rank -> (group, key, from, to, at)
    out: list[dict[str, torch.Tensor]] = []
    for i, group in enumerate(groups):
        param = group["params"][0]  # this rank's flat fp32 partition of group i
        size = param.numel()
        out.append({})
        for key in ("master", "exp_avg", "exp_avg_sq"):
            sizes = [per_group[i][key] for per_group in lengths]
            if sum(sizes) > size * world:
                raise CheckpointError(
                    f"{folder}: its optimizer shards do not fit this model; resume with the same model"
                )
            out[i][key] = torch.zeros(size, dtype=dtypes[i][key], device=param.device)  # zeros: the tail padding
            for r, lo, hi, at in _overlaps(sizes, rank * size, (rank + 1) * size):
                plans.setdefault(r, []).append((i, key, lo, hi, at))
    # pass 2: open only the overlapping shards, one at a time, and copy only the overlaps
    with torch.no_grad():  # saved master weights require grad: a graph would keep each shard mapped
        for r in sorted(plans):
            sd = safe_torch_load(files[r], mmap=True)["optimizer_state_dict"]
            for i, key, lo, hi, at in plans[r]:
                out[i][key][at : at + hi - lo].copy_(sources(sd, i)[key].reshape(-1)[lo:hi])
            del sd
    chunk = 1 << 22  # allclose in chunks: its temporaries would be several times a rank's share
    for i in range(len(groups)):
        mine = zero.parallel_partitioned_bit16_groups[i][rank]
        master = out[i]["master"]
        if not all(
            torch.allclose(mine[j : j + chunk].float(), master[j : j + chunk], rtol=1e-2, atol=1e-2)
            for j in range(0, mine.numel(), chunk)
        ):
            raise CheckpointError(
                f"{folder}: re-partitioned weights disagree with the loaded module; resume with the same number of ranks"
            )
    for i, group in enumerate(groups):
        param = group["params"][0]
        param.data.copy_(out[i].pop("master"))
        state = zero.optimizer.state[param]
        state.update(out[i])
        state["step"] = steps[i]
        group["step"] = group_steps[i]


# ---- outside the training job ------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or a run folder's latest complete checkpoint."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = complete_checkpoints(path / "checkpoints")
        if not found:
            raise CheckpointError(f"{path}: no complete checkpoint under checkpoints/")
        return found[-1]
    return path


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_ZERO3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")


# ---- reading the weights of a checkpoint folder (consolidated, sharded, or DeepSpeed's files) -------


def _safetensors_items(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)  # backed by a memory map of the file
        except (FileNotFoundError, OSError) as err:
            raise CheckpointError(f"{path}: cannot be read ({err}); the folder is incomplete") from None
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt") from None


def read_index(folder: Path) -> dict:
    path = folder / INDEX
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except (json.JSONDecodeError, KeyError, AssertionError, TypeError) as err:
        raise CheckpointError(f"{path}: not a safetensors index ({err}); it is corrupt") from None
    return index


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding ``folder``'s weights: the shards an index names, or
    model.safetensors; [] when there are none (a checkpoint holding only DeepSpeed's files)."""
    if (folder / INDEX).is_file():
        return [folder / f for f in dict.fromkeys(read_index(folder)["weight_map"].values())]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    return []


def has_deepspeed_weights(folder: Path) -> bool:
    return (folder / "mp_rank_00_model_states.pt").is_file() or any(
        _ZERO3_MODEL.match(p.name) for p in folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")
    )


def checkpoint_weights(folder: Path, cfg: RunConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight of a checkpoint or exported folder, one at a time, from
    safetensors (memory-mapped) or, without them, from DeepSpeed's files (see the module doc)."""
    files = weight_files(folder)
    if files:
        return _safetensors_items(files)
    if any(_ZERO3_MODEL.match(p.name) for p in folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
        return zero3_weights(folder, cfg)
    if (folder / "mp_rank_00_model_states.pt").is_file():
        return _module_states(folder)
    raise CheckpointError(
        f"{folder} holds no weights (no {SINGLE}, no {INDEX}, no DeepSpeed model states); "
        "pass a checkpoint folder or an exported folder"
    )


def _module_states(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """ZeRO-0/1/2: DeepSpeed saved the whole module (in the dtype it computed with)."""
    states = safe_torch_load(folder / "mp_rank_00_model_states.pt", mmap=True)
    module = states.get("module") if isinstance(states, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{folder / 'mp_rank_00_model_states.pt'}: holds no module weights")
    for name, tensor in module.items():
        yield name, tensor.detach()


def zero3_weights(folder: Path, cfg: RunConfig | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Full parameters rebuilt from a ZeRO-3 checkpoint's per-rank fp32 partitions.

    Rank r holds, for every parameter of numel n, elements [r c, (r+1) c) of it (c = ceil(n / W),
    zero-padded at the end), laid end to end over its param groups in the order of
    ``param_shapes``. The files are memory-mapped and only one parameter is assembled at a time.
    In a bf16/fp16 run with ``checkpoint.weights: module`` the fp32 masters are cast to the
    module's dtype: exactly the weights the module computed with (DeepSpeed copies them so)."""
    def rank_of(p: Path) -> int:
        return int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1))

    models = sorted((p for p in folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt") if _ZERO3_MODEL.match(p.name)),
                    key=rank_of)  # fmt: skip
    optims = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=rank_of)
    world = len(models)
    if len(optims) != world or [rank_of(p) for p in optims] != list(range(world)):
        raise CheckpointError(
            f"{folder}: {world} ZeRO-3 model state files but {len(optims)} optimizer state files; "
            "the checkpoint is incomplete, use another one"
        )
    first = safe_torch_load(models[0], mmap=True)
    shapes = {k: v for group in first["param_shapes"] for k, v in group.items()}  # ordered as partitioned
    buffers = {k: v for k, v in first.get("module", {}).items() if k in set(first.get("buffer_names") or [])}
    del first
    flats = []  # [rank][group] flat fp32 partition (memory-mapped)
    for path in optims:
        sd = safe_torch_load(path, mmap=True)["optimizer_state_dict"]
        groups = sd.get("fp32_flat_groups")
        if groups is None:
            raise CheckpointError(f"{path}: no fp32_flat_groups; not a ZeRO-3 optimizer state file")
        flats.append(list(groups))
    sizes = [g.numel() for g in flats[0]]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    cast = None
    if cfg is not None and cfg.deepspeed.precision != "fp32" and cfg.checkpoint.weights == "module":
        cast = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float16
    offset = 0
    for name, shape in shapes.items():
        shape = torch.Size(shape)
        numel = shape.numel()
        part = math.ceil(numel / world)
        end = offset + part
        if end > starts[-1]:
            raise CheckpointError(f"{folder}: its ZeRO-3 partitions are shorter than the parameters they should hold")
        chunks = []
        for rank in range(world):
            for g in range(len(sizes)):
                lo, hi = max(offset, starts[g]), min(end, starts[g + 1])
                if lo < hi:
                    chunks.append(flats[rank][g].reshape(-1)[lo - starts[g] : hi - starts[g]])
        with torch.no_grad():
            full = torch.cat(chunks)[:numel].view(shape).clone()
        yield name, (full.to(cast) if cast is not None else full)
        offset = end
    yield from buffers.items()


def check_model_folder(folder: Path) -> None:
    """A CheckpointError unless ``folder`` holds config.yaml and weights (consolidated, sharded or DeepSpeed's)."""
    if not (folder / "config.yaml").is_file() or not (weight_files(folder) or has_deepspeed_weights(folder)):
        raise CheckpointError(
            f"{folder} is not a crate_lm checkpoint (needs config.yaml and model.safetensors, "
            "model.safetensors.index.json with its shards, or DeepSpeed's model states)"
        )


def _load_weights(
    folder: Path, cfg: RunConfig, device: str | torch.device, dtype: torch.dtype | None
) -> torch.nn.Module:
    """The model of ``cfg`` with ``folder``'s weights, in eval mode on device/dtype.

    The module tree is built on the meta device (no memory, no init) and the weights are
    assigned from memory-mapped safetensors (or DeepSpeed's files, see
    ``checkpoint_weights``): peak memory is about one copy of the weights. The
    model has no buffers and no tied parameter entries (the LM head reads ``tok_emb.weight``),
    so every entry of its state dict comes from the files."""
    from crate_lm.model import build_model

    config = folder / "config.yaml"
    model = build_model(cfg.model, device="meta")
    own = model.state_dict()
    state = {}
    for name, tensor in checkpoint_weights(folder, cfg):
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)  # one tensor at a time: never two copies of the model
        state[name] = tensor
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"the weights in {folder} do not fit the model in {config} (missing: {missing[:3]}, "
            f"unexpected: {unexpected[:3]}, other shapes: {wrong[:3]}): the config file does not describe them; "
            "restore the checkpoint's own config.yaml"
        )
    model.load_state_dict(state, assign=True)
    del state
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{folder}: no weights for {left[:3]}")
    model.to(device=device).eval()
    return model


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[torch.nn.Module, RunConfig]:
    """Load a trained model in one call from a checkpoint folder (or a run folder: its latest
    complete checkpoint). Returns ``(model, run_config)``; the model is in eval mode. ``load``
    gives the tokenizer too."""
    folder = resolve_checkpoint(path)
    check_model_folder(folder)
    cfg = read_checkpoint_config(folder)
    return _load_weights(folder, cfg, device, _as_dtype(dtype)), cfg


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise CheckpointError(f"dtype {dtype!r} is not a torch dtype; pass e.g. torch.bfloat16 or 'float32'")
    return found


def _is_checkpoint(folder: Path) -> bool:
    """A training checkpoint (which must carry its trainer state), not an exported folder."""
    return (folder / COMPLETE).is_file() or bool(TAG_PATTERN.match(folder.name))


def _expected_fingerprint(folder: Path) -> str | None:
    """The tokenizer fingerprint the checkpoint recorded (None: an exported folder without one)."""
    if not _is_checkpoint(folder) and not (folder / "trainer_state.json").is_file():
        return None
    return load_trainer_state(folder).get("tokenizer_fingerprint")


def _search_bases(folder: Path) -> list[Path]:
    """Where a run's relative data paths may be relative to: the current directory, then the
    checkpoint's folder and every folder above it (a run trained from ``repo`` with
    ``data/...`` paths, its folder at ``repo/runs/x``, finds them in ``repo``)."""
    bases = [Path.cwd(), folder.resolve(), *folder.resolve().parents]
    return list(dict.fromkeys(bases))


def resolve_run_data(folder: Path, written: str) -> Path:
    """A run's prepared data folder (as its config wrote it: ``data.path[0]``), as written or
    under one of ``_search_bases``; a one-line CheckpointError when it is nowhere to be found."""
    raw = Path(written).expanduser()
    for root in [raw] if raw.is_absolute() else [base / raw for base in _search_bases(Path(folder))]:
        if (root / "meta.json").is_file():
            return root
    raise CheckpointError(
        f"the run's data ({raw}) is found neither from here nor above {folder}; pass --data SHARDS_OR_TEXT"
    )


def _run_tokenizer_candidates(folder: Path, cfg: RunConfig) -> tuple[list[Path], str]:
    """Paths where the run's own tokenizer may be (existing ones only, most likely first), and
    what was looked for (for the error that none was found)."""
    from crate_lm.data import DataError, read_meta

    bases = _search_bases(folder)

    def under(raw: str) -> list[Path]:
        path = Path(raw).expanduser()
        return [path] if path.is_absolute() else [base / path for base in bases]

    if cfg.data.tokenizer:
        wanted = f"data.tokenizer {cfg.data.tokenizer}"
        found = [p for p in under(cfg.data.tokenizer) if p.exists()]
    else:
        wanted = f"the tokenizer named by {' / '.join(str(Path(d) / 'meta.json') for d in cfg.data.path)}"
        found = []
        for data in cfg.data.path:
            for root in under(data):
                if not (root / "meta.json").is_file():
                    continue
                try:
                    recorded = read_meta(root)["tokenizer"].get("path")
                except DataError:
                    continue
                if recorded:
                    found += [p for p in under(recorded) if p.exists()]
    return list(dict.fromkeys(found)), wanted


def _resolve_tokenizer(folder: Path, cfg: RunConfig, tokenizer: Tokenizer | str | Path | None) -> Tokenizer:
    """The checkpoint's tokenizer (see ``load``), checked against its recorded fingerprint."""
    from crate_lm.data import DataError, Tokenizer, load_tokenizer

    expected = _expected_fingerprint(folder)

    def checked(tok: Tokenizer, where: str) -> Tokenizer:
        if expected and tok.fingerprint != expected:
            raise CheckpointError(
                f"{folder} was trained with tokenizer {expected}, but {where} is {tok.fingerprint}; "
                "pass tokenizer= the tokenizer the run used"
            )
        if tok.vocab_size > cfg.model.vocab_size:
            raise CheckpointError(
                f"{where} has {tok.vocab_size} tokens, more than the model's embedding (model.vocab_size="
                f"{cfg.model.vocab_size}) in {folder}; pass tokenizer= the tokenizer the run used"
            )
        return tok

    if isinstance(tokenizer, Tokenizer):
        return checked(tokenizer, f"the tokenizer passed ({tokenizer.path})")
    if tokenizer is not None:
        return checked(load_tokenizer(tokenizer), str(tokenizer))
    own = folder / TOKENIZER_DIR
    if own.is_dir():
        return checked(load_tokenizer(own), str(own))
    candidates, wanted = _run_tokenizer_candidates(folder, cfg)
    first: tuple[Tokenizer, Path] | None = None
    for path in candidates:
        try:
            tok = load_tokenizer(path)
        except DataError:
            continue
        if not expected or tok.fingerprint == expected:
            return checked(tok, str(path))
        first = first or (tok, path)
    if first is not None:
        return checked(first[0], str(first[1]))  # raises: the fingerprint differs
    raise CheckpointError(
        f"no tokenizer for {folder}: it has no {TOKENIZER_DIR}/ folder (saved before checkpoints carried one) and "
        f"{wanted} is found neither from {Path.cwd()} nor from any folder above the checkpoint; "
        "pass tokenizer= (crate-lm generate: --tokenizer) the tokenizer file or folder the run trained with"
    )


def load_run_tokenizer(
    path: str | Path, cfg: RunConfig | None = None, tokenizer: Tokenizer | str | Path | None = None
) -> Tokenizer:
    """The tokenizer a checkpoint (or a run folder's latest) was trained with, found as ``load``
    finds it and checked against the fingerprint the checkpoint saved."""
    folder = resolve_checkpoint(path)
    if cfg is None:
        try:
            cfg = load_run_config(folder / "config.yaml")
        except ConfigError as err:
            raise CheckpointError(f"{folder / 'config.yaml'}: {err}") from None
    return _resolve_tokenizer(folder, cfg, tokenizer)


@dataclass
class LoadedModel:
    """A trained model with everything needed to use it: ``model`` (eval mode), ``tokenizer``,
    ``cfg`` (its run config) and ``path`` (the checkpoint folder it came from).

    Calling it calls the model: ``lm(lm.to_tokens("Hello")).logits``.
    """

    model: torch.nn.Module
    tokenizer: Tokenizer
    cfg: RunConfig
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        """The id padding a batch: the tokenizer's pad token, else (tokenizers without one) end-of-document."""
        pad = self.tokenizer.specials.get("pad")
        return pad if pad is not None else self.tokenizer.eod_id

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def to_tokens(
        self, text: str | Sequence[str], prepend_eod: bool = False, return_mask: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Token ids on the model's device: (1, T) for a string; (B, T) for a list of strings,
        right-padded with ``pad_id``. ``prepend_eod`` starts each with the end-of-document token
        (the model's document start). ``return_mask``: also the (B, T) bool mask, True on real
        tokens, to pass as ``attention_mask`` and to ``to_string``."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("to_tokens takes a string or a non-empty list of strings")
        rows = self.tokenizer.encode_batch(texts) if len(texts) > 1 else [self.tokenizer.encode(texts[0])]
        if prepend_eod:
            rows = [[self.tokenizer.eod_id, *row] for row in rows]
        width = max(len(row) for row in rows)
        pad = self.pad_id if width > min(len(row) for row in rows) else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        return (ids, mask) if return_mask else ids

    def to_string(self, ids: torch.Tensor | Sequence, mask: torch.Tensor | Sequence | None = None) -> str | list[str]:
        """Text of token ids: a string for one sequence (1-D), a list for a batch (2-D). Positions
        where ``mask`` is False are dropped; without a mask, the tokenizer's pad tokens are."""
        rows, single = _as_rows(ids, "ids")
        if mask is not None:
            keeps, _ = _as_rows(mask, "mask")
            if [len(k) for k in keeps] != [len(r) for r in rows]:
                raise ValueError("to_string: mask and ids differ in shape")
        else:
            pad = self.tokenizer.specials.get("pad")
            keeps = [[i != pad for i in row] for row in rows]
        texts = [self.tokenizer.decode([i for i, k in zip(row, keep) if k]) for row, keep in zip(rows, keeps)]
        return texts[0] if single else texts


def _as_rows(x: torch.Tensor | Sequence, what: str) -> tuple[list[list[int]], bool]:
    """(rows of ints, whether ``x`` was one sequence) of a 1-D or 2-D tensor, array or list
    (a list of rows may be ragged)."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(x).detach().cpu()
        if t.dim() > 2:
            raise ValueError(f"to_string takes 1-D or 2-D {what}, got shape {tuple(t.shape)}")
        return ([t.reshape(-1).tolist()] if t.dim() < 2 else t.tolist()), t.dim() < 2
    items = list(x)
    nested = [not isinstance(i, (int, np.integer, np.bool_)) and torch.as_tensor(i).dim() > 0 for i in items]
    if not any(nested):
        return [[int(i) for i in items]], True
    return [[int(i) for i in torch.as_tensor(row).reshape(-1).tolist()] for row in items], False


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    tokenizer: Tokenizer | str | Path | None = None,
) -> LoadedModel:
    """Open a trained model with its tokenizer, from any working directory.

    ``path``: a run folder (its latest complete checkpoint), a checkpoint folder, or an exported
    folder (model.safetensors and config.yaml, optionally tokenizer/). The tokenizer is, in order:
    ``tokenizer`` (a Tokenizer, or a tokenizer file or folder); the checkpoint's ``tokenizer/``;
    for checkpoints saved before they carried one, the run's ``data.tokenizer`` (else the one its
    data's meta.json names), relative paths tried from the current directory and from each folder
    above the checkpoint. It must have the fingerprint the checkpoint recorded. The model is in
    eval mode on ``device`` in ``dtype`` (default: as saved, usually float32).
    """
    folder = resolve_checkpoint(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    check_model_folder(folder)
    cfg = read_checkpoint_config(folder)
    tok = _resolve_tokenizer(folder, cfg, tokenizer)
    model = _load_weights(folder, cfg, device, _as_dtype(dtype))
    return LoadedModel(model=model, tokenizer=tok, cfg=cfg, path=folder)


__all__ = [
    "CheckpointError",
    "LoadedModel",
    "check_compatible",
    "check_model_folder",
    "complete_checkpoints",
    "load",
    "load_model",
    "load_run_tokenizer",
    "save_checkpoint",
    "write_tokenizer",
]
