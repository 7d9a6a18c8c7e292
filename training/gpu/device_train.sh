#!/usr/bin/env bash
# Train the default and the paper-size intrinsic decoders on a lent GPU machine in ONE `device` run (<= 9 min)
# and bring the results back through $OUT. Prepare here first (training/gpu/README.md):
#   python -m fastspec_train.devpack pack --data ../shared/data/synspec_intrinsic_v2.h5 --out .devdata/train.fsp --max-mb 19
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl scipy-openblas32
# then run it with the device tool: command "bash training/gpu/device_train.sh", carry [".devdata", ".whl"].
set -euo pipefail
OUT=${OUT:?run through the device tool, which sets OUT}
MINUTES_DEFAULT=${MINUTES_DEFAULT:-2.5}
MINUTES_PAPER=${MINUTES_PAPER:-3.0}
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" | tee -a "$OUT/device.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.log"

log "install the core (scipy-openblas32 from the carried wheel) and the training package"
python3 -m pip install -q --no-index --find-links .whl scipy-openblas32
CMAKE_BUILD_PARALLEL_LEVEL=16 FASTSPEC_CUDA=OFF python3 -m pip install -q --no-build-isolation --no-deps . ./training
python3 -m fastspec_train.devpack unpack .devdata/train.fsp /tmp/train.h5

train() {  # name config minutes overrides...
  local name=$1 config=$2 minutes=$3; shift 3
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  log "train $name ($config, $minutes min)"
  fastspec-train train --config "$config" --data /tmp/train.h5 --out "/tmp/runs/$name" --device cuda \
    --set train.threads=0 --set train.max_minutes="$minutes" --set train.anneal_minutes="$minutes" \
    --set train.anneal_start_epoch=0 --set train.anneal_end_epoch=0 --set train.max_epochs=100000 \
    --set 'train.lr_restarts=[]' "${sets[@]}" > "/tmp/runs/$name.out" 2>&1 || { tail -30 "/tmp/runs/$name.out"; return 1; }
  tail -n 2 "/tmp/runs/$name/train.log" | tee -a "$OUT/device.log"
  cp "/tmp/runs/$name/history.json" "$OUT/$name-history.json"
}
mkdir -p /tmp/runs
train default default "$MINUTES_DEFAULT" train.batch_size=512
train paper paper "$MINUTES_PAPER" model.target=intrinsic train.lr=3e-4 'train.beta_steps=[[10, 10.0]]' train.scheduler=none

log "export and score on the validation split (the test split never left the CPU machine)"
fastspec-train export --run /tmp/runs/default --out /tmp/default-gpu.fsm --dtype f16
fastspec-train export --run /tmp/runs/paper --out /tmp/paper-gpu.fsm --dtype f16
for name in default paper; do
  python3 - "$name" <<'PY' | tee -a "$OUT/device.log"
import json, sys
from fastspec_train.accuracy import accuracy_report
name = sys.argv[1]
r = accuracy_report(f"/tmp/{name}-gpu.fsm", "/tmp/train.h5", f"/tmp/acc-{name}", draws=10, split="val")
json.dump(r, open(f"{__import__('os').environ['OUT']}/{name}-val-accuracy.json", "w"), indent=1)
print(name, "validation median |dF|", r["overall"]["median_abs_dF"], "p95", r["overall"]["per_spectrum_mean_abs_dF_p95"])
PY
done
# $OUT takes 8 files of at most 16 MiB: the default model (40 MB in fp16) comes back in 15 MiB parts
# (reassemble with `cat default-gpu.fsm.part* > default-gpu.fsm`; the file's CRC-32 checks the result).
# The paper-size model (150 MB in fp16) does not fit; its numbers do.
split -b 15M -d /tmp/default-gpu.fsm "$OUT/default-gpu.fsm.part"
log "done"
