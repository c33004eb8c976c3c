#!/usr/bin/env bash
# Start avpgan's training processes on THIS node with `accelerate launch`, and turn the cluster's
# "stop soon" signals into a clean, synchronized checkpoint-and-exit.
#
#   launch/launch.sh [options] [--] train --config configs/avpgan.yaml [key=value ...]
#
# Run it once per node (SLURM: one `srun` task per node). Every value comes from an option, else
# the environment, else SLURM's variables, else a single-node default:
#   --config-file FILE   accelerate config     $LAUNCH_CONFIG   picked from the counts (below)
#   --nnodes M           nodes                 $NNODES          $SLURM_NNODES, else 1
#   --nproc-per-node N   processes per node    $NPROC_PER_NODE  GPUs on the node ($SLURM_GPUS_ON_NODE,
#                                                               $CUDA_VISIBLE_DEVICES, nvidia-smi),
#                                                               else SLURM tasks per node, else 1
#   --node-rank R        this node's rank      $NODE_RANK       $SLURM_NODEID, else 0
#   --head-addr HOST     rendezvous host       $HEAD_ADDR       first of $SLURM_JOB_NODELIST, else
#                                                               $MASTER_ADDR, else 127.0.0.1
#   --port P             rendezvous port       $HEAD_PORT       15000 + $SLURM_JOB_ID % 15000, else
#                                                               $MASTER_PORT, else 29500
# Config picked when none is given: multinode.yaml (M > 1), 1gpu.yaml (one process), 8gpu.yaml
# (N GPUs), cpu2.yaml (N CPU processes); N and M always override the file's numbers.
# The Python entry is $AVPGAN_ENTRY (default "-m avpgan"; a script path also works), the
# interpreter $PYTHON (default: the project's .venv/bin/python, else python3 on PATH).
#
# Signals (the why is in docs/slurm.md): on SIGUSR1 or SIGTERM this script touches
# $AVPGAN_STOP_FILE and sends SIGUSR1 to the workers (the accelerate process's children). The
# workers' handler (avpgan.train.preempt) sets a flag, all ranks agree at the next step boundary,
# save and exit 0. The accelerate/torchrun process itself ignores SIGUSR1: torchrun would die of
# it, and on SIGTERM it kills the workers after 30 s, so SIGTERM is never forwarded to it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() { echo "launch.sh: $*" >&2; exit 2; }

# One stop file per launcher run, on this node: a stale one from an earlier run must not stop the
# next attempt at its first step.
export AVPGAN_STOP_FILE="${AVPGAN_STOP_FILE:-${TMPDIR:-/tmp}/avpgan-stop.${SLURM_JOB_ID:-local}.${SLURM_RESTART_COUNT:-0}.$$}"
rm -f "$AVPGAN_STOP_FILE"

# Traps first: a signal that arrives while this script is still starting must not kill it.
agent=""
stop_workers() {
    echo "launch.sh: SIG$1 received: asking the workers to save and stop" >&2
    : >"$AVPGAN_STOP_FILE" || true
    if [[ -n "$agent" ]]; then pkill -USR1 -P "$agent" 2>/dev/null || true; fi
}
trap 'stop_workers USR1' USR1
trap 'stop_workers TERM' TERM

config_file="${LAUNCH_CONFIG:-}"
nnodes="${NNODES:-}"
nproc="${NPROC_PER_NODE:-}"
node_rank="${NODE_RANK:-}"
head="${HEAD_ADDR:-}"
port="${HEAD_PORT:-}"
while (($#)); do
    case "$1" in
        --config-file) config_file="${2:?}"; shift 2 ;;
        --nnodes) nnodes="${2:?}"; shift 2 ;;
        --nproc-per-node) nproc="${2:?}"; shift 2 ;;
        --node-rank) node_rank="${2:?}"; shift 2 ;;
        --head-addr) head="${2:?}"; shift 2 ;;
        --port) port="${2:?}"; shift 2 ;;
        --) shift; break ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) break ;;
    esac
