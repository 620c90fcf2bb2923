#!/bin/bash
# Bare pipeline vs DiffuMask capture, time and peak memory, at batch 1 and 4, for the full-size
# random-weight SDXL (1024 px) and SD3 Medium (1024 px) architectures, and Flux.1-dev when
# FLUX=1 (12B parameters; about twice the time of the other two together). 20 steps of each
# model's own scheduler and guidance; modes interleaved call by call in one process per setting.
#
#   bash benchmarks/gpu/families_throughput.sh OUT_DIR          # on the GPU machine
#   TINY=1 bash benchmarks/gpu/families_throughput.sh OUT_DIR   # the same commands on a CPU, tiny models
#
# Results: OUT_DIR/throughput_{sdxl,sd3,flux}.json (benchmarks/RESULTS.md, model families).
set -u
OUT=${1:?usage: families_throughput.sh OUT_DIR}
mkdir -p "$OUT"
EXTRA=""; STEPS=${STEPS:-20}; REPEATS=${REPEATS:-2}
if [ "${TINY:-0}" = 1 ]; then EXTRA="--tiny --device cpu"; STEPS=2; REPEATS=1; fi
ARCHS="sdxl sd3"; [ "${FLUX:-0}" = 1 ] && ARCHS="$ARCHS flux"
status=0
for arch in $ARCHS; do
  timeout ${CAP:-300} python3 benchmarks/throughput.py --arch $arch --random-weights $EXTRA \
    --batch-sizes 1 4 --schedules default:$STEPS --repeats $REPEATS --modes bare diffumask \
    --json "$OUT/throughput_$arch.json" 2>&1 | grep -v -i warn
  rc=${PIPESTATUS[0]}; echo "$arch rc=$rc"; [ $rc = 0 ] || status=1
done
exit $status
