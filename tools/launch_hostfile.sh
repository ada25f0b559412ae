#!/usr/bin/env bash
# Multi-node pretraining with the DeepSpeed launcher and a hostfile (no scheduler needed).
#
#   CONFIG=configs/crate_350m_zero2_bf16.yaml HOSTFILE=hostfile tools/launch_hostfile.sh [--section.key VALUE ...]
#
# The hostfile lists one node per line as "<hostname> slots=<GPUs>" (see tools/hostfile.example);
# the first host is the master unless MASTER_ADDR says otherwise. Arguments are config overrides
# for crate_lm/pretrain.py. Every node must see this checkout and its .venv at the same path
# (shared filesystem) and the same data.path; the run folder (train.out_dir) must be shared too.
#
# Two ways to start it:
#   * ssh (default): run this once, on the first host. The launcher reaches every host over pdsh +
#     passwordless ssh (`pdsh` installed on this node; `--ssh_port` if not 22) and starts
#     `python -m deepspeed.launcher.launch` there, which starts one process per slot.
#   * no ssh: run this on every node with NODE_RANK=0..N-1 (the node's line in the hostfile) and
#     the same MASTER_ADDR/MASTER_PORT, e.g. from a scheduler or a per-node shell.
#
# Environment the run relies on:
#   MASTER_ADDR / MASTER_PORT  rendezvous of rank 0: an address every node can reach (not 127.0.0.1)
#                              and a free TCP port there (default 29500).
#   NCCL_SOCKET_IFNAME         the network interface NCCL bootstraps on (eth0, ens5, ib0, ...);
#                              needed when nodes have several and the first is not routable.
#   NCCL_IB_DISABLE=1          force TCP sockets where InfiniBand is absent or broken.
#   NCCL_DEBUG=INFO            print the transport NCCL chose (WARN for quiet).
#   CUDA_VISIBLE_DEVICES       do not set it: the launcher sets it per node from the hostfile
#                              slots; choose GPUs with --include "node0:0,1@node1:0,1" instead.
#   DS_ACCELERATOR=cpu         CPU-only nodes (gloo backend); slots = processes per node.
#   OMP_NUM_THREADS            torch threads per process: the node's cores / slots (1 for 2 ranks on
#                              2 cores). The DeepSpeed launcher does not set it.
# How variables reach the other nodes: in ssh mode the remote processes do NOT inherit this
# shell's environment. The launcher exports variables whose names start with NCCL (on GPU
# nodes), PYTHON, UCX, MV2 or MLFLOW, plus every KEY=VALUE line of a `.deepspeed_env` file, read
# from $HOME and then from the current directory (the later wins; DS_ENV_FILE renames the file).
# That file allows no blank or comment lines. This script writes a temporary one (your own
# ~/.deepspeed_env and ./.deepspeed_env lines first, then the variables named in DS_ENV_VARS that
# are set here) and points DS_ENV_FILE at it, so that
#   OMP_NUM_THREADS=8 WANDB_MODE=offline CONFIG=... tools/launch_hostfile.sh
# behaves the same on every node. In no-ssh mode each node uses its own environment.
#
# Stopping: SIGTERM (or Ctrl-C) to the launcher terminates the training processes with SIGTERM
# and kills them 30 s later; the trainer saves a checkpoint on SIGTERM/SIGUSR1, so keep a save
# under 30 s or send SIGUSR1 to the training processes themselves. Rerunning resumes from the
# latest complete checkpoint (checkpoint.resume: auto).

set -euo pipefail
cd "$(dirname "$0")/.."

HOSTFILE=${HOSTFILE:-hostfile}
CONFIG=${CONFIG:-configs/crate_125m_zero1_bf16.yaml}
VENV=${VENV:-.venv}
[ -f "$HOSTFILE" ] || { echo "error: hostfile '$HOSTFILE' not found; set HOSTFILE (see tools/hostfile.example)" >&2; exit 2; }
[ -f "$CONFIG" ] || { echo "error: config '$CONFIG' not found; set CONFIG (see configs/)" >&2; exit 2; }
# shellcheck disable=SC1091
[ -f "$VENV/bin/activate" ] && source "$VENV/bin/activate"

MASTER_ADDR=${MASTER_ADDR:-$(awk '$1 !~ /^#/ && NF { print $1; exit }' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
export MASTER_ADDR MASTER_PORT

args=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [ -n "${NODE_RANK:-}" ]; then
    args+=(--no_ssh --node_rank "$NODE_RANK")
else
    DS_ENV_VARS=${DS_ENV_VARS:-"OMP_NUM_THREADS DS_ACCELERATOR WANDB_MODE WANDB_DIR HF_HOME TORCH_EXTENSIONS_DIR PATH LD_LIBRARY_PATH"}
    env_file=$(mktemp "${TMPDIR:-/tmp}/crate_lm.deepspeed_env.XXXXXX")
    for own in "$HOME/.deepspeed_env" ./.deepspeed_env; do   # DS_ENV_FILE replaces these: keep their lines
        if [ -f "$own" ]; then grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$own" >> "$env_file" || true; fi
    done
    for name in $DS_ENV_VARS; do
        if [ -n "${!name:-}" ]; then printf '%s=%s\n' "$name" "${!name}" >> "$env_file"; fi
    done
    export DS_ENV_FILE="$env_file"   # an absolute name: os.path.join($HOME or ., name) returns it as is
fi
echo "launch: deepspeed ${args[*]} crate_lm/pretrain.py --config $CONFIG $*"
exec deepspeed "${args[@]}" crate_lm/pretrain.py --config "$CONFIG" "$@"
