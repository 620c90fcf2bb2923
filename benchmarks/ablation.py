"""Ablation of the full DiffuMask recipe on ToyWorld: mask IoU and downstream mIoU, step by step.

Each row adds one component to the one above; mask IoU comes from benchmarks/mask_quality.py's
measurement (colour-oracle truth; on labelled pixels, and with ignore-band pixels counted as
misses), downstream mIoU from train/train_deeplab.py --synthetic-only (same steps, batch and
seeds for every row):

1. fixed γ (no ignore band)
2. + adaptive threshold (Otsu per image)
3. + ignore band
   (side row: + affinity refinement, the random walk along image colour; measured, not carried on)
4. + self-attention refinement
5. + noise learning (online, in the trainer: per-class relative cutoff; mask IoU unchanged)
6. + augmentation (splicing at the unspliced scale, blur, occlusion, perspective, scale jitter;
   mask IoU unchanged)

The cumulative rows are the issue's recipe; the affinity refinement is an alternative adaptive
step, so it is measured beside the ignore-band row rather than stacked into the recipe.

    python benchmarks/ablation.py --json out.json
    python benchmarks/ablation.py --steps 600 --seeds 0 1 2 --downstream-rows 0 6 --json out.json
    python benchmarks/ablation.py --adaptive calibrated --steps 600 --seeds 0 1 2 --downstream-rows 6 --json out.json
    # on one GPU, twelve training runs at once:
    python benchmarks/ablation.py --device cuda --jobs 12 --crop-size 128 --steps 600 --seeds 0 1 2 3 4 \
        --downstream-rows 0 6 --json out.json
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import calibrated_mask, measure_mask_quality, train, write_json

from ondemand_seg.settings.resolve import resolve_config
from ondemand_seg.toyworld import write_voc

# (name, MaskConfig overrides or None to keep the row above's, train flags added from this row on,
#  carried: whether later rows build on this one).
FIXED = {"threshold_mode": "fixed", "ignore_band": 0.0}
OTSU = {"threshold_mode": "otsu", "ignore_band": 0.0}
BAND = {"threshold_mode": "otsu", "ignore_band": 0.05}  # DiffuMask's band (the toy preset labels it)
AFFINITY = {**BAND, "refine": "affinity"}
# The toy model's full-resolution block is cross-attention only (only_cross_attention), so its
# finest self-attention runs at latent factor 2; --self-attention-factor changes it for other models.
SELF_ATTENTION = {**BAND, "self_attention_factor": 2}
ROWS = [
    ("fixed γ", FIXED, [], True),
    ("+ adaptive threshold (Otsu)", OTSU, [], True),
    ("+ ignore band", BAND, [], True),
    ("  (side row) ignore band + affinity refinement", AFFINITY, [], False),
    ("+ self-attention refinement", SELF_ATTENTION, [], True),
    ("+ noise learning", None, ["--noise-cutoff", "0.3", "--noise-drop-fraction", "0.1"], True),
    ("+ augmentation", None, ["--augment", "full", "--splice-fit", "crop"], True),  # rows above: --augment basic
]


def mask_flags(mask: dict) -> list[str]:
    """train_deeplab.py flags that set the same MaskConfig fields."""
    flags = ["--threshold-mode", mask.get("threshold_mode", "fixed")]
    if mask.get("class_thresholds"):
        flags += ["--class-thresholds", *(f"{name}={gamma}" for name, gamma in mask["class_thresholds"].items())]
    if "ignore_band" in mask:
        flags += ["--ignore-band", str(mask["ignore_band"])]
    if "refine" in mask:
        flags += ["--refine", mask["refine"]]
    if "self_attention_factor" in mask:
        flags += ["--self-attention-factor", str(mask["self_attention_factor"])]
    return flags


def train_quietly(flags: list[str], output_dir: Path) -> dict:
    """Run train_deeplab.py with its output in ``output_dir/train.log`` and one OpenMP thread
    (for --jobs > 1); its final summary."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "train.log", "w") as log:
        try:
            return train(flags, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        except RuntimeError as error:
            raise RuntimeError(f"{error}; log: {output_dir / 'train.log'}") from None


def write_toyworld(model, data_dir: Path) -> None:
    """The ToyWorld folder train_deeplab.py writes into ``--data-dir`` when it has no real data
    (its ``default_voc_root``: 1,000 train and 200 val images at the generator's size, seed 0),
    written here once so that parallel runs do not race to write it."""
    if not (data_dir / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").is_file():
        write_voc(data_dir, n_train=1000, n_val=200, image_size=resolve_config(model).image_size, seed=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="ablation: mask IoU and downstream mIoU of the full DiffuMask recipe")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--n", type=int, default=100, help="samples for mask IoU per row")
    parser.add_argument("--steps", type=int, default=300, help="training steps per row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds per downstream row; the row's figure is their mean (single runs "
                             "spread 3-7 mIoU points; the ToyWorld val split is the same for every seed)")
    parser.add_argument("--rows", type=int, default=len(ROWS), help="run the first N rows")
    parser.add_argument("--no-downstream", action="store_true", help="mask IoU only")
    parser.add_argument("--downstream-rows", type=int, nargs="+", default=None,
                        help="train only these rows (0-based; e.g. 0 6: fixed γ and the full recipe); default all")
    parser.add_argument("--adaptive", choices=["otsu", "calibrated"], default="otsu",
                        help="the adaptive threshold of row 1 on: Otsu per image (no labels), or per-class γ "
                             "calibrated on --calibrate-n oracle-labelled samples per class")
    parser.add_argument("--calibrate-n", type=int, default=20, help="labelled samples per class for --adaptive calibrated")
    parser.add_argument("--crop-size", type=int, default=None, help="training and evaluation size (default: the trainer's, 64)")
    parser.add_argument("--device", default=None, help="training device (default: the trainer's choice)")
    parser.add_argument("--gen-steps", type=int, default=None,
                        help="denoising steps of the generator, for mask IoU and training (default: the preset's)")
    parser.add_argument("--gen-batch-size", type=int, default=None,
                        help="images per generation call, for mask IoU and training (default: the preset's)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training runs at once, each its own process with one CPU thread (e.g. 12 on one GPU)")
    parser.add_argument("--work-dir", type=Path, default=Path("out/ablation"))
    parser.add_argument("--self-attention-factor", type=int, default=2,
                        help="latent factor of the self-attention used for refinement (the toy model's finest: 2)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.calibrate_n < 1:
        raise SystemExit(f"error: --jobs and --calibrate-n must be >= 1, got {args.jobs} and {args.calibrate_n}")
    # Runs already in the JSON with the same flags and steps are kept, not repeated: the table can
    # be built (or resumed) a few runs at a time.
    earlier = {r["row"]: r for r in json.loads(args.json.read_text())} if args.json and args.json.exists() else {}
    generator = {key: value for key, value in {"num_inference_steps": args.gen_steps,
                                                "batch_size": args.gen_batch_size}.items() if value is not None}
    common = [*(["--crop-size", str(args.crop_size)] if args.crop_size else []),
              *(["--device", args.device] if args.device else [])]
    # (mask overrides, added train flags, mask IoU on labelled pixels, with band as miss) of the last carried row
    results, carried, pending, calibration = [], ({}, [], None, None), [], {}
    for name, overrides, extra, carry_on in ROWS[: args.rows]:
        mask, added, iou, strict = carried
        added = added + extra
        if overrides is not None:
            mask = dict(overrides)
            if "self_attention_factor" in mask:
                mask["self_attention_factor"] = args.self_attention_factor
            if args.adaptive == "calibrated" and mask["threshold_mode"] == "otsu":
                mask = calibrated_mask(args.model, mask, args.calibrate_n, calibration, generator)
                name = name.replace("Otsu", f"per-class γ, {args.calibrate_n} labelled samples per class")
            quality = measure_mask_quality(args.model, args.n, mask_overrides=mask, generator_overrides=generator,
                                           progress=False)
            iou, strict = quality["diffumask"]["mean"], quality["diffumask_band_as_miss"]["mean"]
        if carry_on:
            carried = (mask, added, iou, strict)
        flags = mask_flags(mask) + added + common
        if "--augment" not in added:
            flags += ["--augment", "basic"]
        if args.gen_steps is not None:
            flags += ["--gen-steps", str(args.gen_steps)]
        if args.gen_batch_size is not None:
            flags += ["--gen-batch-size", str(args.gen_batch_size)]
        row = {"row": name, "mask_iou": iou, "mask_iou_band_as_miss": strict, "mask_overrides": mask,
               "train_flags": flags, "carried": carry_on, "steps": args.steps}
        before = earlier.get(name, {})
        if before.get("train_flags") == flags and before.get("steps") == args.steps:
            row["downstream_runs"] = dict(before.get("downstream_runs", {}))
        results.append(row)
        print(json.dumps({"row": name, "mask_iou": iou, "band_as_miss": strict}), flush=True)
        if not args.no_downstream and (args.downstream_rows is None or len(results) - 1 in args.downstream_rows):
            pending += [(len(results) - 1, seed) for seed in args.seeds
                        if str(seed) not in row.get("downstream_runs", {})]

    def launch(job: tuple[int, int]) -> dict:
        index, seed = job
        flags = ["--synthetic-only", "--model", args.model, "--vocabulary", "toy", "--steps", str(args.steps),
                 "--seed", str(seed), "--output-dir", str(args.work_dir / f"row{index}_seed{seed}"),
                 "--data-dir", str(args.work_dir / "toyworld"), *results[index]["train_flags"]]
        if args.jobs == 1:
            return train(flags)
        return train_quietly([*flags, "--threads", "1"], args.work_dir / f"row{index}_seed{seed}")

    if pending and args.jobs > 1:
        write_toyworld(args.model, args.work_dir / "toyworld")
    # Seed-major order: runs cut short by a time limit still leave rows paired by seed.
    pending.sort(key=lambda job: (args.seeds.index(job[1]), job[0]))
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(launch, job): job for job in pending}
        for future in concurrent.futures.as_completed(futures):
            (index, seed), summary = futures[future], future.result()
            results[index].setdefault("downstream_runs", {})[str(seed)] = {
                "miou": summary["miou"], "per_class_iou": summary["per_class_iou"],
                "noise_filter": summary.get("noise_filter")}
            write_json(args.json, results)  # after every run: an interrupted table keeps what it measured
    for row in results:
        if row.get("downstream_runs"):
            mious = [r["miou"] for r in row["downstream_runs"].values()]
            row["downstream_miou"] = statistics.mean(mious)
            row["downstream_miou_std"] = statistics.stdev(mious) if len(mious) > 1 else None
    print("| recipe | mask IoU | band as miss | downstream mIoU (mean ± sd over seeds) | seeds |\n|---|---|---|---|---|")
    for r in results:
        seeds = ", ".join(f"{s}: {v['miou']:.3f}" for s, v in r.get("downstream_runs", {}).items())
        spread = f" ± {r['downstream_miou_std']:.3f}" if r.get("downstream_miou_std") is not None else ""
        print(f"| {r['row']} | {r['mask_iou']:.3f} | {r['mask_iou_band_as_miss']:.3f} | "
              f"{r.get('downstream_miou', float('nan')):.3f}{spread} | {seeds} |")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
