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
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import mask_quality
from common import train, write_json

# (name, MaskConfig overrides or None to keep the row above's, train flags added from this row on,
#  carried: whether later rows build on this one).
FIXED = {"threshold_mode": "fixed", "ignore_band": 0.0}
OTSU = {"threshold_mode": "otsu", "ignore_band": 0.0}
BAND = {"threshold_mode": "otsu"}
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
    if mask.get("ignore_band") == 0.0:
        flags.append("--no-ignore-band")
    if "refine" in mask:
        flags += ["--refine", mask["refine"]]
    if "self_attention_factor" in mask:
        flags += ["--self-attention-factor", str(mask["self_attention_factor"])]
    return flags


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="ablation: mask IoU and downstream mIoU of the full DiffuMask recipe")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--n", type=int, default=100, help="samples for mask IoU per row")
    parser.add_argument("--steps", type=int, default=300, help="training steps per row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds per downstream row; the row's figure is their mean (single runs "
                             "spread 3-4 mIoU points; the ToyWorld val split is the same for every seed)")
    parser.add_argument("--rows", type=int, default=len(ROWS), help="run the first N rows")
    parser.add_argument("--no-downstream", action="store_true", help="mask IoU only")
    parser.add_argument("--downstream-rows", type=int, nargs="+", default=None,
                        help="train only these rows (0-based; e.g. 0 6: fixed γ and the full recipe); default all")
    parser.add_argument("--work-dir", type=Path, default=Path("out/ablation"))
    parser.add_argument("--self-attention-factor", type=int, default=2,
                        help="latent factor of the self-attention used for refinement (the toy model's finest: 2)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    # Runs already in the JSON with the same flags and steps are kept, not repeated: the table can
    # be built (or resumed) a few runs at a time.
    earlier = {r["row"]: r for r in json.loads(args.json.read_text())} if args.json and args.json.exists() else {}
    # (mask overrides, added train flags, mask IoU on labelled pixels, with band as miss) of the last carried row
    results, carried = [], ({}, [], None, None)
    for name, overrides, extra, carry_on in ROWS[: args.rows]:
        mask, added, iou, strict = carried
        added = added + extra
        if overrides is not None:
            mask = dict(overrides)
            if "self_attention_factor" in mask:
                mask["self_attention_factor"] = args.self_attention_factor
            quality = mask_quality.measure(args.model, args.n, mask_overrides=mask, progress=False)
            iou, strict = quality["diffumask"]["mean"], quality["diffumask_band_as_miss"]["mean"]
        if carry_on:
            carried = (mask, added, iou, strict)
        flags = mask_flags(mask) + added
        if "--augment" not in added:
            flags += ["--augment", "basic"]
        row = {"row": name, "mask_iou": iou, "mask_iou_band_as_miss": strict, "mask_overrides": mask,
               "train_flags": flags, "carried": carry_on, "steps": args.steps}
        before = earlier.get(name, {})
        if before.get("train_flags") == flags and before.get("steps") == args.steps:
            row["downstream_runs"] = dict(before.get("downstream_runs", {}))
        results.append(row)
        if not args.no_downstream and (args.downstream_rows is None or len(results) - 1 in args.downstream_rows):
            runs = row.setdefault("downstream_runs", {})
            for seed in args.seeds:
                if str(seed) in runs:
                    continue
                summary = train(
                    ["--synthetic-only", "--model", args.model, "--label-space", "toy", "--steps", str(args.steps),
                     "--seed", str(seed), "--output-dir", str(args.work_dir / f"row{len(results) - 1}_seed{seed}"),
                     "--data-dir", str(args.work_dir / "toyworld"), *flags])
                runs[str(seed)] = {"miou": summary["miou"], "per_class_iou": summary["per_class_iou"],
                                   "noise_filter": summary.get("noise_filter")}
                write_json(args.json, results)  # after every run: an interrupted table keeps what it measured
        if row.get("downstream_runs"):
            mious = [r["miou"] for r in row["downstream_runs"].values()]
            row["downstream_miou"] = statistics.mean(mious)
            row["downstream_miou_std"] = statistics.stdev(mious) if len(mious) > 1 else None
        print(json.dumps({k: row[k] for k in ("row", "mask_iou") if k in row} | {"downstream": row.get("downstream_miou")}),
              flush=True)
    print("| recipe | mask IoU | band as miss | downstream mIoU (mean over seeds) | seeds |\n|---|---|---|---|---|")
    for r in results:
        seeds = ", ".join(f"{s}: {v['miou']:.3f}" for s, v in r.get("downstream_runs", {}).items())
        print(f"| {r['row']} | {r['mask_iou']:.3f} | {r['mask_iou_band_as_miss']:.3f} | "
              f"{r.get('downstream_miou', float('nan')):.3f} | {seeds} |")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
