#!/usr/bin/env bash
# The ablation of training/README.md: each variant trains on the same v2 split with the same CPU budget (one
# thread, 18 minutes, the LR annealed by a cosine over those minutes), then `python -m fastspec_train.ablation`
# scores every run on the validation split (broadened with seeded v sin i, R draws).
#   bash training/ablation.sh [DATA] [OUT]     (default: ../shared/data/synspec_intrinsic_v2.h5, runs/ablation)
set -euo pipefail
DATA=${1:-../shared/data/synspec_intrinsic_v2.h5}
OUT=${2:-runs/ablation}
MINUTES=${MINUTES:-18}
run() {  # name config overrides...
  local name=$1 config=$2; shift 2
  [[ -f "$OUT/$name/summary.json" ]] && { echo "$name: done already"; return; }
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  fastspec-train train --config "$config" --data "$DATA" --out "$OUT/$name" --threads 1 \
    --set train.max_minutes=$MINUTES --set train.anneal_minutes=$MINUTES --set train.anneal_start_epoch=0 \
    --set train.anneal_end_epoch=0 --set train.max_epochs=10000 --set 'train.lr_restarts=[]' "${sets[@]}" \
    > "$OUT/$name.out" 2>&1
  echo "$name: $(tail -n 1 "$OUT/$name/train.log")"
}
mkdir -p "$OUT"
run intrinsic default
# The first v2 default: every row of a batch through the CVAE (sampled z), beta 1 then 10 from epoch 10.
run intrinsic_every_row default train.z0_fraction=0.0 model.zero_init_latent=false 'model.encoder=[512, 256]' \
  train.beta=1.0 'train.beta_steps=[[10, 10.0]]'
run cvae6 cvae6 data.draws_per_epoch=4 'train.beta_steps=[[5, 10.0]]'
run intrinsic_bf16 default train.autocast=bf16 train.z0_fraction=0.0 model.zero_init_latent=false \
  'model.encoder=[512, 256]' train.beta=1.0 'train.beta_steps=[[10, 10.0]]'
run intrinsic_lines default train.line_weight=4 train.z0_fraction=0.0 model.zero_init_latent=false \
  'model.encoder=[512, 256]' train.beta=1.0 'train.beta_steps=[[10, 10.0]]'
