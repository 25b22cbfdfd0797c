#!/usr/bin/env bash
# Reproduces the README's results tables on the embedded default (rotated-digits):
# closed-set leave-one-domain-out for zero-shot, CoOp, CoCoOp, DPL, DALSCLIP, GOPro and open-set
# (rotated-digits-open) for zero-shot, CoOp, SeeCLIP; every method with its own defaults (on the
# embedded default: its `embedded_hparams`, see the README); 3 seeds; mean +- standard error.
# Protocol: DomainBed splits (seeded 80/20 per domain), batch_size images per source domain per
# step, model selection by training-domain validation, evaluation over seeded random batches.
set -euo pipefail
OUT="${1:-runs/readme}"
STEPS="${STEPS:-200}"
SEEDS="${SEEDS:-0 1 2}"
CLOSED="${CLOSED:-zero-shot coop cocoop dpl dalsclip gopro}"
OPEN="${OPEN:-zero-shot coop seeclip}"
DGCLIP="${DGCLIP:-dgclip}"
$DGCLIP pretrain
for m in $CLOSED; do
  $DGCLIP train --method "$m" --dataset rotated-digits --test-domain all --seeds $SEEDS \
    --steps "$STEPS" --eval-every 50 --output-dir "$OUT/closed" --resume --no-progress
done
for m in $OPEN; do
  $DGCLIP train --method "$m" --dataset rotated-digits-open --test-domain all --seeds $SEEDS \
    --steps "$STEPS" --eval-every 50 --output-dir "$OUT/open" --resume --no-progress
done
$DGCLIP results "$OUT/closed"
for metric in test_acc h_score h_score_native h_score_swept_oracle auroc oscr; do
  $DGCLIP results "$OUT/open" --metric "$metric"
done
