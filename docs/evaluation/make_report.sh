#!/usr/bin/env bash
# Regenerates the report in this folder: the default model against SYNSPEC's fine mesh (the truth: 0.005 Å cells
# broadened in float64, then sampled), on spectra the model never saw.
#   docs/evaluation/make_report.sh [path/to/grid_with_fine_mesh.h5 [split]]     (OUT=dir to write elsewhere)
# Default: every star of the shared fine set (../shared/data/synspec_fine_v4.h5, turned into the model's pixel
# means by `fastspec-grid from-fine`; never trained on, so split "unseen"), 3 (v sin i, R) draws each. With the
# model's own training file, give split "test".
# Needs fastspec installed (pip install '.[plot,train]') and the training package on PYTHONPATH.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
tmp="${TMPDIR:-/tmp}"
out="${OUT:-$here}"
model="$repo/python/fastspec/data/default.fsm"
testset="$tmp/fastspec_default_testset.h5"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
export PYTHONPATH="$repo/training${PYTHONPATH:+:$PYTHONPATH}"

data="${1:-}"
split="${2:-unseen}"
if [[ -z "$data" ]]; then
    data="$tmp/fastspec_fine_v4_pixel.h5"
    [[ -f "$data" ]] || python -m fastspec_train.grid.cli from-fine "$repo/../shared/data/synspec_fine_v4.h5" --out "$data"
fi

# The held-out stars, each broadened at 3 stratified (v sin i, R) draws; the truth from the fine mesh, and the
# perfect decoder (the file's pixel means through the model's stage) kept for the operator's own floor.
python -m fastspec_train testset --model "$model" --data "$data" --split "$split" --draws 3 --out "$testset"

# Everything else at its defaults (recovery: PCA 25 + 5000-2000-1000-64, Adamax, batch 1024).
python -m fastspec evaluate --model "$model" --data "$testset" --out "$out" --dpi 100 --quiet
