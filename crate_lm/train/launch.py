"""Which process am I? Rank, world size, local rank and rendezvous from the launcher's variables.

Supported launchers: ``torchrun`` and the ``deepspeed`` launcher (pdsh, no-ssh; they set RANK
and WORLD_SIZE), SLURM's ``srun`` (also ``deepspeed --launcher slurm``), and ``mpirun`` of Open
MPI, MPICH / Intel MPI and MVAPICH (also ``deepspeed --launcher openmpi|mpich|mvapich``). Plain
``python`` is a world of one. An environment that says there are more processes but cannot
be turned into a world is an error, never a silent one-process run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from crate_lm.errors import CrateLMError

SUPPORTED = "torchrun, deepspeed (pdsh / no-ssh / slurm / openmpi), srun, mpirun (Open MPI, MPICH, Intel MPI, MVAPICH)"
DEFAULT_PORT = 29500

# (rank, world size, local rank, local size) variables of each MPI flavour
MPI_VARIABLES = (
    (
        "Open MPI",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    ("MVAPICH", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH / Intel MPI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


class LaunchError(CrateLMError):
    """The launch environment cannot form the world it describes."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-12,20],cpu1`` -> ``gpu07``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level entry
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())


def slurm_port(job_id: str) -> int:
    """A rendezvous port every task of a job agrees on, below the Linux ephemeral range (32768-60999)."""
    return 20000 + int(job_id) % 10000 if job_id.isdigit() else DEFAULT_PORT


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise LaunchError(f"{key}={environ[key]!r} is not a whole number") from None


def launch_environment(environ: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """The RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT this process should use,
    and a note to print (or None). Raises LaunchError when the world cannot be formed."""
    have = {k: environ[k] for k in ("MASTER_ADDR", "MASTER_PORT") if environ.get(k)}
    if "RANK" in environ:  # torchrun, the deepspeed launcher, or set by hand
        if "WORLD_SIZE" not in environ:
            raise LaunchError(f"RANK is set but WORLD_SIZE is not; start the run with one of: {SUPPORTED}")
        rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        if world > 1 and not have.get("MASTER_ADDR"):
            raise LaunchError(f"WORLD_SIZE={world} but MASTER_ADDR is not set; start the run with one of: {SUPPORTED}")
        local = environ.get("LOCAL_RANK", "0")
        return _world(rank, world, int(local), have.get("MASTER_ADDR", "127.0.0.1"), have), None
    if "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ:  # a task of srun
        world = _int(environ, "SLURM_STEP_NUM_TASKS")
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
        addr = have.get("MASTER_ADDR") or (first_host(nodes) if nodes else "")
        if world > 1 and not addr:
            raise LaunchError("srun task without SLURM_STEP_NODELIST or MASTER_ADDR: set MASTER_ADDR to the first node")
        have.setdefault("MASTER_PORT", str(slurm_port(environ.get("SLURM_JOB_ID", ""))))
        local = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
        return _world(_int(environ, "SLURM_PROCID"), world, local, addr or "127.0.0.1", have), None
    for flavour, rank_key, size_key, local_key, local_size_key in MPI_VARIABLES:
        if rank_key in environ and size_key in environ:
            rank, world = _int(environ, rank_key), _int(environ, size_key)
            local_size = _int(environ, local_size_key) if local_size_key in environ else None
            addr = have.get("MASTER_ADDR")
            if addr is None and world > 1:
                if local_size != world:  # ranks on other hosts cannot reach 127.0.0.1
                    raise LaunchError(
                        f"{flavour} mpirun of {world} ranks over several hosts needs the rendezvous host: "
                        "export MASTER_ADDR (the first host) and MASTER_PORT to every rank (mpirun -x MASTER_ADDR ...)"
                    )
                addr = "127.0.0.1"
            local = _int(environ, local_key) if local_key in environ else 0
            return _world(rank, world, local, addr or "127.0.0.1", have), None
    if environ.get("WORLD_SIZE", "1") != "1":
        raise LaunchError(
            f"WORLD_SIZE={environ['WORLD_SIZE']} but no rank variable says which process this is; "
            f"start the run with one of: {SUPPORTED}"
        )
    note = None
    if environ.get("SLURM_NTASKS", "1") not in ("", "1") and "SLURM_JOB_ID" in environ:
        note = (f"note: one training process in a SLURM allocation of {environ['SLURM_NTASKS']} tasks; start it with "
                "srun or tools/slurm_pretrain.sbatch to use them all")  # fmt: skip
    return _world(0, 1, 0, have.get("MASTER_ADDR", "127.0.0.1"), have), note


def _world(rank: int, world: int, local: int, addr: str, have: dict[str, str]) -> dict[str, str]:
    if not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is outside a world of {world} processes; check the launcher's variables")
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local),
        "MASTER_ADDR": addr,
        "MASTER_PORT": have.get("MASTER_PORT", ""),  # empty: a free port is picked for a world of one
    }
