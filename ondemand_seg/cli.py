"""Command line: ``python -m ondemand_seg preview ...``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dataclasses import replace

from .config import MaskConfig, SamplerConfig, from_dict
from .label_spaces import VOC_CLASSES
from .toyworld import TOY_CLASSES

LABEL_SPACES = {"voc": VOC_CLASSES, "toy": TOY_CLASSES}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ondemand_seg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    preview = commands.add_parser("preview", help="write an image / mask-overlay grid of generated samples")
    preview.add_argument("--model", default="toy",
                         help="'toy' (default: the embedded ToyWorld model), a local diffusers folder, a hub id, "
                              "or 'tiny-random' (random weights: noise, for a smoke test)")
    preview.add_argument("--classes", nargs="+", default=None,
                         help="class names to generate (default: every class of the label space)")
    preview.add_argument("--label-space", choices=sorted(LABEL_SPACES), default=None,
                         help="default: the model's own (its preset), else voc")
    preview.add_argument("--n", type=int, default=8, help="number of samples")
    preview.add_argument("--out", default="grid.png", help="PNG file to write")
    preview.add_argument("--image-size", type=int, nargs="+", default=None,
                         help="H or H W (default: the model's preset, else 512)")
    preview.add_argument("--steps", type=int, default=None, help="denoising steps (default: preset, else 50)")
    preview.add_argument("--guidance", type=float, default=None, help="guidance scale (default: preset, else 7.5)")
    preview.add_argument("--threshold", type=float, default=None, help="binarization threshold γ (default: preset, else 0.4)")
    preview.add_argument("--batch-size", type=int, default=None, help="images per pipeline call")
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .preview import write_preview

    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    try:
        dataset = _dataset(args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    out = write_preview(dataset, args.n, args.out, batch_size=dataset.source.sampler_config.batch_size)
    print(f"wrote {out} ({args.n} samples; stats: {dataset.stats()})")
    return 0


def _dataset(args: argparse.Namespace):
    """The dataset the preview draws from: the model's preset, then the command line's overrides."""
    from .dataset import DiffuMaskDataset
    from .label_spaces import VOC_CLASSES
    from .sampler import read_preset

    preset = read_preset(args.model)
    label_space = LABEL_SPACES[args.label_space] if args.label_space else tuple(preset.get("label_space", VOC_CLASSES))
    mask = from_dict(MaskConfig, preset.get("mask", {}))
    sampler = from_dict(SamplerConfig, preset.get("sampler", {}))
    if args.threshold is not None:
        mask = replace(mask, threshold=args.threshold)
    sampler = replace(sampler, **{k: v for k, v in {"num_inference_steps": args.steps, "guidance_scale": args.guidance,
                                                    "batch_size": args.batch_size}.items() if v is not None})
    size = args.image_size
    return DiffuMaskDataset(
        args.model,
        args.classes or list(label_space[1:]),
        length=args.n,
        label_space=label_space,
        image_size=None if size is None else size[0] if len(size) == 1 else tuple(size),
        seed=args.seed,
        mask=mask,
        sampler=sampler,
        device=args.device,
    )


if __name__ == "__main__":
    sys.exit(main())
