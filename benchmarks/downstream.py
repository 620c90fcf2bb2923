"""Downstream: DeepLabV3 mIoU on ToyWorld val after training on synthetic, real or mixed data.

DiffuMask's headline table in miniature, plus the synthetic-only candidates for the training
defaults. Every run uses the same steps, batch size, crop size and ToyWorld val split; only the
training data (and the seed, with ``--seeds``) differ:

- ``real_only``: real ToyWorld train images with their exact masks;
- ``synthetic_only``: the DiffuMask stream from the embedded toy model (no real labels at all),
  with the training defaults (the toy preset labels the uncertain band around γ);
- ``mixed``: real + synthetic through ``ConcatDataset`` (``--synthetic-ratio``);
- ``synthetic_reuse_4``: as synthetic_only, each generated sample served 4 times instead of 8;
- ``synthetic_25_gen_steps``: as synthetic_only, generating with DDIM 25 steps instead of the preset's 10;
- ``synthetic_ignore_band``: as synthetic_25_gen_steps, with DiffuMask's band (γ ± 0.05 ignored);
- ``mixed_ignore_band``: as mixed, with DiffuMask's band and DDIM 25;
- ``synthetic_basic_augment``: as synthetic_only, crop/scale/flip only (no splicing, blur, occlusion);
- ``synthetic_1_to_3_classes``: as synthetic_25_gen_steps, each prompt naming 1 to 3 classes (drawn per
  prompt; ToyWorld's real scenes hold 1 to 3 objects) instead of the preset's 2.

    python benchmarks/downstream.py --json out.json
    python benchmarks/downstream.py --runs real_only synthetic_only --seeds 0 1 2 --json out.json

The figure of a run is the mean ± sample standard deviation over its seeds; each synthetic run's
gap to ``real_only`` is in mIoU points (positive: synthetic is below real), over the seeds both
have, with the seeds it is ahead on and the paired t-test's p. Real-only runs made with other
trainer flags (their own JSON) are the comparison with ``--baseline``:

    python benchmarks/downstream.py --runs synthetic_only --json syn.json --baseline real.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import baseline_runs, paired_gain, resumable_runs, train, write_json

RUNS = {
    "real_only": ["--real-only"],
    "synthetic_only": ["--synthetic-only"],
    "mixed": [],
    "synthetic_reuse_4": ["--synthetic-only", "--reuse", "4"],
    "synthetic_basic_augment": ["--synthetic-only", "--augment", "basic"],
    # These pin DDIM 25 generation steps, the setting their runs in RESULTS.md were measured at:
    "synthetic_25_gen_steps": ["--synthetic-only", "--gen-steps", "25"],
    "synthetic_ignore_band": ["--synthetic-only", "--ignore-band", "0.05", "--gen-steps", "25"],
    "mixed_ignore_band": ["--ignore-band", "0.05", "--gen-steps", "25"],
    "synthetic_1_to_3_classes": ["--synthetic-only", "--classes-per-prompt", "1", "3", "--gen-steps", "25"],
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="mIoU of DeepLabV3 trained on synthetic vs real vs mixed ToyWorld data")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS)[:3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds per run")
    parser.add_argument("--work-dir", type=Path, default=Path("out/downstream"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a JSON of this script whose real_only runs the others are compared with, when --json "
                             "holds none (real-only runs made with other trainer flags, e.g. -- --threads 1)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more train_deeplab.py flags, after --")
    return parser


def by_seed(runs: dict) -> dict[str, dict[int, float]]:
    """``{"name/seedS": {"miou": ...}}`` → ``{name: {seed: miou}}``."""
    mious: dict[str, dict[int, float]] = {}
    for key, run in runs.items():
        name, seed = key.rsplit("/seed", 1)
        mious.setdefault(name, {})[int(seed)] = run["miou"]
    return mious


def summarize(runs: dict, baseline: dict | None = None) -> dict:
    """``{"name/seedS": {"miou": ...}}`` → per name: mean, sample std, seeds and per-seed mIoU, and
    for every other name its gap to ``real_only`` in points over the seeds both have, how many of
    them it is ahead on, and the paired t-test's two-sided p. ``real_only`` comes from ``runs``,
    else from ``baseline`` (runs of another JSON, e.g. run with other trainer flags)."""
    names = by_seed(runs)
    summary = {}
    for name, mious in names.items():
        values = [mious[s] for s in sorted(mious)]
        summary[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                         "seeds": sorted(mious), "miou": values}
    real = names.get("real_only") or by_seed(baseline or {}).get("real_only", {})
    for name, mious in names.items():
        paired = paired_gain(mious, real)
        if name == "real_only" or not paired:
            continue
        row = summary[name]
        row.update(gap_points=-paired["gain_points"], gap_seeds=paired["seeds"], ahead=paired["ahead"])
        row.update({k: paired[k] for k in ("paired_sd_points", "p_paired") if k in paired})
    return summary


def table(summary: dict) -> str:
    lines = ["| training data | mIoU mean ± sd | seeds | per seed | below real-only (points, same seeds) "
             "| ahead of real-only | p (paired t) |", "|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        spread = f" ± {row['std']:.3f}" if row["std"] is not None else ""
        gap = f"{row['gap_points']:+.1f}" if "gap_points" in row else "–"
        ahead = f"{row['ahead']} of {len(row['gap_seeds'])}" if "ahead" in row else "–"
        p = f"{row['p_paired']:.2g}" if "p_paired" in row else "–"
        lines.append(f"| {name} | {row['mean']:.3f}{spread} | {len(row['seeds'])} | "
                     f"{', '.join(f'{v:.3f}' for v in row['miou'])} | {gap} | {ahead} | {p} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    # Runs done earlier into the same JSON are kept, so the table can be built a run at a time.
    config = {"steps": args.steps, "extra": extra}
    runs = resumable_runs(args.json, config)
    baseline = baseline_runs(args.baseline)
    for name in args.runs:
        for seed in args.seeds:
            key = f"{name}/seed{seed}"
            if key in runs:
                continue
            flags = [*RUNS[name], "--steps", str(args.steps), "--seed", str(seed),
                     "--output-dir", str(args.work_dir / name / f"seed{seed}"),
                     "--data-dir", str(args.work_dir / "toyworld"), *extra]
            print(f"== {key}: train_deeplab.py {' '.join(flags)}", flush=True)
            started = time.perf_counter()
            final = train(flags)
            runs[key] = {"miou": final["miou"], "per_class_iou": final["per_class_iou"],
                         "data_wait_fraction": final["data_wait_fraction"],
                         "minutes": (time.perf_counter() - started) / 60, "flags": flags}
            # After every run: an interrupted table keeps what it measured.
            write_json(args.json, {"config": config, "runs": runs, "summary": summarize(runs, baseline)})
    summary = summarize(runs, baseline)
    write_json(args.json, {"config": config, "runs": runs, "summary": summary})
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
