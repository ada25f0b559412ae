"""Exporting a trained model: sharded safetensors with an index, a Hugging Face folder, and
reading the weights of any checkpoint, DeepSpeed's ZeRO files included, offline.

Layout of an export (``crate-lm export RUN --out DIR``), Hugging Face's sharded layout::

    DIR/
        model-00001-of-00003.safetensors ...   each shard's metadata records the architecture
                                                (``crate_lm.checkpoint.weights_metadata``)
        model.safetensors.index.json           {"metadata": {"total_size": bytes},
                                                "weight_map": {param: file}}
        config.yaml                            the run config (``crate_lm.load`` reads it)
        tokenizer/                             the run's tokenizer (``write_tokenizer``)
    and with ``--format hf`` also: config.json (auto_map), configuration_crate.py,
    modeling_crate.py (self-contained: torch + transformers), tokenizer.json,
    tokenizer_config.json, special_tokens_map.json (see ``crate_lm.hf``).

Where the weights come from (``checkpoint_weights``, in this order): an index with shards, one
``model.safetensors``, or DeepSpeed's files: ZeRO-3's per-rank ``zero_pp_rank_*_optim_states.pt``
(the fp32 partitions, zipped back parameter by parameter, as ``deepspeed.utils.zero_to_fp32``
does, but one parameter at a time from memory-mapped files: no GPU, no process group, never the
whole model in memory), or ZeRO-0/1/2's ``mp_rank_00_model_states.pt`` (the whole module).
An export is written into a temporary folder next to ``DIR`` and renamed into place.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from crate_lm.checkpoint import (
    INDEX,
    CheckpointError,
    checkpoint_weights,
    read_checkpoint_config,
    resolve_checkpoint,
    weights_metadata,
    write_tokenizer,
)
from crate_lm.config import dump_run_config
from crate_lm.fsutil import atomic_write_bytes, atomic_write_json

FORMATS = ("native", "hf")
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


class ExportError(CheckpointError):
    """An export cannot be done as asked; the message says why and what to do."""


def parse_size(size: int | str) -> int:
    """Bytes of ``2GB``, ``500MB``, ``1.5GiB`` or a plain number of bytes (decimal units as
    Hugging Face reads them: GB = 10^9; GiB = 2^30)."""
    if isinstance(size, bool):
        raise ExportError(f"--max_shard_size must be a size such as 2GB or 500MB, got {size!r}")
    if isinstance(size, int):
        value, unit = float(size), ""
    else:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not found or found.group(2).lower() not in _UNITS:
            raise ExportError(f"--max_shard_size must be a size such as 2GB, 500MB or 1GiB, got {size!r}")
        value, unit = float(found.group(1)), found.group(2).lower()
    total = int(value * _UNITS[unit])
    if total < 1:
        raise ExportError(f"--max_shard_size must be at least 1 byte, got {size!r}")
    return total


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if found is None:
        raise ExportError(f"--dtype must be one of fp32, bf16, fp16 (or float32, bfloat16, float16), got {dtype!r}")
    return found


# ---- writing ----------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ShardWriter:
    """Tensors into ``model-0000k-of-0000N.safetensors`` files of at most ``max_bytes`` each (a
    tensor larger than that gets a file of its own), then the index. Holds one shard in memory."""

    def __init__(self, folder: Path, max_bytes: int, metadata: dict[str, str]) -> None:
        self.folder, self.max_bytes, self.metadata = folder, max_bytes, metadata
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file name, its tensors)
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        tmp = f".shard-{len(self.written) + 1:05d}.tmp"
        save_file(self.pending, str(self.folder / tmp), metadata=self.metadata)
        self.written.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> dict:
        self.flush()
        n = len(self.written)
        weight_map = {}
        for k, (tmp, names) in enumerate(self.written, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.chmod(self.folder / tmp, 0o644 & ~_umask())  # safetensors creates its files private
            os.replace(self.folder / tmp, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        atomic_write_json(self.folder / INDEX, index)
        return index


def export(
    run: str | Path,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "2GB",
    fmt: str = "native",
    overwrite: bool = False,
) -> dict:
    """Write the weights of ``run`` (a run folder: its newest complete checkpoint; a checkpoint
    folder; an exported folder) as sharded safetensors with an index, its config.yaml and its
    tokenizer into ``out`` (``fmt="hf"``: a Hugging Face folder as well). ``dtype`` casts the
    weights (default: as saved). Returns a summary (folder, files, tensors, bytes, dtype)."""
    from crate_lm.checkpoint import _resolve_tokenizer

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    max_bytes = parse_size(max_shard_size)
    cast = parse_dtype(dtype)
    path = Path(run)
    if not path.is_dir():
        raise ExportError(f"{run}: no such run or checkpoint folder")
    folder = resolve_checkpoint(path)
    if not (folder / "config.yaml").is_file():
        raise ExportError(f"{folder} is not a crate_lm checkpoint (no config.yaml)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out} is inside the checkpoint being exported; choose a folder outside it")
    cfg = read_checkpoint_config(folder)
    tokenizer = _resolve_tokenizer(folder, cfg, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        writer: ShardWriter | None = None
        dtypes = set()
        for name, tensor in checkpoint_weights(folder, cfg):
            if cast is not None and tensor.is_floating_point():
                tensor = tensor.to(cast)
            if tensor.is_floating_point():
                dtypes.add(tensor.dtype)
            if writer is None:
                writer = ShardWriter(tmp, max_bytes, {})
            writer.metadata = weights_metadata(cfg, next(iter(dtypes)) if len(dtypes) == 1 else None)
            writer.add(name, tensor)
        if writer is None:
            raise ExportError(f"{folder}: holds no weights")
        index = writer.finish()
        atomic_write_bytes(tmp / "config.yaml", dump_run_config(cfg).encode())
        write_tokenizer(tmp, tokenizer)
        if fmt == "hf":
            from crate_lm.hf import write_hf_files

            write_hf_files(tmp, cfg, tokenizer, dtype=next(iter(dtypes)) if len(dtypes) == 1 else torch.float32)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(set(index["weight_map"].values()))
    return {
        "source": str(folder),
        "out": str(out),
        "format": fmt,
        "files": len(files),
        "tensors": len(index["weight_map"]),
        "total_size": index["metadata"]["total_size"],
        "dtype": str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "mixed",
    }


__all__ = ["ExportError", "export", "parse_dtype", "parse_size"]
