"""Can it label my own images? Pseudo-mask IoU on real ToyWorld images against their exact masks.

ToyWorld's images have exact masks by construction, so a pseudo-mask made by
:class:`~ondemand_seg.real.DiffuMaskLabeler` from an image and its tags (the classes the image
contains) is scored against the truth directly. Per model, per strength (the point of the noise
schedule the image is noised to; ``--schedule-steps`` sets the schedule's length) and per mask
recipe, the table gives the mean over classes of per-class IoU (summed intersection / summed union
over the images; ignore pixels excluded), the share of pixels labelled ignore, and how many
pseudo-masks the quality gate left out (scored over the accepted ones). Beside each recipe, in the
same run, the generated-sample IoU of the same model and recipe (``benchmarks/mask_quality.py``'s
``diffumask`` reading: generated images scored against the colour oracle).

Two ToyWorld sets: ``1 object`` (like a generated sample, one class per prompt) and ``1-3
objects`` (several tags per image). ``--noise random inversion`` gives each strength a row per way
of reaching it (``LabelConfig.noise``: seeded random noise, or deterministic inversion with the
model's own predictions), run one after the other on the same images. ``untagged`` rows label the
1-3-object set with no tags: every class is read from its own prompt and the neglect test keeps the strong ones
(``LabelConfig.absent_ratio``); presence precision / recall are over (image, class) pairs.

Recipes are changes to the model's preset mask settings: ``preset``; ``otsu`` (γ per image and
class); ``affinity`` (the random walk along the image's colours); ``otsu+affinity``;
``no-affinity`` for a preset that has it; a recipe that comes to one already run is skipped. Affinity follows colour, which ToyWorld's flat-coloured shapes reward whatever the attention
was: read each recipe beside its version without it.

    python benchmarks/label_real.py --models toy toy-mmdit toy-unaided --n 100 --json benchmarks/results/label_real.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import intersection_union, measure_mask_quality, write_json

RECIPES = {"preset": {}, "otsu": {"threshold_mode": "otsu"}, "affinity": {"refine": "affinity"},
           "otsu+affinity": {"threshold_mode": "otsu", "refine": "affinity"}, "no-affinity": {"refine": "none"}}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="pseudo-mask IoU of the labeller on ToyWorld images")
    parser.add_argument("--models", nargs="+", default=["toy", "toy-mmdit", "toy-unaided"])
    parser.add_argument("--n", type=int, default=100, help="ToyWorld images per set")
    parser.add_argument("--strengths", nargs="+", default=["0.02", "0.1", "0.3"],
                        help="strengths, one row each; '0.02+0.1' sums the attention of one pass at each")
    parser.add_argument("--recorded-steps", type=int, default=1, help="LabelConfig.recorded_steps")
    parser.add_argument("--schedule-steps", type=int, default=50, help="length of the noise schedule")
    parser.add_argument("--recipes", nargs="+", default=["preset", "otsu", "affinity", "no-affinity"],
                        choices=list(RECIPES))
    parser.add_argument("--untagged-strength", default=None,
                        help="strength of the untagged rows (default: the first of --strengths)")
    parser.add_argument("--absent-ratios", type=float, nargs="+", default=[0.8, 0.9],
                        help="LabelConfig.absent_ratio of the untagged rows, one row each")
    parser.add_argument("--generated-n", type=int, default=100, help="generated samples per recipe (0: none)")
    parser.add_argument("--noise", nargs="+", default=["random"], choices=["random", "inversion"],
                        help="LabelConfig.noise, one row each, interleaved per strength")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def strengths(text: str) -> tuple[float, ...]:
    """``"0.02+0.1"`` -> ``(0.02, 0.1)``: one pass per strength, attention summed."""
    return tuple(float(part) for part in str(text).split("+"))


def toyworld_sets(n: int, size: tuple[int, int], seed: int) -> dict:
    from ondemand_seg.toyworld import ToyWorld

    sets = {}
    for name, (low, high) in {"1 object": (1, 1), "1-3 objects": (1, 3)}.items():
        world = ToyWorld(size, seed=1000 + seed, min_objects=low, max_objects=high)
        sets[name] = [world.sample(i) for i in range(n)]
    return sets


def score(samples, labels, classes) -> dict:
    """Mean per-class IoU of pseudo-masks (accepted ones, ignore pixels excluded), ignore share, left out."""
    sums = {c: [0, 0] for c in classes[1:]}
    ignored = pixels = 0
    for sample, label in zip(samples, labels):
        if label.mask is None:
            continue
        mask, truth = torch.from_numpy(label.mask), torch.from_numpy(sample.mask)
        valid = mask != 255
        ignored += int((~valid).sum())
        pixels += mask.numel()
        for c, name in enumerate(classes[1:], start=1):
            inter, union = intersection_union(mask == c, truth == c, valid)
            sums[name][0] += inter
            sums[name][1] += union
    ious = {c: (i / u if u else float("nan")) for c, (i, u) in sums.items()}
    return {"mean_iou": float(np.nanmean(list(ious.values()))), "per_class": ious,
            "ignore_share": ignored / max(1, pixels), "left_out": sum(label.mask is None for label in labels)}


def presence(samples, labels) -> dict:
    """Precision and recall of the classes the untagged labeller kept, over (image, class) pairs."""
    found = truth = hits = 0
    for sample, label in zip(samples, labels):
        present = set(sample.class_names)
        kept = set(label.classes)
        found += len(kept)
        truth += len(present)
        hits += len(kept & present)
    return {"precision": hits / max(1, found), "recall": hits / max(1, truth)}


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ondemand_seg.real import DiffuMaskLabeler
    from ondemand_seg.settings.resolve import resolve_config
    from ondemand_seg.toyworld import TOY_CLASSES

    rows = []
    started = time.perf_counter()
    for model in args.models:
        preset = resolve_config(model, ()).mask
        size = resolve_config(model, ()).image_size
        sets = toyworld_sets(args.n, size, args.seed)
        seen = set()
        fields = sorted({k for overrides in RECIPES.values() for k in overrides})
        for recipe in args.recipes:
            overrides = RECIPES[recipe]
            # A recipe that comes to one already run (toy-unaided's preset has Otsu and affinity) is skipped.
            effective = tuple((k, overrides.get(k, getattr(preset, k))) for k in sorted(fields))
            if effective in seen:
                continue
            seen.add(effective)
            generated = None
            if args.generated_n:
                quality = measure_mask_quality(model, args.generated_n, args.seed, progress=False,
                                               mask_overrides=overrides, other_readings=False)
                generated = quality["diffumask"]["mean"]
            for strength, noise in [(s, m) for s in args.strengths for m in args.noise]:
                labeller = DiffuMaskLabeler(model, label_space=TOY_CLASSES, seed=args.seed, mask=overrides,
                                            labelling={"strength": strengths(strength), "recorded_steps": args.recorded_steps,
                                                       "num_inference_steps": args.schedule_steps, "noise": noise})
                for set_name, samples in sets.items():
                    tick = time.perf_counter()
                    labels = labeller.label([s.image for s in samples], [s.class_names for s in samples])
                    seconds = time.perf_counter() - tick
                    row = {"model": model, "recipe": recipe, "strength": strength, "noise": noise, "set": set_name, "tags": True,
                           "recorded_steps": args.recorded_steps,
                           **score(samples, labels, TOY_CLASSES), "generated_iou": generated,
                           "seconds_per_image": seconds / len(samples)}
                    rows.append(row)
                    print(f"{model:12s} {recipe:15s} s={strength:<5} {noise:9s} {set_name:12s} IoU {row['mean_iou']:.3f} "
                          f"(generated {generated if generated is None else round(generated, 3)}) ignore "
                          f"{row['ignore_share']:.3f} left out {row['left_out']}", flush=True)
        untagged = args.untagged_strength or args.strengths[0]
        samples = sets["1-3 objects"]
        for ratio, noise in [(r, m) for r in args.absent_ratios for m in args.noise]:
            labeller = DiffuMaskLabeler(model, label_space=TOY_CLASSES, seed=args.seed,
                                        labelling={"strength": strengths(untagged), "num_inference_steps": args.schedule_steps,
                                                   "absent_ratio": ratio, "noise": noise})
            labels = labeller.label([s.image for s in samples])
            row = {"model": model, "recipe": "preset", "strength": untagged, "noise": noise, "set": "1-3 objects", "tags": False,
                   "absent_ratio": ratio, **score(samples, labels, TOY_CLASSES), **presence(samples, labels)}
            rows.append(row)
            print(f"{model:12s} untagged s={untagged} {noise} absent_ratio {ratio} IoU {row['mean_iou']:.3f} presence "
                  f"precision {row['precision']:.3f} recall {row['recall']:.3f}", flush=True)
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "load_average_1min": os.getloadavg()[0], "seconds": round(time.perf_counter() - started, 1),
              "torch_threads": torch.get_num_threads(), "rows": rows}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
