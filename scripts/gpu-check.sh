#!/usr/bin/env bash
# Verify a GPU machine end to end in under ten minutes, with one command (`make gpu-check`):
#   1. cifar10-hvd doctor: the stack, and each GPU's compute capability against the installed MXNet's kernels
#   2. demo data (5,000 labelled / 2,000 test images) in WORKDIR/kaggle
#   3. configs/gpu-8.yaml (amp float16) at -np 1, 3 epochs a phase: prepare, tune, final, predict
#      -> WORKDIR/run/summary.json (valid accuracy, images/s) and WORKDIR/run/submission.csv
#   4. benchmarks/bench_h2d.py at width 64 with AMP: the step loop with and without the overlapped copy
# Usage: scripts/gpu-check.sh [WORKDIR]   (default /tmp/cifar10-hvd-gpu-check; it must not exist yet)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/cifar10-hvd ]; then CLI=.venv/bin/cifar10-hvd PY=.venv/bin/python; else CLI=cifar10-hvd PY=python; fi
WORK=${1:-/tmp/cifar10-hvd-gpu-check}
if [ -e "$WORK" ]; then
    echo "gpu-check: $WORK already exists; name a new directory" >&2
    exit 2
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
start=$(date +%s)
"$CLI" doctor
"$CLI" demo-data --out "$WORK/kaggle" --train 5000 --test 2000 --seed 0
"$CLI" run --config configs/gpu-8.yaml --data "$WORK/kaggle" --workdir "$WORK/run" --np 1 --hosts localhost:1 \
    --controller gloo train.epochs=3 train.warmup_epochs=1 prepare.workers=4
test -s "$WORK/run/submission.csv"
"$PY" benchmarks/bench_h2d.py --width 64 --amp float16 --steps 100 --repeats 3
echo "gpu-check: passed in $(( $(date +%s) - start )) s; the run is in $WORK/run (summary.json, submission.csv)"
