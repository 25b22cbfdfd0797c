#!/usr/bin/env bash
# Reproduces the README's results tables on the embedded default (rotated-digits):
# closed-set leave-one-domain-out for zero-shot, CoOp, CoCoOp, DPL, DALSCLIP, GOPro and open-set
# (rotated-digits-open) for zero-shot, CoOp, SeeCLIP; 3 seeds; mean +- standard error.
# Baseline hyper-parameters as in `dgclip quickstart` (see dgclip/cli.py QUICKSTART).
set -euo pipefail
OUT="${1:-runs/readme}"
STEPS="${STEPS:-200}"
SEEDS="${SEEDS:-0 1 2}"
DGCLIP="${DGCLIP:-dgclip}"
$DGCLIP pretrain
hp() { python -c "import json,sys; from dgclip.cli import QUICKSTART; print(json.dumps(QUICKSTART['hparams'].get(sys.argv[1], {})))" "$1"; }
for m in zero-shot coop cocoop dpl dalsclip gopro; do
  $DGCLIP train --method "$m" --dataset rotated-digits --test-domain all --seeds $SEEDS \
    --steps "$STEPS" --hparams "$(hp "$m")" --output-dir "$OUT/closed" --resume
done
for m in zero-shot coop seeclip; do
  $DGCLIP train --method "$m" --dataset rotated-digits-open --test-domain all --seeds $SEEDS \
    --steps "$STEPS" --hparams "$(hp "$m")" --output-dir "$OUT/open" --resume
done
$DGCLIP results "$OUT/closed"
for metric in test_acc h_score auroc; do $DGCLIP results "$OUT/open" --metric "$metric"; done
