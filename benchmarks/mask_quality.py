"""Mask quality: IoU of DiffuMask's extracted masks against a truth that does not come from attention.

On ToyWorld models every class has its own hue, so the truth of a *generated* image is read back
from its colours (``ondemand_seg.toyworld.color_oracle``). Sample ``i`` is prompted with class
``i mod C`` in the words of the model's vocabulary ("a photo of a {class}" for the toy model),
generated with its own seed, and scored three ways on the same image and the same captured
attention:

- ``diffumask``: the library's masks with the model's preset (fusion, timestep window, γ, ignore
  band; ignore pixels excluded);
- ``diffumask_band_as_miss``: the same masks with ignore pixels counted as not labelled (a mask
  that ignores much of an object is not rewarded for it);
- ``fixed_0.5``: the plain attention map, every captured resolution and every step averaged
  (the paper's default fusion, what a DAAM-style tool gives), thresholded at 0.5 without band;
- ``fixed_0.5_tuned_fusion``: the preset's fused map thresholded at 0.5 without band (how much
  of the gain is γ and the band rather than the fusion);
- ``centre_box``: the middle half of each side.

On joint-attention models (SD3/Flux layout, e.g. ``toy-mmdit``) two more rows read the same
images' attention differently, with the preset's fusion, γ and band:

- ``output_space``: ConceptAttention's output-space maps (``map_source="output"``);
- ``other_softmax``: the class mass under the other softmax than the preset's: over all keys (the
  model's own, ``joint_softmax="all"``) or renormalised over the text keys (``"text"``).

The plain map comes from a second capture of the same images (same seeds; capture does not
change what the pipeline draws, which the tests check).

Per class, IoU = summed intersection / summed union over its samples; "mean" averages classes.
Figures are over *all* generated samples; ``accepted`` repeats ours over the samples the quality
gate lets through (what a stream actually serves). ``generation_seconds`` is the time spent in the
DiffuMask sampler's calls alone (generation, capture, masks; the model loaded before), not in the
other readings.

    python benchmarks/mask_quality.py --model toy --n 200 --json out.json
    python benchmarks/mask_quality.py --model toy --n 200 --ignore-band 0.05 --json out.json   # DiffuMask's band
    python benchmarks/mask_quality.py --model toy --scheduler DPMSolverMultistepScheduler --steps 20
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import centre_box, intersection_union, write_json

from ondemand_seg.generation.generator import DiffuMaskGenerator
from ondemand_seg.generation.seeding import evaluation_seed
from ondemand_seg.masks.maps import labels_from_maps
from ondemand_seg.masks.quality import gate
from ondemand_seg.settings.config import to_dict
from ondemand_seg.toyworld import TOY_CLASSES, color_oracle

METHODS = ("diffumask", "diffumask_band_as_miss", "fixed_0.5", "fixed_0.5_tuned_fusion", "centre_box")
JOINT_METHODS = ("output_space", "other_softmax")
# The plain map: every grid the model's text attention runs at, every step, γ 0.5, no band.
PLAIN_ATTENTION = dict(timestep_window=(0.0, 1.0), threshold=0.5, ignore_band=0.0, threshold_mode="fixed",
                       refine="none", self_attention_factor=None)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="IoU of extracted masks vs the ToyWorld colour oracle")
    parser.add_argument("--model", default="toy", help="a ToyWorld-trained model (default: the embedded 'toy')")
    parser.add_argument("--n", type=int, default=200, help="samples, spread evenly over the classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=20, help="images per pipeline call")
    parser.add_argument("--threshold", type=float, default=None, help="override the model preset's γ")
    parser.add_argument("--ignore-band", type=float, default=None, metavar="W", help="override the model preset's ignore band")
    parser.add_argument("--background-floor", choices=["none", "median"], default=None,
                        help="override the model preset's background floor (MaskConfig.background_floor)")
    parser.add_argument("--scheduler", default=None,
                        help="a diffusers scheduler class name (default: the model's own)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model preset's)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def measure(model, n: int, seed: int = 0, batch_size: int = 20, threshold: float | None = None, progress: bool = True,
            mask_overrides: dict | None = None, sampler_overrides: dict | None = None,
            other_readings: bool = True) -> dict:
    """Score ``n`` generated samples; returns per-class and mean IoU per method, and counts.

    ``mask_overrides`` / ``sampler_overrides`` replace fields of the model preset's
    :class:`MaskConfig` / :class:`GeneratorConfig` (for ablations; ``scheduler``,
    ``num_inference_steps``). ``other_readings=False`` skips the readings that need a second
    generation pass (``fixed_0.5`` and the joint-attention rows).
    """
    from tqdm.auto import tqdm

    classes = TOY_CLASSES[1:]
    mask = {**(mask_overrides or {}), **({} if threshold is None else {"threshold": threshold})}
    sampler = sampler_overrides or {}
    source = DiffuMaskGenerator(model, classes, label_space=TOY_CLASSES, seed=seed, mask=mask, generator=sampler)
    spec = source.sampler.spec
    every_grid = {factor: 1.0 for factor in spec.text_factors}
    plain = DiffuMaskGenerator(model, classes, label_space=TOY_CLASSES, seed=seed, generator=sampler,
                         mask=dataclasses.replace(source.mask_config, resolution_weights=every_grid, **PLAIN_ATTENTION))
    other = "text" if source.mask_config.joint_softmax == "all" else "all"
    settings = {"output_space": {"map_source": "output"},
                "other_softmax": {"map_source": "attention", "joint_softmax": other}}
    alternatives = {
        method: DiffuMaskGenerator(model, classes, label_space=TOY_CLASSES, seed=seed, generator=sampler,
                             mask=dataclasses.replace(source.mask_config, **settings[method]))
        for method in JOINT_METHODS if spec.family.output_maps and other_readings
    }
    methods = tuple(m for m in METHODS if other_readings or m != "fixed_0.5") + tuple(alternatives)
    height, width = source.image_size
    box = centre_box(height, width)
    sums = {m: {c: [0, 0] for c in classes} for m in methods + ("accepted",)}
    drawn = {c: 0 for c in classes}
    rejected = 0
    generating = 0.0
    started = time.perf_counter()
    for start in tqdm(range(0, n, batch_size), desc="mask quality", disable=not progress):
        indices = list(range(start, min(start + batch_size, n)))
        names = [classes[i % len(classes)] for i in indices]
        # Each prompt is the vocabulary's first draw for its class ("a photo of a {class}" for the toy model).
        prompts = [source.class_prompt(random.Random(0), [c]) for c in names]
        seeds = [evaluation_seed(seed, i) for i in indices]
        call_started = time.perf_counter()
        batch = source.sampler.generate(prompts, seeds, source.image_size, keep_maps=True)
        generating += time.perf_counter() - call_started
        tuned = labels_from_maps(batch.fused, batch.class_ids, torch.full(batch.class_ids.shape, 0.5), 0.0)
        fixed = plain.sampler.generate(prompts, seeds, source.image_size).masks if other_readings else None
        other = {m: alt.sampler.generate(prompts, seeds, source.image_size).masks for m, alt in alternatives.items()}
        reasons = gate(batch.images, batch.masks, source.quality_config, finite_maps=batch.finite_maps)
        images = batch.uint8_images()
        for j, name in enumerate(names):
            class_id = TOY_CLASSES.index(name)
            truth = torch.from_numpy(color_oracle(images[j]) == class_id)
            drawn[name] += bool(truth.any())
            ours = batch.masks[j]
            scores = {
                "diffumask": intersection_union(ours == class_id, truth, valid=ours != 255),
                "diffumask_band_as_miss": intersection_union(ours == class_id, truth),
                **({"fixed_0.5": intersection_union(fixed[j] == class_id, truth)} if other_readings else {}),
                "fixed_0.5_tuned_fusion": intersection_union(tuned[j] == class_id, truth),
                "centre_box": intersection_union(box, truth),
                **{m: intersection_union(masks[j] == class_id, truth, valid=masks[j] != 255) for m, masks in other.items()},
            }
            if reasons[j] is None:
                scores["accepted"] = scores["diffumask"]
            else:
                rejected += 1
            for method, (inter, union) in scores.items():
                sums[method][name][0] += inter
                sums[method][name][1] += union
    seconds = time.perf_counter() - started
    result = {"model": str(model), "family": spec.family.name, "methods": list(methods), "n": n, "seed": seed,
              "image_size": [height, width], "scheduler": type(source.sampler.pipeline.scheduler).__name__,
              "mask_config": to_dict(source.mask_config), "sampler_config": to_dict(source.generator_config),
              "vocabulary": {"name": source.vocabulary.name, "templates": list(source.vocabulary.templates)},
              "drawn_fraction": {c: drawn[c] / max(1, sum(classes[i % len(classes)] == c for i in range(n))) for c in classes},
              "gate_rejected": rejected, "seconds": round(seconds, 1), "generation_seconds": round(generating, 2)}
    for method, per_class in sums.items():
        ious = {c: (i / u if u else float("nan")) for c, (i, u) in per_class.items()}
        result[method] = {"per_class": ious, "mean": float(np.nanmean(list(ious.values())))}
    return result


def markdown(result: dict) -> str:
    classes = list(result["diffumask"]["per_class"])
    lines = ["| method | " + " | ".join(classes) + " | mean |", "|---" * (len(classes) + 2) + "|"]
    for method in list(result.get("methods", METHODS)) + ["accepted"]:
        row = result[method]
        lines.append(f"| {method} | " + " | ".join(f"{row['per_class'][c]:.3f}" for c in classes) + f" | **{row['mean']:.3f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.n < 1:
        raise SystemExit(f"--n must be >= 1, got {args.n}")
    sampler = {k: v for k, v in {"scheduler": args.scheduler, "num_inference_steps": args.steps}.items() if v is not None}
    mask = {k: v for k, v in {"ignore_band": args.ignore_band, "background_floor": args.background_floor}.items()
            if v is not None}
    result = measure(args.model, args.n, args.seed, args.batch_size, args.threshold, mask_overrides=mask,
                     sampler_overrides=sampler)
    print(markdown(result))
    print(f"{result['scheduler']} {result['sampler_config']['num_inference_steps']} steps; objects drawn: "
          f"{result['drawn_fraction']}; gate rejected {result['gate_rejected']}/{args.n}; {result['seconds']} s")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
