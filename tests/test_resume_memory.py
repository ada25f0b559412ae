"""Resuming ZeRO-1/2 on another number of ranks reads only what a rank needs.

``load_zero12_resharded`` is run here on ZeRO-2 shard files in DeepSpeed's layout (per group:
unpadded fp32 master slice, padded Adam moments, ``group_paddings``) and a stand-in for the
engine, as rank r of a new world. Its result must equal cutting the full joined vectors, and it
may read tensor data only from the old shards that overlap rank r's range, only the overlap.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.zero.config import ZeroStageEnum

from crate_lm import checkpoint as ckpt
from crate_lm.checkpoint import CheckpointError, _overlaps, load_zero12_resharded, safe_torch_load

ALIGN = 4  # partitions are padded so the group's flat length divides world x ALIGN
KEYS = ("master", "exp_avg", "exp_avg_sq")
REAL_LOAD = ckpt.safe_torch_load


def partition(n: int, world: int) -> tuple[int, list[int]]:
    """DeepSpeed's split of n elements: partition size, and each rank's unpadded length."""
    size = math.ceil(n / (world * ALIGN)) * ALIGN
    return size, [max(0, min(size, n - r * size)) for r in range(world)]


def truth(numels: list[int]) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{k: torch.randn(n, generator=gen) for k in KEYS} for n in numels]


def write_checkpoint(folder: Path, full: list[dict[str, torch.Tensor]], world: int, **changes) -> None:
    folder.mkdir(parents=True)
    torch.save({"global_steps": 3, "global_samples": 24, "skipped_steps": 0, "module": torch.randn(64)},
               folder / "mp_rank_00_model_states.pt")  # fmt: skip
    for r in range(world):
        masters, state, paddings = [], {}, []
        for i, vectors in enumerate(full):
            size, lean = partition(vectors["master"].numel(), world)
            part = {k: torch.full((size,), 7.0) for k in KEYS}  # the padding holds garbage: it must be cut off
            for k in KEYS:
                part[k][: lean[r]] = vectors[k][r * size : r * size + lean[r]]
            masters.append(part["master"][: lean[r]])  # DeepSpeed saves the master weights unpadded
            state[i] = {"step": torch.tensor(5.0), "exp_avg": part["exp_avg"], "exp_avg_sq": part["exp_avg_sq"]}
            paddings.append(size - lean[r])
        sd = {
            "single_partition_of_fp32_groups": masters,
            "base_optimizer_state": {"state": state, "param_groups": [{"params": [i], "step": 5} for i in state]},
            "group_paddings": paddings,
            "param_alignment_paddings": [[0] for _ in full],
            "zero_stage": ZeroStageEnum.gradients,
            **changes,
        }
        torch.save({"optimizer_state_dict": sd}, folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


def fake_engine(full: list[dict[str, torch.Tensor]], rank: int, world: int, shrink: int = 0):
    """What load_zero12_resharded uses of a ZeRO-1/2 engine, as rank ``rank`` of ``world`` sees it."""
    groups, state, bit16 = [], {}, []
    for vectors in full:
        size = partition(vectors["master"].numel(), world)[0] - shrink
        param = torch.nn.Parameter(torch.zeros(size))
        groups.append({"params": [param], "step": 0})
        state[param] = {"exp_avg": torch.zeros(size), "exp_avg_sq": torch.zeros(size), "step": torch.tensor(0.0)}
        weights = torch.zeros(size * world)
        n = min(vectors["master"].numel(), size * world)
        weights[:n] = vectors["master"][:n]
        bit16.append(list(weights.split(size)))
    zero = SimpleNamespace(optimizer=SimpleNamespace(param_groups=groups, state=state),
                           parallel_partitioned_bit16_groups=bit16)  # fmt: skip
    return SimpleNamespace(optimizer=zero, load_checkpoint=lambda *args, **kwargs: None)


class Watched(torch.Tensor):
    """A shard's tensor that logs every op reading its data (metadata such as numel is free);
    ``owner`` maps each shard tensor's storage to the old rank whose file holds it."""

    log: list = []
    owner: dict = {}
    FREE = {"numel", "__get__", "dim", "size", "reshape", "view", "__getitem__", "untyped_storage"}  # no data read

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") not in cls.FREE:
            for arg in torch.utils._pytree.tree_leaves((args, kwargs)):  # lists too, as torch.cat takes
                if isinstance(arg, Watched):
                    with torch._C.DisableTorchFunctionSubclass():
                        rank = Watched.owner.get(arg.untyped_storage().data_ptr())  # None: a result, not a shard
                        if rank is not None:
                            Watched.log.append((rank, arg.numel()))
        return super().__torch_function__(func, types, args, kwargs or {})


def watching_loader(monkeypatch) -> list:
    """Make the optimizer shards' tensors log their reads; returns the log of (old rank, elements)."""
    Watched.log, Watched.owner = [], {}

    def watched(t: torch.Tensor, rank: int) -> torch.Tensor:
        Watched.owner[t.untyped_storage().data_ptr()] = rank
        return t.as_subclass(Watched)

    def load(path, map_location="cpu", mmap=False):
        out = REAL_LOAD(path, map_location=map_location, mmap=mmap)
        found = re.search(r"zero_pp_rank_(\d+)_", Path(path).name)
        if found:
            r, sd = int(found.group(1)), out["optimizer_state_dict"]
            sd["single_partition_of_fp32_groups"] = [watched(t, r) for t in sd["single_partition_of_fp32_groups"]]
            for s in sd["base_optimizer_state"]["state"].values():
                s["exp_avg"], s["exp_avg_sq"] = watched(s["exp_avg"], r), watched(s["exp_avg_sq"], r)
        return out

    monkeypatch.setattr(ckpt, "safe_torch_load", load)
    return Watched.log


