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
generator's calls alone (generation, capture, masks; the model loaded before), not in the
other readings.

    python benchmarks/mask_quality.py --model toy --n 200 --json out.json
    python benchmarks/mask_quality.py --model toy --n 200 --ignore-band 0.05 --json out.json   # DiffuMask's band
    python benchmarks/mask_quality.py --model toy --scheduler DPMSolverMultistepScheduler --gen-steps 20
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import METHODS, measure_mask_quality, write_json


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="IoU of extracted masks vs the ToyWorld colour oracle")
    parser.add_argument("--model", default="toy", help="a ToyWorld-trained model (default: the embedded 'toy')")
    parser.add_argument("--n", type=int, default=200, help="samples, spread evenly over the classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gen-batch-size", type=int, default=None,
                        help="images per pipeline call (default: the model preset's, 20 for the toy models)")
    parser.add_argument("--threshold", type=float, default=None, help="override the model preset's γ")
    parser.add_argument("--ignore-band", type=float, default=None, metavar="W", help="override the model preset's ignore band")
    parser.add_argument("--background-floor", choices=["none", "median"], default=None,
                        help="override the model preset's background floor (MaskConfig.background_floor)")
    parser.add_argument("--scheduler", default=None,
                        help="a diffusers scheduler class name (default: the model's own)")
    parser.add_argument("--gen-steps", type=int, default=None, help="denoising steps (default: the model preset's)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def markdown(result: dict) -> str:
    """The result as a Markdown table: one row per reading (and ``accepted``), one column per class."""
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
    generator = {k: v for k, v in {"scheduler": args.scheduler, "num_inference_steps": args.gen_steps}.items()
                 if v is not None}
    mask = {k: v for k, v in {"ignore_band": args.ignore_band, "background_floor": args.background_floor}.items()
            if v is not None}
    result = measure_mask_quality(args.model, args.n, args.seed, args.gen_batch_size, args.threshold,
                                  mask_overrides=mask, generator_overrides=generator)
    print(markdown(result))
    print(f"{result['scheduler']} {result['sampler_config']['num_inference_steps']} steps; objects drawn: "
          f"{result['drawn_fraction']}; gate rejected {result['gate_rejected']}/{args.n}; {result['seconds']} s")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
