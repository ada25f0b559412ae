"""When to save, what to resume from, what to keep: the checkpoint policy of a run.

The folder format itself (what a checkpoint holds, how it is written and read safely) lives in
``crate_lm.checkpoint``; this class decides. Every choice is made by rank 0 and broadcast, so
all ranks load the same step even when their views of a shared filesystem differ.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from crate_lm import checkpoint as ckpt
from crate_lm.config import ConfigError, RunConfig, to_dict
from crate_lm.data import DataError, Tokenizer

# where the run folder moved, or how it is resumed, is no change of the run
_NOT_SETTINGS = ("train.out_dir", "checkpoint.resume")


def changed_settings(saved: RunConfig, cfg: RunConfig) -> list[str]:
    """``section.key old -> new`` for every setting that differs between two run configs."""
    out = []
    for section, values in to_dict(cfg).items():
        old = to_dict(saved)[section]
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in _NOT_SETTINGS and old.get(key) != value:
                out.append(f"{name} {old.get(key)!r} -> {value!r}")
    return out


class Checkpointer:
    def __init__(self, cfg: RunConfig, rank: int, world: int) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.root = Path(cfg.train.out_dir) / "checkpoints"

    def should_save(self, step: int) -> bool:
        return step % self.cfg.checkpoint.interval == 0

    # ---- resume ----
    def choose(self) -> tuple[Path | None, list[Path]]:
        """The checkpoint to resume (None: start fresh) and the newer unsound ones passed over."""
        choice = [None, [], None]
        if self.rank == 0:
            try:
                choice = [*self._choose_here(), None]
            except ckpt.CheckpointError as err:
                choice = [None, [], str(err)]  # every rank raises it, none waits on the others
        dist.broadcast_object_list(choice, src=0)
        folder, skipped, error = choice
        if error:
            raise ckpt.CheckpointError(error)
        return (Path(folder) if folder else None), [Path(p) for p in skipped]

    def _choose_here(self) -> list:
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return [None, []]
        if resume != "auto":
            folder = Path(resume)
            if not (folder / ckpt.COMPLETE).is_file():
                raise ckpt.CheckpointError(f"{folder} is not a complete checkpoint (no {ckpt.COMPLETE} marker)")
            return [str(folder), []]
        found = ckpt.complete_checkpoints(self.root)
        skipped = []
        for folder in reversed(found):
            if is_sound(folder):
                return [str(folder), [str(p) for p in skipped]]
            skipped.append(folder)
        if skipped:
            raise ckpt.CheckpointError(
                f"every checkpoint in {self.root} was saved while the run was diverging; resume one of them "
                "explicitly with --checkpoint.resume PATH, or start a new train.out_dir"
            )
        return [None, []]

    def compatible(self, folder: Path, cfg: RunConfig, *, fingerprint: str, global_batch: int, seq_len: int) -> tuple:
        """Check that ``cfg`` can continue ``folder``; returns (its config, its trainer state).
        Raises a one-line error for anything that cannot continue."""
        saved_cfg = ckpt.check_compatible(folder, cfg)
        saved = ckpt.load_trainer_state(folder)
        if saved.get("tokenizer_fingerprint") != fingerprint:
            raise DataError(
                f"checkpoint {folder} was trained on data of tokenizer {saved.get('tokenizer_fingerprint')}, "
                f"but this run's data uses {fingerprint}; point data.path at data of the same tokenizer"
            )
        if saved["global_batch"] != global_batch or saved["seq_len"] != seq_len:
            raise ConfigError(
                f"checkpoint {folder} used global batch {saved['global_batch']} x seq {saved['seq_len']}; "
                f"this run has {global_batch} x {seq_len}: keep them equal to continue the same sample order"
            )
        old, new = saved_cfg.deepspeed, cfg.deepspeed
        if (old.zero_stage, old.precision) != (new.zero_stage, new.precision):
            raise ConfigError(
                f"checkpoint {folder} holds ZeRO-{old.zero_stage} {old.precision} optimizer state; this run asks for "
                f"ZeRO-{new.zero_stage} {new.precision}, which cannot read it. Keep deepspeed.zero_stage "
                f"{old.zero_stage} and deepspeed.precision {old.precision}, or start a new train.out_dir"
            )
        if saved["world_size"] != self.world and new.zero_stage == 3:
            raise ckpt.CheckpointError(
                f"checkpoint {folder} was saved by {saved['world_size']} ranks; DeepSpeed cannot re-partition "
                f"ZeRO-3 optimizer state for {self.world} ranks. Resume with {saved['world_size']} ranks"
            )
        return saved_cfg, saved

    def resume(self, engine, folder: Path, saved: dict) -> None:
        """Load model, optimizer and RNG state (re-partitioned for a new number of ranks)."""
        same_world = saved["world_size"] == self.world
        if not same_world and self.cfg.deepspeed.zero_stage in (1, 2):
            ckpt.load_zero12_resharded(engine, folder)
        else:
            load_path, _ = engine.load_checkpoint(
                str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if load_path is None:
                raise ckpt.CheckpointError(f"DeepSpeed could not load {folder}")
        rng = ckpt.load_rng(folder, self.rank) if same_world else None
        if rng is not None:
            ckpt.restore_rng(rng)
        else:  # a new world size: each rank's RNG restarts from (seed, step, rank)
            torch.manual_seed(self.cfg.train.seed + 1000003 * saved["step"] + self.rank)

    # ---- save and prune ----
    def save(self, engine, step: int, trainer_state: dict, tokenizer: Tokenizer | None = None) -> Path:
        """Save (a collective), the run's ``tokenizer`` into the checkpoint too, then prune."""
        folder = ckpt.save_checkpoint(engine, self.root, step, trainer_state, self.cfg, tokenizer)
        if self.rank == 0:
            self.prune()
        dist.barrier()
        return folder

    def prune(self) -> list[Path]:
        """Remove all but the last ``keep_last`` complete checkpoints, never the newest sound one."""
        keep_last = self.cfg.checkpoint.keep_last
        found = ckpt.complete_checkpoints(self.root)
        if keep_last == 0 or len(found) <= keep_last:
            return []
        keep = set(found[-keep_last:])
        sound = self.newest_sound()
        if sound is not None:
            keep.add(sound)
        removed = [folder for folder in found if folder not in keep]
        for folder in removed:
            ckpt.remove_checkpoint(folder)
        return removed

    def newest_sound(self) -> Path | None:
        for folder in reversed(ckpt.complete_checkpoints(self.root)):
            if is_sound(folder):
                return folder
        return None


def is_sound(folder: Path) -> bool:
    """Saved while the loss and the weights were healthy (checkpoints that predate the flag count as sound)."""
    try:
        return bool(ckpt.load_trainer_state(folder).get("sound", True))
    except ckpt.CheckpointError:
        return False
