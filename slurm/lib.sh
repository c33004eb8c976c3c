# Shared by slurm/*.sbatch (sourced, not run): locate the project, run the launcher under signal
# forwarding, and decide from RUN/status.json whether the job is done or must be requeued.
#
# Environment read here (all optional):
#   AVPGAN_ROOT          project checkout (default: the directory sbatch was called from)
#   PYTHON               interpreter (default: $AVPGAN_ROOT/.venv/bin/python, else python3)
#   AVPGAN_COMMAND       train (default) or evaluate
#   AVPGAN_ENTRY         python entry for the launcher (default: "-m avpgan")
#   RUN_DIR              run directory (default: train.run_dir of the config + overrides)
#   EVAL_ARGS            evaluate only: extra `avpgan evaluate` options, e.g. "--seconds 2 8"
#   AVPGAN_MAX_REQUEUES  give up after this many restarts (default: 50)

avpgan_log() { echo "[$(date '+%F %T')] ${SLURM_JOB_ID:-?}/${SLURM_RESTART_COUNT:-0}: $*" >&2; }

# avpgan_setup CONFIG [key=value ...]: sets ROOT, PYTHON, CONFIG, OVERRIDES, COMMAND, RUN_DIR and
# ARGS, the avpgan command line: `train --config CONFIG [key=value ...]`, or for evaluate
# `evaluate RUN_DIR --shards <data.shards> --out RUN_DIR/eval.json $EVAL_ARGS` (the run dir holds
# the trained models and its own config; options in EVAL_ARGS come last, so they win).
avpgan_setup() {
    ROOT="${AVPGAN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
    if [[ ! -x "$ROOT/launch/launch.sh" ]]; then
        avpgan_log "no launch/launch.sh under '$ROOT': submit from the project root or set AVPGAN_ROOT"
        exit 2
    fi
    cd "$ROOT"
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
    fi
    export PYTHON
    CONFIG="${1:-${CONFIG:-}}"
    [[ $# -gt 0 ]] && shift
    if [[ -z "$CONFIG" ]]; then
        avpgan_log "usage: sbatch [sbatch options] $(basename "${SLURM_JOB_NAME:-script}") CONFIG [key=value ...]"
        exit 2
    fi
    OVERRIDES=("$@")
    COMMAND="${AVPGAN_COMMAND:-train}"
    local resolved
    # One interpreter start resolves both paths (and rejects a bad config before any launch).
    resolved="$("$PYTHON" -c 'import sys; from avpgan import config
c = config.load(sys.argv[1], sys.argv[2:]); print(c.train.run_dir); print(c.data.shards)' \
        "$CONFIG" "${OVERRIDES[@]}")" || { avpgan_log "cannot read $CONFIG ${OVERRIDES[*]}"; exit 2; }
    RUN_DIR="${RUN_DIR:-$(sed -n 1p <<<"$resolved")}"
    case "$COMMAND" in
        train) ARGS=(train --config "$CONFIG" "${OVERRIDES[@]}") ;;
        evaluate)
            local eval_args
            read -r -a eval_args <<<"${EVAL_ARGS:-}"
            ARGS=(evaluate "$RUN_DIR" --shards "$(sed -n 2p <<<"$resolved")" --out "$RUN_DIR/eval.json"
                  "${eval_args[@]}") ;;
        *) avpgan_log "AVPGAN_COMMAND must be train or evaluate, got '$COMMAND'"; exit 2 ;;
    esac
    avpgan_log "start on $(hostname -s): ${ARGS[*]} (run dir $RUN_DIR, nodes ${SLURM_JOB_NODELIST:-?})"
}

# Called first thing by every sbatch script: from here on SIGUSR1/SIGTERM never kill the batch
# shell; they are recorded in PREEMPT_SIGNAL and passed on as SIGUSR1 to the running command (the
# launcher, or srun, which forwards it to every node's launcher).
avpgan_traps() {
    PREEMPT_SIGNAL=""
    AVPGAN_CHILD=""
    trap '_avpgan_forward USR1' USR1
    trap '_avpgan_forward TERM' TERM
}

_avpgan_forward() {
    PREEMPT_SIGNAL="$1"
    avpgan_log "SIG$1 received: forwarding SIGUSR1 so every rank saves and stops"
    if [[ -n "$AVPGAN_CHILD" ]]; then kill -USR1 "$AVPGAN_CHILD" 2>/dev/null || true; fi
}

# avpgan_run CMD...: run CMD in the background under the traps above; sets RC.
avpgan_run() {
    ATTEMPT_MARK="$(mktemp "${TMPDIR:-/tmp}/avpgan-attempt.XXXXXX")"
    if [[ -n "$PREEMPT_SIGNAL" ]]; then
        avpgan_requeue "SIG$PREEMPT_SIGNAL arrived before training started"
    fi
    "$@" &
    AVPGAN_CHILD=$!
    # `wait` returns early whenever a trapped signal arrives: keep waiting until the child is gone.
    while kill -0 "$AVPGAN_CHILD" 2>/dev/null; do wait "$AVPGAN_CHILD" || true; done
    RC=0; wait "$AVPGAN_CHILD" || RC=$?
    avpgan_log "command exited with $RC"
}

# The state in RUN/status.json, if the command wrote it during this attempt; else "".
avpgan_status_state() {
    local status="$RUN_DIR/status.json"
    if [[ -f "$status" && "$status" -nt "$ATTEMPT_MARK" ]]; then
        "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("state", ""))' "$status" \
            2>/dev/null || true
    fi
}

avpgan_requeue() {
    rm -f "${ATTEMPT_MARK:-}"
    local restarts="${SLURM_RESTART_COUNT:-0}" max="${AVPGAN_MAX_REQUEUES:-50}"
    if ((restarts >= max)); then
        avpgan_log "not requeueing: already restarted $restarts times (AVPGAN_MAX_REQUEUES=$max)"
        exit 1
    fi
    avpgan_log "requeueing ($1); the next run resumes from the newest checkpoint"
    # Slurm stops this script while it requeues; the exit below is for when it does not.
    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
    avpgan_log "scontrol requeue failed (was the job submitted with --requeue?)"
    exit 1
}

# avpgan_finish: exit 0 when done, requeue when preempted, fail otherwise.
avpgan_finish() {
    if [[ "$COMMAND" == train ]]; then
        local state
        state="$(avpgan_status_state)"
        avpgan_log "status: ${state:-none written} (exit $RC${PREEMPT_SIGNAL:+, got SIG$PREEMPT_SIGNAL})"
        case "$state" in
            finished) rm -f "$ATTEMPT_MARK"; exit 0 ;;
            preempted) avpgan_requeue "preempted, checkpoint saved" ;;
        esac
        # Killed before it could save (or failed while stopping): the newest complete checkpoint
        # is still there, so a requeue loses at most checkpoint_every steps.
        if [[ -n "$PREEMPT_SIGNAL" ]]; then
            avpgan_requeue "stopped by SIG$PREEMPT_SIGNAL without a status"
        fi
        rm -f "$ATTEMPT_MARK"
        ((RC != 0)) && exit "$RC"
        avpgan_log "exit 0 but no finished status in $RUN_DIR/status.json"
        exit 1
    fi
    if ((RC != 0)) && [[ -n "$PREEMPT_SIGNAL" ]]; then
        avpgan_requeue "$COMMAND stopped by SIG$PREEMPT_SIGNAL"
    fi
    rm -f "$ATTEMPT_MARK"
    exit "$RC"
}
