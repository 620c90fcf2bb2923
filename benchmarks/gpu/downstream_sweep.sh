#!/bin/bash
# The GPU sweep behind the downstream defaults (benchmarks/RESULTS.md, section 2): twelve
# train_deeplab.py runs at once on one GPU (each 1 worker, 1 CPU thread, capped at 330 s),
# then their final (and intermediate) mIoU in one JSON.
#
#   bash benchmarks/gpu/downstream_sweep.sh out_dir
#
# Measured on one H100 (2026-11-26, code of commit 1b006c1; the flags pin what were the defaults
# then: one class per prompt, --augment basic, DiffuMask's band, DDIM 25): benchmarks/results/downstream_gpu_sweep.json.
set -u
OUT=${1:?usage: downstream_sweep.sh OUT_DIR}
W=$OUT/runs; mkdir -p $W $OUT/logs
python3 -c "from ondemand_seg.toyworld import write_voc; write_voc('$W/toyworld', n_train=1000, n_val=200, image_size=64, seed=0)"
run() { name=$1; shift; timeout 330 python3 train/train_deeplab.py --device cuda --threads 1 --workers 1 --data-dir $W/toyworld --output-dir $W/$name --steps 600 "$@" > $OUT/logs/$name.log 2>&1; echo "$name rc=$?"; }
S="--synthetic-only --classes-per-prompt 1 --ignore-band 0.05 --gen-steps 25"
B="--augment basic"
run real --real-only &
run syn $S $B &
run syn_reuse1 $S $B --reuse 1 &
run syn_cpp2 $S $B --classes-per-prompt 2 &
run syn_cpp2_full $S --classes-per-prompt 2 --augment full &
run syn_otsu_aff $S $B --threshold-mode otsu --refine affinity &
run mixed --classes-per-prompt 1 --ignore-band 0.05 --gen-steps 25 $B &
run real_1500 --real-only --steps 1500 --eval-every 300 &
run syn_cpp2_full_1500 $S --classes-per-prompt 2 --augment full --steps 1500 --eval-every 300 &
run real_c128 --real-only --crop-size 128 &
run syn_c128 $S $B --crop-size 128 &
run syn_cpp2_full_c128 $S --classes-per-prompt 2 --augment full --crop-size 128 &
wait
OUT=$OUT python3 - <<'PY'
import glob, json, os
out = {}
for f in sorted(glob.glob(os.environ["OUT"] + "/runs/*/metrics.jsonl")):
    name = f.split("/")[-2]
    rows = [json.loads(line) for line in open(f)]
    finals = [r for r in rows if r["event"] == "final"]
    out[name] = {"last_step": max([r["step"] for r in rows if r["event"] == "train"], default=0),
                 "eval_miou": {r["step"]: r["miou"] for r in rows if r["event"] == "eval"}}
    if finals:
        out[name].update({k: finals[-1][k] for k in ("miou", "per_class_iou", "train_seconds", "data_wait_fraction")})
    print(f"{name:22s} {out[name].get('miou', float('nan')):.3f} (step {out[name]['last_step']})")
json.dump(out, open(os.environ["OUT"] + "/downstream_gpu_sweep.json", "w"), indent=1)
PY