def as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: world)


def test_overlaps_of_old_slices_with_a_new_rank_range():
    # old slices of 5, 5, 3 elements; a new world of 2 with partitions of 7 (the last one padded)
    assert _overlaps([5, 5, 3], 0, 7) == [(0, 0, 5, 0), (1, 0, 2, 5)]
    assert _overlaps([5, 5, 3], 7, 14) == [(1, 2, 5, 0), (2, 0, 3, 3)]
    assert _overlaps([5, 0, 3], 4, 6) == [(0, 4, 5, 0), (2, 0, 1, 1)]  # an empty old slice is skipped
    assert _overlaps([4], 8, 12) == []  # all padding


@pytest.mark.parametrize("old_world,new_world", [(1, 2), (2, 1), (3, 2), (2, 3), (4, 3)])
def test_reshard_equals_cutting_the_joined_vectors_and_reads_only_the_overlaps(
    old_world, new_world, tmp_path, monkeypatch
):
    full = truth([37, 10])
    folder = tmp_path / "step_00000003"
    write_checkpoint(folder, full, old_world)
    for rank in range(new_world):
        as_rank(monkeypatch, rank, new_world)
        log = watching_loader(monkeypatch)
        engine = fake_engine(full, rank, new_world)
        load_zero12_resharded(engine, folder)

        expected_reads: dict[int, int] = {}
        for i, (group, vectors) in enumerate(zip(engine.optimizer.optimizer.param_groups, full)):
            param = group["params"][0]
            size, n = param.numel(), vectors["master"].numel()
            state = engine.optimizer.optimizer.state[param]
            got = {"master": param.data, "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
            for key in KEYS:
                padded = torch.zeros(size * new_world)
                padded[:n] = vectors[key]
                assert torch.equal(got[key], padded[rank * size : (rank + 1) * size]), (rank, i, key)
            assert torch.equal(state["step"], torch.tensor(5.0)) and group["step"] == 5
            old_lengths = partition(n, old_world)[1]
            for r, lo, hi, _ in _overlaps(old_lengths, rank * size, (rank + 1) * size):
                expected_reads[r] = expected_reads.get(r, 0) + 3 * (hi - lo)
        reads: dict[int, int] = {}
        for r, numel in log:
            reads[r] = reads.get(r, 0) + numel
        assert reads == expected_reads, f"rank {rank} read {reads}, needs {expected_reads}"
        assert engine.global_steps == 3 and engine.global_samples == 24


def test_a_rank_reads_no_data_of_shards_outside_its_range(tmp_path, monkeypatch):
    """1 group of 64 elements saved by 4 ranks (16 each), resumed by 2 (32 each)."""
    full = truth([64])
    folder = tmp_path / "step_00000003"
    write_checkpoint(folder, full, 4)
    for rank, needed in ((0, {0, 1}), (1, {2, 3})):
        as_rank(monkeypatch, rank, 2)
        log = watching_loader(monkeypatch)
        load_zero12_resharded(fake_engine(full, rank, 2), folder)
        assert {r for r, _ in log} == needed
        assert sum(n for _, n in log) == 3 * 32  # master, exp_avg, exp_avg_sq: its own share only


def test_refusals_are_kept(tmp_path, monkeypatch):
    full = truth([37])
    as_rank(monkeypatch, 0, 2)
    write_checkpoint(tmp_path / "a" / "step_00000003", full, 1, param_alignment_paddings=[[0, 2]])
    with pytest.raises(CheckpointError, match="layout that cannot be re-partitioned"):
        load_zero12_resharded(fake_engine(full, 0, 2), tmp_path / "a" / "step_00000003")
    write_checkpoint(tmp_path / "b" / "step_00000003", full, 1)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_zero12_resharded(fake_engine(full, 0, 2, shrink=4), tmp_path / "b" / "step_00000003")
    other = truth([37])
    other[0]["master"] += 1.0
    engine = fake_engine(other, 0, 2)
    with pytest.raises(CheckpointError, match="disagree with the loaded module"):
        load_zero12_resharded(engine, tmp_path / "b" / "step_00000003")
    param = engine.optimizer.optimizer.param_groups[0]["params"][0]
    assert not param.data.any(), "a refused resume changes nothing"
    write_checkpoint(tmp_path / "c" / "step_00000003", full, 0)  # no optimizer shards at all
    with pytest.raises(CheckpointError, match="layout that cannot be re-partitioned"):
        load_zero12_resharded(fake_engine(full, 0, 2), tmp_path / "c" / "step_00000003")


def test_safe_mmap_load_keeps_the_allowlist_and_the_refusals(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    path = tmp_path / "shard.pt"
    torch.save({"t": torch.arange(1000.0), "stage": ZeroStageEnum.gradients, "scaler": LossScaler(1.0)}, path)
    loaded = safe_torch_load(path, mmap=True)
    assert torch.equal(loaded["t"][10:20], torch.arange(10.0, 20.0)) and loaded["stage"] == ZeroStageEnum.gradients
    legacy = tmp_path / "legacy.pt"  # not a zip file: cannot be mapped, is read whole
    torch.save({"t": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(safe_torch_load(legacy, mmap=True)["t"], torch.ones(3))
    from tests.test_train import RunsCode

    torch.save(RunsCode(), tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        safe_torch_load(tmp_path / "code.pt", mmap=True)
    with pytest.raises(CheckpointError, match="file missing"):
        safe_torch_load(tmp_path / "nope.pt", mmap=True)
