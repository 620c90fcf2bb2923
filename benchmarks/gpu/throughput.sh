#!/bin/bash
# The generator's GPU speed rows in one call, within BUDGET seconds (default 470, about 8 minutes, on an
# H100/H200): the full-size Stable Diffusion 1.5 architecture with random weights, 512 px, fp16,
# guidance 7.5, bare pipeline vs DiffuMask capture, modes interleaved call by call (peak memory in
# a process per mode), then the trainer's data wait with generation beside it on the same GPU.
#
#   sd15_ddim        DDIM $STEPS at batch 1, 8 and 16 (STEPS default 20 to fit the budget; capture
#                    costs per step, but the fixed VAE decode weighs more at 20 steps, so the ratio
#                    to bare comes out a little under DDIM 50's, the steps of RESULTS.md's H100 rows)
#   sd15_dpm25       DPM-Solver++ (DPMSolverMultistepScheduler's default) 25 steps at batch 8
#   feeding          DeepLabV3-ResNet50 trainer (batch 8, 512 px crops) fed by one DataLoader worker
#                    generating on the GPU (DDIM 20, batch 8), 20 steps at reuse 1, 4 and 16
#   sd15_channels_last, sd15_compiled   the sd15_ddim row at batch 8 with GeneratorConfig
#                    channels_last, then compile + channels_last. Compiling takes minutes (three
#                    processes each compile the UNet: timing, then peak memory per mode), so in one
#                    call with the rest it gets what is left of BUDGET; if cut (rc 124), run
#                    SECTIONS=sd15_compiled alone. TINY=1 skips it: inductor takes minutes to build
#                    even the tiny UNet on a CPU.
#
#   bash benchmarks/gpu/throughput.sh OUT_DIR                      # on the GPU machine
#   TINY=1 bash benchmarks/gpu/throughput.sh OUT_DIR               # the same commands on a CPU, tiny models
#   SECTIONS="sd15_compiled" bash benchmarks/gpu/throughput.sh OUT_DIR   # some sections only
#
# Results: OUT_DIR/<section>.json, each written after every row, so a section cut by its time cap
# keeps what it measured; OUT_DIR/<section>.log; OUT_DIR/sections.jsonl (exit status, seconds and
# cap of each section; rc 124 = cut by its cap, "skipped" = not started). The feeding runs'
# random-weight model folder (2 GB) and checkpoints go to WORK (default /tmp/gpu_throughput), not OUT_DIR.
set -u
OUT=${1:?usage: throughput.sh OUT_DIR}
WORK=${WORK:-/tmp/gpu_throughput}
mkdir -p "$OUT" "$WORK"
: > "$OUT/sections.jsonl"
SECTIONS=${SECTIONS:-"sd15_ddim sd15_dpm25 feeding sd15_channels_last sd15_compiled"}
ARCH="--arch sd15 --random-weights"; DEVICE=""; STEPS=${STEPS:-20}; REPEATS=${REPEATS:-2}; BATCHES="1 8 16"; BIG=8
# torch's prefetch of 2 batches: at 512 px the trainer's default (reuse batches per worker, 16 at
# reuse 16, 25 MB each) can outgrow a container's /dev/shm; its size is logged below.
FEED="--reuse 1 4 16 --steps 20 -- --backbone resnet50 --batch-size 8 --crop-size 512 --gen-steps 20 --gen-batch-size 8 --prefetch-batches 2"
SLOW=1
if [ "${TINY:-0}" = 1 ]; then
  DEVICE="--tiny --device cpu"; STEPS=2; REPEATS=1; BATCHES="1 2"; BIG=2; SLOW=2
  # One thread per process: on a shared CPU, OpenMP threads spinning against the other processes
  # (throughput workers, DataLoader workers) make the tiny models a hundred times slower.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  FEED="--tiny --reuse 1 16 --steps 2 -- --device cpu --backbone resnet50 --batch-size 2 --crop-size 64 \
    --gen-steps 2 --gen-batch-size 2"
fi
BUDGET=${BUDGET:-$((470 * SLOW))}
[ "${TINY:-0}" = 1 ] || nvidia-smi -L
df -h /dev/shm || true
status=0

# section NAME CAP COMMAND...: run COMMAND under the smaller of CAP (scaled on a CPU) and what is
# left of BUDGET; a section with under 30 s left is skipped.
section() {
  local name=$1 cap=$(($2 * SLOW)) left=$((BUDGET - SECONDS)) start=$SECONDS rc
  shift 2
  case " $SECTIONS " in *" $name "*) ;; *) return ;; esac
  if [ $left -lt 30 ]; then
    echo "$name: skipped, ${left}s of the ${BUDGET}s budget left"
    echo "{\"section\": \"$name\", \"rc\": \"skipped\", \"seconds\": 0, \"cap\": 0}" >> "$OUT/sections.jsonl"
    status=1; return
  fi
  [ $cap -gt $left ] && cap=$left
  timeout $cap "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $((SECONDS - start))s (cap ${cap}s)"
  grep -v -i warn "$OUT/$name.log" | grep -E "img/s|data wait|^\| [0-9]|Error|error" | tail -n 12
  echo "{\"section\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"cap\": $cap}" >> "$OUT/sections.jsonl"
  [ $rc = 0 ] || status=1
}

# skip NAME REASON: a section that cannot run here, said in the output and in sections.jsonl.
skip() {
  case " $SECTIONS " in *" $1 "*) ;; *) return ;; esac
  echo "$1: skipped, $2"
  echo "{\"section\": \"$1\", \"rc\": \"skipped\", \"seconds\": 0, \"cap\": 0, \"why\": \"$2\"}" >> "$OUT/sections.jsonl"
}

THROUGHPUT="python3 benchmarks/throughput.py $ARCH $DEVICE --modes bare diffumask --repeats $REPEATS"

section sd15_ddim 170 $THROUGHPUT --batch-sizes $BATCHES --schedules ddim:$STEPS --json "$OUT/sd15_ddim.json"
section sd15_dpm25 70 $THROUGHPUT --batch-sizes $BIG --schedules dpm:25 --json "$OUT/sd15_dpm25.json"
section feeding 170 python3 benchmarks/feeding.py $ARCH --workers 1 --work-dir "$WORK/feeding" \
  --json "$OUT/feeding.json" $FEED
section sd15_channels_last 60 $THROUGHPUT --batch-sizes $BIG --schedules ddim:$STEPS --channels-last \
  --json "$OUT/sd15_channels_last.json"
if [ "${TINY:-0}" = 1 ]; then
  skip sd15_compiled "TINY=1: inductor takes minutes on a CPU (the compiled path is tests/test_generation.py's)"
else
  section sd15_compiled 240 $THROUGHPUT --batch-sizes $BIG --schedules ddim:$STEPS --compile --channels-last \
    --json "$OUT/sd15_compiled.json"
fi
echo "total ${SECONDS}s of ${BUDGET}s"
exit $status
