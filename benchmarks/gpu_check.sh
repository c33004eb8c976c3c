#!/usr/bin/env bash
# The GPU figures docs/performance.md asks for, in one run of about 7 minutes on one H100/H200.
#
#   benchmarks/gpu_check.sh [FOLDER]      # figures in FOLDER (default: $OUT, else ./gpu_check_out)
#
# Run from the repository root. Installs nothing: it uses .venv/bin/python when there is one,
# else $PYTHON, else python3, which must have avpgan's dependencies (torch with CUDA, accelerate,
# webdataset, soundfile, librosa, safetensors, pyyaml; pytest for the last check). Steps:
#   1. benchmarks/bench_step.py: Voice2Face's step vs avpgan's (both configs, audio and bank
#      paths) at batch 128 and 2048, fp32 and bf16 (at 128 against the reference as published,
#      which ran its convs in TF32; at 2048 against the reference in bf16 too); plus tf32 and
#      bf16 + channels_last at 2048;
#   2. a small SynthVox set and its shards, made here (seconds);
#   3. `avpgan train`, gan stage only, configs/avpgan.yaml (paper size), bank, bf16, for 100 s (with start-up
#      and the bank build, about 2 minutes), then kill -9;
#   4. the same command again: it must resume from the newest checkpoint and go on; stopped after
#      45 s with SIGTERM (the preemption path), which must save a later checkpoint;
#   5. tests/test_step_sync.py on CUDA (torch's sync detector), when pytest is there.
# Everything it measured is appended to FOLDER/figures.txt; raw logs and JSON lie beside it.
set -uo pipefail

DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
FIG="$DIR/figures.txt"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say() { echo "$*" | tee -a "$FIG"; }

say "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$FIG"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$FIG"

# 1. The step, side by side (about 3 minutes).
bench() {  # bench NAME ARGS...
    local name=$1; shift
    say ""
    say "-- bench_step $*"
    timeout 300 $PY benchmarks/bench_step.py --device cuda --threads 8 --json "$DIR/bench_$name.json" "$@" \
        2>"$DIR/bench_$name.err" | tee -a "$FIG" || say "(bench_step $name failed: see bench_$name.err)"
}
bench b128_fp32 --batch 128 --precision fp32 --steps 20 --repeats 3 --phase-steps 5
bench b128_bf16 --batch 128 --precision bf16 --ref-precision tf32 --steps 20 --repeats 3 --phase-steps 5
bench b2048_fp32 --batch 2048 --precision fp32 --steps 3 --repeats 3 --phase-steps 2
bench b2048_bf16 --batch 2048 --precision bf16 --steps 3 --repeats 3 --phase-steps 2
bench b2048_tf32 --batch 2048 --precision tf32 --steps 3 --repeats 2 --phase-steps 1 --only bank
bench b2048_bf16_cl --batch 2048 --precision bf16 --steps 3 --repeats 2 --phase-steps 1 --channels-last --only bank

# 2. Synthetic data: 96 identities x 6 utterances, shards with the paper's data settings.
say ""
say "-- synthetic data"
t0=$(date +%s)
$PY -m avpgan synth --out "$WORK/synthvox" --identities 96 --utterances-per-id 6 --faces-per-id 2 --seed 0 \
    --workers 16 >"$DIR/synth.log" 2>&1 &&
$PY -m avpgan shards build --voxceleb "$WORK/synthvox/voxceleb1/wav" --vggface "$WORK/synthvox/vggface" \
    --meta "$WORK/synthvox/vox1_meta.csv" --out "$WORK/shards" --config configs/avpgan.yaml --workers 16 \
    >>"$DIR/synth.log" 2>&1 || { say "synthetic data failed: see synth.log"; exit 1; }
say "synth + shards: $(( $(date +%s) - t0 )) s"

# 3. Two minutes of the gan stage at paper size, bf16, on the bank; then kill -9.
RUN="$WORK/run"
$PY - "$RUN" <<'EOF' || { say "could not write a voice encoder"; exit 1; }
import sys
from pathlib import Path
import torch
from avpgan import config, models
from avpgan.train.stages import write_weights
torch.manual_seed(0)  # a random F_e: the step's cost does not depend on what the encoder learnt
cfg = config.load("configs/avpgan.yaml")
write_weights(models.build_voice_encoder(cfg.model.voice), Path(sys.argv[1]) / "voice" / "model.safetensors")
EOF
TRAIN=($PY -m avpgan train --config configs/avpgan.yaml "data.shards=$WORK/shards" "train.run_dir=$RUN"
       "train.stages=[gan]" train.mixed_precision=bf16 train.gan.steps=10000000 train.log_every=200
       train.checkpoint_every=2000 train.sample_every=10000000 tracking.enabled=false)
say ""
say "-- avpgan train (gan, avpgan.yaml, bank, bf16, batch 128): 100 s, then kill -9"
"${TRAIN[@]}" >"$DIR/train1.log" 2>&1 &
pid=$!
sleep 100
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
grep -E "samples_per_s" "$DIR/train1.log" | tail -3 | tee -a "$FIG"
killed_at=$(ls -d "$RUN"/gan/checkpoints/step-* 2>/dev/null | grep -v '\.tmp$' | sort | tail -1)
say "newest complete checkpoint after kill -9: ${killed_at:-none}"

# 4. Resume: the same command must continue from that checkpoint; SIGTERM after 60 s saves again.
say ""
say "-- resume after kill -9 (45 s, then SIGTERM)"
"${TRAIN[@]}" >"$DIR/train2.log" 2>&1 &
pid=$!
sleep 45
kill -TERM "$pid" 2>/dev/null
wait "$pid"
rc=$?
grep -E "resumed from|preempted|samples_per_s" "$DIR/train2.log" | tail -4 | tee -a "$FIG"
final=$(ls -d "$RUN"/gan/checkpoints/step-* 2>/dev/null | grep -v '\.tmp$' | sort | tail -1)
state=$(cat "$RUN/status.json" 2>/dev/null)
if [ -n "$killed_at" ] && grep -q "resumed from .*$(basename "$killed_at")" "$DIR/train2.log" && [ "$rc" = 0 ] && [[ "$final" > "$killed_at" ]]; then
    say "RESUME OK: resumed from $(basename "$killed_at"), saved $(basename "$final") on SIGTERM, exit $rc, status $state"
else
    say "RESUME FAILED: killed at ${killed_at:-none}, final ${final:-none}, exit $rc, status $state (see train2.log)"
fi

# 5. The step under torch's CUDA sync detector.
say ""
if $PY -c "import pytest" 2>/dev/null; then
    say "-- tests/test_step_sync.py on CUDA"
    timeout 300 $PY -m pytest -q tests/test_step_sync.py -k cuda -p no:cacheprovider 2>&1 | tail -3 | tee -a "$FIG"
else
    say "-- pytest not installed: tests/test_step_sync.py not run"
fi
say "== done $(date -u +%Y-%m-%dT%H:%M:%SZ); figures in $FIG"
