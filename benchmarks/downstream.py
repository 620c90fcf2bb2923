"""Downstream: DeepLabV3 mIoU on ToyWorld val after training on synthetic, real or mixed data.

DiffuMask's headline table in miniature, plus its ignore-band ablation. Every run uses the same
steps, batch size, crop size, seed and ToyWorld val split; only the training data differ:

- ``real_only``: real ToyWorld train images with their exact masks;
- ``synthetic_only``: the DiffuMask stream from the embedded toy model (no real labels at all);
- ``mixed``: real + synthetic through ``ConcatDataset`` (``--synthetic-ratio``);
- ``synthetic_no_ignore_band``: as synthetic_only, but the uncertain band is labelled, not ignored.

    python benchmarks/downstream.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import train, write_json

RUNS = {
    "real_only": ["--real-only"],
    "synthetic_only": ["--synthetic-only"],
    "mixed": [],
    "synthetic_no_ignore_band": ["--synthetic-only", "--no-ignore-band"],
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="mIoU of DeepLabV3 trained on synthetic vs real vs mixed ToyWorld data")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    parser.add_argument("--work-dir", type=Path, default=Path("out/downstream"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more train_deeplab.py flags, after --")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    # Runs done earlier into the same JSON are kept, so the table can be built a run at a time.
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    results.pop("synthetic_gap_points", None)
    for name in args.runs:
        flags = [*RUNS[name], "--steps", str(args.steps), "--output-dir", str(args.work_dir / name),
                 "--data-dir", str(args.work_dir / "toyworld"), *extra]
        print(f"== {name}: train_deeplab.py {' '.join(flags)}", flush=True)
        started = time.perf_counter()
        summary = train(flags)
        results[name] = {"miou": summary["miou"], "per_class_iou": summary["per_class_iou"],
                         "data_wait_fraction": summary["data_wait_fraction"], "minutes": (time.perf_counter() - started) / 60,
                         "flags": flags}
        write_json(args.json, results)  # after every run: an interrupted table keeps what it measured
    print("| training data | mIoU | minutes |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['miou']:.3f} | {r['minutes']:.1f} |")
    if "real_only" in results and "synthetic_only" in results:
        gap = 100 * (results["real_only"]["miou"] - results["synthetic_only"]["miou"])
        results["synthetic_gap_points"] = gap
        print(f"synthetic-only is {gap:.1f} mIoU points below real-only (target: within 10)")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
