"""Masks of prompts that name several classes: which named classes the model drew, which ones the
neglect rule (``MaskConfig.neglect_ratio``) labels as not drawn, and mask IoU per class.

A prompt such as "a photo of a triangle and a circle" does not always get both objects: a small
model (like Stable Diffusion, Attend-and-Excite's "catastrophic neglect") sometimes draws one. The
neglected class's attention map is faint, but min-max normalisation stretches it to [0, 1], so
without the rule a sliver of the other object (or of background) is labelled with it.

Samples are the stream's own: sample ``i`` has the prompt and seed a :class:`DiffuMaskGenerator` with the
model's preset gives it (two classes per prompt for the toy models), first attempt, no quality gate.
Truth comes from the colour oracle (``ondemand_seg.toyworld.color_oracle``); a named class counts
as drawn when the oracle finds at least ``--drawn-pixels`` of its pixels. Per neglect ratio:

- ``dropped``: named classes the rule labelled as not drawn, split by whether the oracle saw them
  (``dropped_drawn`` are the rule's false alarms);
- ``not_drawn``: named classes the oracle did not find (the rule's targets), also per class;
- per class, IoU of the mask's class pixels against the oracle's, summed over the samples that
  name the class (ignore pixels left out), and the mean over classes; ``mean_band_as_miss``
  counts the ignore pixels as misses instead, so a wider band cannot score by labelling less;
  ``ignored``: the share of pixels labelled ignore.

``--background-floors`` and ``--ignore-bands`` add rows with the mask's ``background_floor`` and
``ignore_band`` set (every combination with the neglect ratios; unset: the preset's).

    python benchmarks/multi_class_prompts.py --model toy --n 400 --ratios 0 0.5 --json out.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from common import intersection_union, write_json

from ondemand_seg.generation.generator import DiffuMaskGenerator
from ondemand_seg.generation.seeding import SubStream, sample_seed
from ondemand_seg.toyworld import TOY_CLASSES, color_oracle


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Neglected classes in multi-class prompts, and mask IoU per class")
    parser.add_argument("--model", default="toy", help="a ToyWorld-trained model (default: the embedded 'toy')")
    parser.add_argument("--n", type=int, default=400, help="samples (prompts) to generate")
    parser.add_argument("--seed", type=int, default=0, help="the stream's seed")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5], help="neglect ratios to compare")
    parser.add_argument("--background-floors", nargs="+", choices=["none", "median"], default=[None],
                        help="MaskConfig.background_floor values to compare (default: the preset's)")
    parser.add_argument("--ignore-bands", type=float, nargs="+", default=[None],
                        help="MaskConfig.ignore_band values to compare (default: the preset's)")
    parser.add_argument("--gen-steps", type=int, default=None, help="denoising steps (default: the model preset's)")
    parser.add_argument("--gen-batch-size", type=int, default=None,
                        help="images per pipeline call (default: the model preset's, 20 for the toy models)")
    parser.add_argument("--drawn-pixels", type=int, default=10,
                        help="a named class is drawn when the oracle finds at least this many of its pixels")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def measure(model, n: int, ratio: float, seed: int = 0, drawn_pixels: int = 10, background_floor: str | None = None,
            ignore_band: float | None = None, gen_steps: int | None = None, gen_batch_size: int | None = None) -> dict:
    """Score the first ``n`` prompts of the model's stream with ``neglect_ratio=ratio`` (and the
    given ``background_floor``/``ignore_band``, denoising steps and images per call, else the
    preset's)."""
    overrides = {"background_floor": background_floor, "ignore_band": ignore_band}
    mask = {"neglect_ratio": ratio, **{k: v for k, v in overrides.items() if v is not None}}
    generator = {k: v for k, v in {"num_inference_steps": gen_steps, "batch_size": gen_batch_size}.items() if v is not None}
    source = DiffuMaskGenerator(model, TOY_CLASSES[1:], label_space=TOY_CLASSES, seed=seed, mask=mask,
                                generator=generator)
    classes = TOY_CLASSES[1:]
    sums = {c: [0, 0] for c in classes}
    missed = {c: [0, 0] for c in classes}
    ignored = [0, 0]
    counts = {"named": 0, "not_drawn": 0, "dropped": 0, "dropped_drawn": 0, "dropped_not_drawn": 0}
    not_drawn = {c: 0 for c in classes}
    batch_size = source.generator_config.batch_size
    for start in range(0, n, batch_size):
        indices = range(start, min(start + batch_size, n))
        prompts = [source.prompt(i) for i in indices]
        seeds = [sample_seed(seed, i, 0, SubStream.IMAGE) for i in indices]
        batch = source.generate(prompts, seeds, keep_maps=True)
        images = batch.uint8_images()
        for j, prompt in enumerate(prompts):
            truth = torch.from_numpy(color_oracle(images[j]))
            mask = batch.masks[j]
            kept = set(batch.class_ids[j].tolist())
            ignored[0] += int((mask == 255).sum())
            ignored[1] += mask.numel()
            for name in prompt.class_names:
                class_id = TOY_CLASSES.index(name)
                drawn = int((truth == class_id).sum()) >= drawn_pixels
                dropped = class_id not in kept
                counts["named"] += 1
                counts["not_drawn"] += not drawn
                not_drawn[name] += not drawn
                counts["dropped"] += dropped
                counts["dropped_drawn"] += dropped and drawn
                counts["dropped_not_drawn"] += dropped and not drawn
                inter, union = intersection_union(mask == class_id, truth == class_id, valid=mask != 255)
                sums[name][0] += inter
                sums[name][1] += union
                inter, union = intersection_union(mask == class_id, truth == class_id)
                missed[name][0] += inter
                missed[name][1] += union
    per_class = {c: (i / u if u else float("nan")) for c, (i, u) in sums.items()}
    band_as_miss = [i / u if u else float("nan") for i, u in missed.values()]
    config = source.resolved_mask_config()
    return {"neglect_ratio": ratio, "background_floor": config.background_floor, "ignore_band": config.ignore_band,
            **counts, "not_drawn_per_class": not_drawn, "per_class": per_class,
            "mean": float(np.nanmean(list(per_class.values()))), "mean_band_as_miss": float(np.nanmean(band_as_miss)),
            "ignored": ignored[0] / ignored[1]}


