#!/usr/bin/env bash
# Regenerates the report in this folder: the default model against a held-out broadened SYNSPEC test set.
#   docs/evaluation/make_report.sh [path/to/synspec_intrinsic.h5]     (OUT=dir to write elsewhere)
# Needs fastspec installed (pip install '.[plot,train]') and the training package on PYTHONPATH.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
data="${1:-$repo/../shared/data/synspec_intrinsic_v2.h5}"
out="${OUT:-$here}"
model="$repo/python/fastspec/data/default.fsm"
testset="${TMPDIR:-/tmp}/fastspec_default_testset.h5"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"

# The default model's held-out stars (its provenance names the split), each broadened at 10 (v sin i, R) draws.
PYTHONPATH="$repo/training${PYTHONPATH:+:$PYTHONPATH}" python -m fastspec_train testset \
    --model "$model" --data "$data" --out "$testset"

# Everything else at its defaults (recovery: PCA 25 + 5000-2000-1000-64, Adamax, batch 1024).
python -m fastspec evaluate --model "$model" --data "$testset" --out "$out" --dpi 100 --quiet