done
(($#)) || die "no avpgan arguments given (e.g. train --config configs/avpgan.yaml)"

count_gpus() {
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" && "${SLURM_GPUS_ON_NODE}" != 0 ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        # Set but empty (or "-1") hides every GPU.
        local ids="${CUDA_VISIBLE_DEVICES//[^0-9,]/}"
        if [[ -z "$ids" || "$CUDA_VISIBLE_DEVICES" == -1 ]]; then echo 0; else
            awk -F, '{print NF}' <<<"$ids"; fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

gpus="$(count_gpus)"
nnodes="${nnodes:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}}"
if [[ -z "$nproc" ]]; then
    if ((gpus > 0)); then
        nproc="$gpus"
    elif [[ -n "${SLURM_NTASKS_PER_NODE:-}" ]]; then
        nproc="$SLURM_NTASKS_PER_NODE"
    elif [[ -n "${SLURM_NTASKS:-}" ]]; then
        nproc=$((SLURM_NTASKS / nnodes))
    else
        nproc=1
    fi
fi
node_rank="${node_rank:-${SLURM_NODEID:-0}}"
if [[ -z "$head" ]]; then
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
        head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    fi
    head="${head:-${MASTER_ADDR:-127.0.0.1}}"
fi
if [[ -z "$port" ]]; then
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        # Every node computes the same port, and two jobs sharing a node rarely collide.
        port=$((15000 + SLURM_JOB_ID % 15000))
    else
        port="${MASTER_PORT:-29500}"
    fi
fi
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "nnodes must be a positive integer, got '$nnodes'"
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "nproc-per-node must be a positive integer, got '$nproc'"
[[ "$node_rank" =~ ^[0-9]+$ && node_rank -lt nnodes ]] || die "node rank '$node_rank' not in [0, $nnodes)"

if [[ -z "$config_file" ]]; then
    if ((nnodes > 1)); then config_file="$here/multinode.yaml"
    elif ((nproc == 1)); then config_file="$here/1gpu.yaml"
    elif ((gpus > 0)); then config_file="$here/8gpu.yaml"
    else config_file="$here/cpu2.yaml"
    fi
fi
[[ -f "$config_file" ]] || die "accelerate config '$config_file' not found"

args=(--config_file "$config_file"
      --num_machines "$nnodes" --num_processes $((nnodes * nproc))
      --machine_rank "$node_rank" --main_process_ip "$head" --main_process_port "$port"
      --mixed_precision no --dynamo_backend no)
if ((nnodes > 1)); then
    # c10d rendezvous; node 0 hosts the store, whatever the head's name resolves to.
    is_host=0; ((node_rank == 0)) && is_host=1
    args+=(--rdzv_backend c10d --rdzv_conf "is_host=$is_host")
elif ((nproc > 1)); then
    args+=(--rdzv_backend static)
fi

read -r -a entry <<<"${AVPGAN_ENTRY:--m avpgan}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$here/../.venv/bin/python" ]]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi

echo "launch.sh: $(hostname -s) node $node_rank/$nnodes, $nproc processes, $gpus GPUs," \
     "head $head:$port, $(basename "$config_file"), entry ${entry[*]} $*" >&2

# SIGUSR1 ignored in the agent (inherited by the workers until avpgan.train.preempt installs its
# handler; the stop file covers that window).
( trap '' USR1; exec "$python" -m accelerate.commands.launch "${args[@]}" "${entry[@]}" "$@" ) &
agent=$!
# `wait` returns early whenever a trapped signal arrives: keep waiting until the agent is gone.
while kill -0 "$agent" 2>/dev/null; do wait "$agent" || true; done
rc=0; wait "$agent" || rc=$?
rm -f "$AVPGAN_STOP_FILE"
exit "$rc"
