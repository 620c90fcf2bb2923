"""Command line: ``python -m ondemand_seg preview ...`` and ``python -m ondemand_seg stream ...``."""
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
    stream = commands.add_parser("stream", help="pull batches from a DiffuMaskStream through a DataLoader and report")
    stream.add_argument("--model", default="toy", help="as for preview (default: the embedded toy model)")
    stream.add_argument("--classes", nargs="+", default=None, help="default: every class of the label space")
    stream.add_argument("--label-space", choices=sorted(LABEL_SPACES), default=None)
    stream.add_argument("--n", type=int, default=64, help="samples to pull")
    stream.add_argument("--batch-size", type=int, default=16, help="DataLoader batch size")
    stream.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    stream.add_argument("--reuse", type=int, default=1)
    stream.add_argument("--seed", type=int, default=0)
    stream.add_argument("--device", default=None)
    return parser


def run_stream(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import time

    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .stream import DiffuMaskStream

    label_space, classes = _label_space_and_classes(args)
    try:
        stream = DiffuMaskStream(args.model, classes, label_space=label_space, seed=args.seed, reuse=args.reuse,
                                 num_samples=args.n, device=args.device)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    context = "spawn" if args.workers and torch.cuda.is_available() else None
    loader = DataLoader(stream, batch_size=args.batch_size, num_workers=args.workers, multiprocessing_context=context)
    started, seen, counts = time.perf_counter(), 0, torch.zeros(len(label_space) + 1, dtype=torch.long)
    for images, masks in tqdm(loader, desc="stream", unit="batch"):
        seen += images.shape[0]
        ids = torch.where(masks == 255, len(label_space), masks)
        counts += torch.bincount(ids.flatten(), minlength=len(label_space) + 1)
    seconds = time.perf_counter() - started
    share = {name: round(float(c) / max(1, int(counts.sum())), 3) for name, c in zip(list(label_space) + ["ignore"], counts)}
    print(f"{seen} samples of {tuple(images.shape[1:])} images in {seconds:.1f} s ({seen / seconds:.1f} samples/s); "
          f"pixel shares {share}; stats {stream.stats()}")
    return 0


def _label_space_and_classes(args: argparse.Namespace) -> tuple[tuple[str, ...], list[str]]:
    from .label_spaces import VOC_CLASSES
    from .sampler import read_preset

    label_space = LABEL_SPACES[args.label_space] if args.label_space else tuple(read_preset(args.model).get("label_space", VOC_CLASSES))
    return label_space, args.classes or list(label_space[1:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .preview import write_preview

    if args.command == "stream":
        return run_stream(args, parser)

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
    from .sampler import read_preset

    preset = read_preset(args.model)
    label_space, classes = _label_space_and_classes(args)
    mask = from_dict(MaskConfig, preset.get("mask", {}))
    sampler = from_dict(SamplerConfig, preset.get("sampler", {}))
    if args.threshold is not None:
        mask = replace(mask, threshold=args.threshold)
    sampler = replace(sampler, **{k: v for k, v in {"num_inference_steps": args.steps, "guidance_scale": args.guidance,
                                                    "batch_size": args.batch_size}.items() if v is not None})
    size = args.image_size
    return DiffuMaskDataset(
        args.model,
        classes,
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
