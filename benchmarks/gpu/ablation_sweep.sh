#!/bin/bash
# The ablation's two target rows (fixed γ, full recipe) over 5 training seeds, with Otsu and with
# calibrated per-class γ as the recipe's adaptive threshold, at 64 and 128 px: four
# benchmarks/ablation.py invocations at once on one GPU (16 training runs in flight, each its own
# process with one CPU thread). Mask IoU here uses --n 20 (the CPU table uses 100).
#
#   bash benchmarks/gpu/ablation_sweep.sh OUT_DIR
#
# Results: OUT_DIR/ablation_{otsu,calibrated}_c{64,128}.json (benchmarks/RESULTS.md, section 5).
set -u
OUT=${1:?usage: ablation_sweep.sh OUT_DIR}
W=${WORK:-/tmp/ablation_sweep}; mkdir -p $OUT $W
ablate() { name=$1; shift; timeout ${CAP:-520} python3 benchmarks/ablation.py --device cuda --steps 600 --n 20 \
  --seeds 0 1 2 3 4 --work-dir $W/$name --json $OUT/ablation_$name.json "$@" > $W/$name.log 2>&1; echo "$name rc=$?"; }
ablate otsu_c128 --crop-size 128 --downstream-rows 0 6 --jobs 5 &
ablate calibrated_c128 --crop-size 128 --adaptive calibrated --downstream-rows 6 --jobs 3 &
ablate otsu_c64 --crop-size 64 --downstream-rows 0 6 --jobs 5 &
ablate calibrated_c64 --crop-size 64 --adaptive calibrated --downstream-rows 6 --jobs 3 &
wait
for f in $W/*.log; do echo "== $f"; grep -E "^\||calibrated γ|Error|error" $f | tail -n 14; done
