"""Command line: ``python -m ondemand_seg preview ...``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .config import MaskConfig, SamplerConfig
from .label_spaces import VOC_CLASSES

LABEL_SPACES = {"voc": VOC_CLASSES}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ondemand_seg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    preview = commands.add_parser("preview", help="write an image / mask-overlay grid of generated samples")
    preview.add_argument("--model", default="tiny-random",
                         help="hub id, local diffusers folder, or 'tiny-random' (default; noise, for a smoke test)")
    preview.add_argument("--classes", nargs="+", default=["bird", "dog"], help="class names to generate")
    preview.add_argument("--label-space", choices=sorted(LABEL_SPACES), default="voc")
    preview.add_argument("--n", type=int, default=8, help="number of samples")
    preview.add_argument("--out", default="grid.png", help="PNG file to write")
    preview.add_argument("--image-size", type=int, nargs="+", default=None,
                         help="H or H W (default 512, 64 for tiny-random)")
    preview.add_argument("--steps", type=int, default=SamplerConfig.num_inference_steps, help="denoising steps")
    preview.add_argument("--guidance", type=float, default=SamplerConfig.guidance_scale, help="guidance scale")
    preview.add_argument("--threshold", type=float, default=MaskConfig.threshold, help="binarization threshold γ")
    preview.add_argument("--batch-size", type=int, default=SamplerConfig.batch_size, help="images per pipeline call")
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .preview import write_preview

    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    size = args.image_size or [64 if args.model == "tiny-random" else 512]
    try:
        dataset = _dataset(args, size)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    out = write_preview(dataset, args.n, args.out, batch_size=args.batch_size)
    print(f"wrote {out} ({args.n} samples; stats: {dataset.stats()})")
    return 0


def _dataset(args: argparse.Namespace, size: list[int]):
    from .dataset import DiffuMaskDataset

    return DiffuMaskDataset(
        args.model,
        args.classes,
        length=args.n,
        label_space=LABEL_SPACES[args.label_space],
        image_size=size[0] if len(size) == 1 else tuple(size),
        seed=args.seed,
        mask=MaskConfig(threshold=args.threshold),
        sampler=SamplerConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size),
        device=args.device,
    )


if __name__ == "__main__":
    sys.exit(main())
