#!/usr/bin/env bash
# Submit the whole AVP-GAN pipeline as dependent SLURM jobs: one job per training stage
# (voice -> embedder -> gan -> prior -> restore), then `avpgan evaluate RUN_DIR` on the test split
# (it needs the voice, gan and embedder stages, or an --embedder in EVAL_ARGS). Each job starts
# only when the previous one completed successfully (--dependency=afterok); a preempted job
# requeues itself and its dependents simply wait longer.
#
#   slurm/pipeline.sh CONFIG [key=value ...]
#
# Environment:
#   NODES          nodes per job (default 1; >1 uses train_multinode.sbatch)
#   GPUS_PER_NODE  GPUs per node (default 8; 0 = CPU only: no --gpus-per-node is requested)
#   CPUS_PER_TASK  CPUs per node for loaders (default: not requested)
#   STAGES         stages to run (default: train.stages of the config)
#   SBATCH_ARGS    extra sbatch options for every job, e.g. "--partition=gpu --time=24:00:00"
#   EVAL_ARGS      extra options for `avpgan evaluate`, e.g. "--seconds 2 8 --split val"
#   NO_EVAL=1      skip the evaluation job
# Prints one "STAGE JOBID" line per job. Run it from the project root (or set AVPGAN_ROOT).
set -euo pipefail

ROOT="${AVPGAN_ROOT:-$PWD}"
[[ -f "$ROOT/slurm/lib.sh" ]] || { echo "pipeline.sh: run from the project root or set AVPGAN_ROOT" >&2; exit 2; }
(($#)) || { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }
CONFIG="$1"; shift
OVERRIDES=("$@")
[[ -f "$CONFIG" ]] || { echo "pipeline.sh: config '$CONFIG' not found" >&2; exit 2; }
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
if [[ -z "${STAGES:-}" ]]; then
    # Resolving the config here also rejects a bad config before anything is queued.
    STAGES="$("$PYTHON" -c 'import sys; from avpgan import config
print(" ".join(config.load(sys.argv[1], sys.argv[2:]).train.stages))' "$CONFIG" "${OVERRIDES[@]}")"
fi

resources=(--nodes="$NODES")
((GPUS_PER_NODE > 0)) && resources+=(--gpus-per-node="$GPUS_PER_NODE")
[[ -n "${CPUS_PER_TASK:-}" ]] && resources+=(--cpus-per-task="$CPUS_PER_TASK")
read -r -a extra <<<"${SBATCH_ARGS:-}"
script="$ROOT/slurm/train_node.sbatch"
((NODES > 1)) && script="$ROOT/slurm/train_multinode.sbatch"

dependency=()
submit() {  # submit NAME [ENV=VALUE,...] ARGS... -> prints the job id
    local name="$1" exports="$2"; shift 2
    sbatch --parsable --job-name="avpgan-$name" --export="ALL$exports" "${resources[@]}" \
        "${extra[@]}" "${dependency[@]}" "$script" "$@" | cut -d';' -f1
}

for stage in $STAGES; do
    id="$(submit "$stage" "" "$CONFIG" "${OVERRIDES[@]}" "train.stages=[$stage]")"
    echo "$stage $id"
    dependency=(--dependency="afterok:$id")
done
if [[ -z "${NO_EVAL:-}" ]]; then
    # The job builds `avpgan evaluate RUN_DIR --shards ... --out RUN_DIR/eval.json $EVAL_ARGS` from
    # the same config and overrides (slurm/lib.sh); EVAL_ARGS reaches it through --export=ALL.
    export EVAL_ARGS="${EVAL_ARGS:-}"
    id="$(submit evaluate ",AVPGAN_COMMAND=evaluate" "$CONFIG" "${OVERRIDES[@]}")"
    echo "evaluate $id"
fi