def markdown(rows: list[dict]) -> str:
    classes = list(rows[0]["per_class"])
    lines = ["| neglect ratio | background floor | band | named classes not drawn | dropped by the rule (of them drawn) | "
             + " | ".join(classes) + " | mean | band as miss | pixels ignored |", "|---" * (len(classes) + 8) + "|"]
    for row in rows:
        lines.append(f"| {row['neglect_ratio']:g} | {row['background_floor']} | {row['ignore_band']:g} | "
                     f"{row['not_drawn']}/{row['named']} | {row['dropped']} ({row['dropped_drawn']}) | "
                     + " | ".join(f"{row['per_class'][c]:.3f}" for c in classes)
                     + f" | **{row['mean']:.3f}** | {row['mean_band_as_miss']:.3f} | {100 * row['ignored']:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.n < 1:
        raise SystemExit(f"--n must be >= 1, got {args.n}")
    bad = [r for r in args.ratios if not 0.0 <= r < 1.0]
    if bad:
        raise SystemExit(f"--ratios must be in [0, 1), got {bad}")
    bad = [w for w in args.ignore_bands if w is not None and not 0.0 <= w < 0.5]
    if bad:
        raise SystemExit(f"--ignore-bands must be in [0, 0.5), got {bad}")
    rows = [measure(args.model, args.n, ratio, args.seed, args.drawn_pixels, floor, band, args.gen_steps,
                    args.gen_batch_size)
            for ratio in args.ratios for floor in args.background_floors for band in args.ignore_bands]
    print(markdown(rows))
    write_json(args.json, {"model": str(args.model), "n": args.n, "seed": args.seed, "gen_steps": args.gen_steps,
                           "drawn_pixels": args.drawn_pixels, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
