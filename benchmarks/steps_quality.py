"""Steps and schedulers: what fewer denoising steps cost in mask quality, on the toy models.

Each row generates the same ``n`` prompts and seeds as ``benchmarks/mask_quality.py`` with one
(scheduler, steps) choice and scores the DiffuMask masks (the model's preset otherwise: fusion,
timestep window, γ, band) against the ToyWorld colour oracle. Per row: IoU per class and mean,
ignore pixels as misses, the share of images the oracle finds the prompted object in, gate
rejects, seconds per image in the generator's calls (generation, capture, masks; model
loaded before), and IoU and time relative to the model's first row (the model's own scheduler at
25 steps).

The timestep window is a fraction of the steps; ``recorded`` lists the step indices the capture
records at each step count (the store records at least one).

    python benchmarks/steps_quality.py --models toy --n 100 --threads 1 --ignore-band 0.05 --json benchmarks/results/steps_quality.json
    python benchmarks/steps_quality.py --n 10 --rows toy:default:25 toy:DPMSolverMultistepScheduler:10
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import measure_mask_quality, write_json

from ondemand_seg.generation.capture import AttentionStore

DPM = "DPMSolverMultistepScheduler"  # DPM-Solver++ (its default algorithm_type), order 2
# model:scheduler:steps, "default" being the model's own scheduler; each model's first row is the
# reference the others are compared with.
GRID = (
    "toy:default:25", "toy:default:50", "toy:default:10",
    f"toy:{DPM}:25", f"toy:{DPM}:20", f"toy:{DPM}:15", f"toy:{DPM}:10", f"toy:{DPM}:5",
    "toy:EulerDiscreteScheduler:20",
    "toy-mmdit:default:25", "toy-mmdit:default:15", "toy-mmdit:default:10", "toy-mmdit:default:4",
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Mask IoU and seconds per image for each (scheduler, steps)")
    parser.add_argument("--n", type=int, default=200, help="samples per row, spread evenly over the classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gen-batch-size", type=int, default=None,
                        help="images per pipeline call (default: the model preset's, 20 for the toy models)")
    parser.add_argument("--rows", nargs="+", default=list(GRID), metavar="MODEL:SCHEDULER:STEPS",
                        help="rows to run ('default' = the model's own scheduler); default: the grid above")
    parser.add_argument("--models", nargs="+", default=None, help="keep only the rows of these models")
    parser.add_argument("--ignore-band", type=float, default=None, metavar="W",
                        help="override the model presets' ignore band (default: each preset's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 times more steadily on a busy machine")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def parse_row(text: str) -> tuple[str, str | None, int]:
    """``"model:scheduler:steps"`` → ``(model, scheduler or None, steps)``."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
        raise SystemExit(f"a row is MODEL:SCHEDULER:STEPS (e.g. toy:{DPM}:20), got {text!r}")
    model, scheduler, steps = parts
    return model, None if scheduler == "default" else scheduler, int(steps)


def recorded_steps(steps: int, window: tuple[float, float]) -> list[int]:
    """Indices of the denoising steps the capture records for ``window`` at ``steps`` steps."""
    store = AttentionStore()
    store.begin(torch.zeros(1, 1, 1), (1, 1), steps, tuple(window))
    recorded = []
    for step in range(steps):
        if store.recording:
            recorded.append(step)
        store.on_step(step)
    return recorded


def run_row(model: str, scheduler: str | None, steps: int, n: int, seed: int, batch_size: int | None,
            mask_overrides: dict | None = None) -> dict:
    """One row: ``n`` samples of ``model`` generated with ``scheduler`` (None: the model's own) at
    ``steps`` steps, scored against the colour oracle."""
    generator = {"num_inference_steps": steps, **({} if scheduler is None else {"scheduler": scheduler})}
    result = measure_mask_quality(model, n, seed, batch_size, progress=False, mask_overrides=mask_overrides,
                                  generator_overrides=generator, other_readings=False)
    return {
        "model": model, "scheduler": result["scheduler"], "steps": steps,
        "recorded": recorded_steps(steps, result["mask_config"]["timestep_window"]),
        "per_class": result["diffumask"]["per_class"], "mean": result["diffumask"]["mean"],
        "band_as_miss": result["diffumask_band_as_miss"]["mean"], "accepted": result["accepted"]["mean"],
        "gate_rejected": result["gate_rejected"], "drawn_fraction": result["drawn_fraction"],
        "seconds_per_image": result["generation_seconds"] / n,
        "sampler_config": result["sampler_config"], "mask_config": result["mask_config"],
    }


def add_relative(rows: list[dict]) -> None:
    """IoU change and time ratio of each row against its model's first row."""
    reference: dict[str, dict] = {}
    for row in rows:
        base = reference.setdefault(row["model"], row)
        row["mean_change"] = row["mean"] - base["mean"]
        row["time_ratio"] = row["seconds_per_image"] / base["seconds_per_image"]


def markdown(rows: list[dict]) -> str:
    classes = list(rows[0]["per_class"])
    lines = ["| model | scheduler | steps | steps recorded | " + " | ".join(classes)
             + " | **mean** | vs first row | ignore as miss | object drawn | rejected | s/image | time vs first row |",
             "|---" * (len(classes) + 11) + "|"]
    for row in rows:
        drawn = sum(row["drawn_fraction"].values()) / len(row["drawn_fraction"])
        lines.append(
            f"| {row['model']} | {row['scheduler']} | {row['steps']} | {len(row['recorded'])} | "
            + " | ".join(f"{row['per_class'][c]:.3f}" for c in classes)
            + f" | **{row['mean']:.3f}** | {row['mean_change']:+.3f} | {row['band_as_miss']:.3f} | {drawn:.0%} | "
            f"{row['gate_rejected']} | {row['seconds_per_image']:.3f} | {row['time_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.n < 1:
        raise SystemExit(f"--n must be >= 1, got {args.n}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    grid = [parse_row(text) for text in args.rows]
    grid = [row for row in grid if args.models is None or row[0] in args.models]
    if not grid:
        raise SystemExit(f"no row of {args.rows} is for --models {args.models}")
    rows = []
    band = None if args.ignore_band is None else {"ignore_band": args.ignore_band}
    for model, scheduler, steps in grid:
        rows.append(run_row(model, scheduler, steps, args.n, args.seed, args.gen_batch_size, band))
        row = rows[-1]
        print(f"{model} {row['scheduler']} {steps}: IoU {row['mean']:.3f}, {row['seconds_per_image']:.3f} s/image",
              flush=True)
    add_relative(rows)
    print(markdown(rows))
    write_json(args.json, {"n": args.n, "seed": args.seed, "batch_size": rows[0]["sampler_config"]["batch_size"],
                           "torch_threads": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
