"""Launch environments: the world every supported launcher describes is the world that forms,
and one that cannot be formed is a one-line error, never a silent one-process run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from crate_lm.train.launch import LaunchError, first_host, launch_environment, slurm_port
from tests.test_train import PRETRAIN, corpus, env, error_line, free_port, losses  # noqa: F401


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("node07", "node07"),
        ("gpu[07-12,20]", "gpu07"),
        ("gpu[07-12,20],cpu1", "gpu07"),
        ("a1,b2", "a1"),
        ("rack[2-3]-node[001-008]", "rack2-node001"),
        ("gnode[10,20,25,37]", "gnode10"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_and_deepspeed_variables_are_taken_as_they_are():
    values, note = launch_environment(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29511",
         "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}  # fmt: skip
    )  # torchrun inside an srun step: torchrun's variables win
    assert values == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29511"}
    assert note is None


def test_srun_tasks_form_the_world():
    environ = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
               "SLURM_STEP_NODELIST": "gpu[03-10]", "SLURM_JOB_ID": "123456", "SLURM_NTASKS": "16"}  # fmt: skip
    values, _ = launch_environment(environ)
    assert values == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03",
                      "MASTER_PORT": str(slurm_port("123456"))}  # fmt: skip
    assert all(20000 <= slurm_port(str(j)) < 30000 for j in range(0, 200000, 997))


@pytest.mark.parametrize(
    "flavour",
    [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ],
)
def test_mpirun_ranks_form_the_world(flavour):
    rank, size, local, local_size = flavour
    one_host = {rank: "1", size: "4", local: "1", local_size: "4"}
    assert launch_environment(one_host)[0] == {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": ""}  # fmt: skip
    many_hosts = {rank: "5", size: "16", local: "1", local_size: "8"}
    with pytest.raises(LaunchError, match="needs the rendezvous host: export MASTER_ADDR"):
        launch_environment(many_hosts)
    values, _ = launch_environment({**many_hosts, "MASTER_ADDR": "n0", "MASTER_PORT": "29600"})
    assert (values["RANK"], values["WORLD_SIZE"], values["MASTER_ADDR"]) == ("5", "16", "n0")


def test_what_cannot_form_a_world_is_an_error():
    with pytest.raises(LaunchError, match="no rank variable says which process this is"):
        launch_environment({"WORLD_SIZE": "4", "MASTER_ADDR": "n0"})
    with pytest.raises(LaunchError, match="WORLD_SIZE is not"):
        launch_environment({"RANK": "1", "MASTER_ADDR": "n0"})
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set"):
        launch_environment({"RANK": "0", "WORLD_SIZE": "4"})
    with pytest.raises(LaunchError, match="outside a world of 2"):
        launch_environment({"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n1"})


def test_deepspeed_mpich_runner_exports_world_size_and_pmi_gives_the_rank():
    environ = {"WORLD_SIZE": "16", "LOCAL_SIZE": "8", "MASTER_ADDR": "n0", "MASTER_PORT": "29500",
               "PMI_RANK": "9", "PMI_SIZE": "16", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "8"}  # fmt: skip
    values, _ = launch_environment(environ)
    assert (values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["MASTER_ADDR"]) == ("9", "16", "1", "n0")


def test_plain_python_in_a_slurm_batch_script_says_so():
    values, note = launch_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"})
    assert values["WORLD_SIZE"] == "1" and "allocation of 8 tasks" in note
    assert launch_environment({})[0]["WORLD_SIZE"] == "1"


def launch_two(corpus, out, variables) -> list[subprocess.CompletedProcess]:  # noqa: F811
    """Start 2 processes the way an external launcher does: only its variables tell them apart."""
    procs = []
    for rank in (0, 1):
        e = {k: v for k, v in env().items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MV2_"))}
        e.pop("MASTER_ADDR", None)
        e.update(variables(rank))
        cmd = [sys.executable, PRETRAIN, "--config", str(corpus), "--train.out_dir", str(out)]
        procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [subprocess.CompletedProcess(p.args, p.wait(300), *p.communicate()) for p in procs]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_two_processes_of_an_external_launcher_train_as_one_world(launcher, corpus, tmp_path):  # noqa: F811
    out, port, job = tmp_path / "run", free_port(), str(free_port())

    def variables(rank: int) -> dict:
        if launcher == "srun":
            return {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
                    "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": job,
                    "MASTER_PORT": str(port)}  # fmt: skip
        return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": str(port)}  # fmt: skip

    results = launch_two(corpus, out, variables)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:] + results[1].stderr[-2000:]
    assert "world 2" in results[0].stdout
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    state = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


@pytest.mark.slow
def test_mpirun_over_several_hosts_without_a_rendezvous_is_one_line(corpus, tmp_path):  # noqa: F811
    e = {k: v for k, v in env().items() if k != "MASTER_ADDR"}
    e.update(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="16", OMPI_COMM_WORLD_LOCAL_SIZE="8")
    cmd = [sys.executable, PRETRAIN, "--config", str(corpus), "--train.out_dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "export MASTER_ADDR" in error_line(proc)
    assert not (tmp_path / "run").exists(), "nothing written"
