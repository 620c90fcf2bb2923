"""Command line: ``python -m ondemand_seg preview ...``, ``... stream ...``, ``... export ...``, ``... label ...``
and ``... config ...``.

Every generator flag is an override: what is not given comes from the model's preset, then the
library's defaults, merged by :func:`~ondemand_seg.settings.resolve.resolve_config` (``config`` prints the
result). The trainer builds its generator settings with :func:`generator_settings` too.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .settings.files import check_output_file
from .settings.config import MASK_AGGREGATIONS, MASK_RESCALINGS, SELF_ATTENTION_MODES
from .settings.vocabulary import BUILTIN_VOCABULARIES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Prints a flag's default once: not for flags without one, nor where the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, False, argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


class RenamedFlag(argparse.Action):
    """A flag that was renamed: using it is a usage error naming the new flag."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is now {self.new}")


def add_generator_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the model, its vocabulary and the generation settings.

    Each is ``None`` unless given, so the model's preset fills what is not (see
    :func:`generator_settings`). Generation steps and batch size are ``--gen-steps`` and
    ``--gen-batch-size`` in every command, apart from training's ``--steps``/``--batch-size``.
    """
    group = parser.add_argument_group("generator (unset flags come from the model's preset, then the defaults)")
    group.add_argument("--model", default="toy",
                       help="'toy' (the embedded ToyWorld model; 'toy-mmdit': its SD3-layout twin; 'toy-unaided': "
                            "attention never taught to localise), a local diffusers folder, a hub id, or "
                            "'random-weights' (noise, for a smoke test)")
    group.add_argument("--vocabulary", "--label-space", dest="vocabulary", default=None, metavar="NAME_OR_FILE",
                       help=f"label space and prompt words: a built-in ({', '.join(BUILTIN_VOCABULARIES)}) or a "
                            ".json/.yaml vocabulary file (default: the model's preset, else plain VOC)")
    group.add_argument("--classes", nargs="+", default=None,
                       help="classes to generate (default: every class of the vocabulary)")
    group.add_argument("--image-size", type=int, nargs="+", default=None, metavar="SIDE",
                       help="generated image size, H or H W (default: the preset's, else 512)")
    group.add_argument("--gen-steps", type=int, default=None, metavar="N", help="denoising steps (default: preset, else 50)")
    group.add_argument("--guidance", type=float, default=None, help="guidance scale (default: preset, else 7.5)")
    group.add_argument("--gen-batch-size", type=int, default=None, metavar="N",
                       help="images per pipeline call (default: preset, else 4)")
    group.add_argument("--classes-per-prompt", type=int, nargs="+", default=None, metavar="N",
                       help="classes named in one prompt, e.g. 2: 'a photo of a circle and a ring'; MIN MAX: drawn "
                            "per prompt (default: preset, else 1)")
    group.add_argument("--threshold", type=float, default=None, help="binarization threshold γ (default: preset, else 0.4)")
    group.add_argument("--threshold-mode", choices=["fixed", "otsu"], default=None,
                       help="γ fixed, or Otsu per image and class (default: preset, else fixed)")
    group.add_argument("--class-thresholds", nargs="+", default=None, metavar="CLASS=γ",
                       help="per-class γ with a fixed threshold, e.g. ring=0.5 circle=0.3 (calibrated on a few "
                            "labelled images: ondemand_seg.generation.calibration); other classes keep γ")
    band = group.add_mutually_exclusive_group()
    band.add_argument("--ignore-band", type=float, default=None, metavar="W",
                      help="pixels within γ ± W are ignored (255) in the mask (default: preset, else 0.05)")
    band.add_argument("--no-ignore-band", action="store_true", help="label the uncertain band around γ (--ignore-band 0)")
    group.add_argument("--background-floor", choices=["none", "median"], default=None,
                       help="subtract each fused map's median (the attention a token spreads over the whole "
                            "image) before refining and thresholding (default: preset, else none)")
    group.add_argument("--refine", choices=["none", "affinity"], default=None,
                       help="random-walk refinement along image colour (default: preset, else none)")
    group.add_argument("--self-attention-factor", type=int, default=None,
                       help="propagate masks through the model's self-attention at this latent factor (default: off)")
    group.add_argument("--aggregation", choices=MASK_AGGREGATIONS, default=None,
                       help="how the layers and heads of one resolution are fused: the uniform mean, or weighted "
                            "by agreement with the consensus or by peakedness (default: preset, else mean)")
    group.add_argument("--token-rescaling", choices=MASK_RESCALINGS, default=None,
                       help="rescale a class's attention per pixel against the prompt's other tokens or classes "
                            "(default: preset, else none)")
    group.add_argument("--self-attention-sharpness", type=float, default=None, metavar="P",
                       help="with --self-attention-factor: raise self-attention rows to this power (>= 1) before "
                            "propagating (default: preset, else 1)")
    group.add_argument("--self-attention-mode", choices=SELF_ATTENTION_MODES, default=None,
                       help="with --self-attention-factor: add the propagation's change to the map, or replace "
                            "the map (default: preset, else add)")
    group.add_argument("--neglect-ratio", type=float, default=None, metavar="R",
                       help="with several classes per prompt, a class whose attention peak is below R x the "
                            "strongest named class's is labelled as not drawn; 0 keeps every class (default: "
                            "preset, else 0)")


def parse_class_thresholds(items: Sequence[str]) -> dict[str, float]:
    """``["ring=0.5", ...]`` as ``{"ring": 0.5}``; a malformed item, or a class given twice, is a
    ValueError naming it.
    Unknown classes are named by :func:`~ondemand_seg.settings.resolve.resolve_config`."""
    thresholds = {}
    for item in items:
        name, _, value = item.partition("=")
        if name in thresholds:  # which of two values would count is a guess
            raise ValueError(f"--class-thresholds gives {name!r} twice ({name}={thresholds[name]:g} and {item})")
        try:
            thresholds[name] = float(value)
        except ValueError:
            raise ValueError(f"--class-thresholds takes CLASS=γ items, got {item!r}") from None
    return thresholds


def generator_settings(args: argparse.Namespace) -> dict:
    """The overrides the generator flags ask for, in :func:`~ondemand_seg.settings.resolve.resolve_config`'s
    form; only the flags given appear, so everything else stays the preset's."""
    size = args.image_size
    mask = {"threshold": args.threshold, "threshold_mode": args.threshold_mode, "refine": args.refine,
            "self_attention_factor": args.self_attention_factor, "neglect_ratio": args.neglect_ratio,
            "background_floor": args.background_floor, "aggregation": args.aggregation,
            "token_rescaling": args.token_rescaling, "self_attention_sharpness": args.self_attention_sharpness,
            "self_attention_mode": args.self_attention_mode,
            "ignore_band": 0.0 if args.no_ignore_band else args.ignore_band,
            "class_thresholds": parse_class_thresholds(args.class_thresholds) if args.class_thresholds else None}
    count = args.classes_per_prompt
    generator = {"num_inference_steps": args.gen_steps, "guidance_scale": args.guidance,
               "batch_size": args.gen_batch_size,
               "classes_per_prompt": None if count is None else count[0] if len(count) == 1 else tuple(count)}
    settings = {"vocabulary": args.vocabulary,
                "image_size": None if size is None else size[0] if len(size) == 1 else tuple(size),
                "mask": {k: v for k, v in mask.items() if v is not None},
                "generator": {k: v for k, v in generator.items() if v is not None}}
    return {k: v for k, v in settings.items() if v not in (None, {})}


def resolve_generator(args: argparse.Namespace):
    """The resolved config and the classes to generate (``--classes``, else every class)."""
    from .settings.resolve import resolve_config

    config = resolve_config(args.model, args.classes or (), **generator_settings(args))
    if config.mask.self_attention_factor is None:
        # Without a propagation these flags would change nothing, silently.
        given = [flag for flag, value in (("--self-attention-sharpness", args.self_attention_sharpness),
                                          ("--self-attention-mode", args.self_attention_mode)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} shape{'s' if len(given) == 1 else ''} the self-attention propagation, which is off for "
                             f"{args.model}: add --self-attention-factor")
    return config, list(args.classes or config.label_space[1:])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ondemand_seg", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    preview = commands.add_parser("preview", help="write an image / mask-overlay grid of generated samples",
                                  formatter_class=HelpFormatter)
    add_generator_arguments(preview)
    preview.add_argument("--steps", action=RenamedFlag, new="--gen-steps")
    preview.add_argument("--batch-size", action=RenamedFlag, new="--gen-batch-size")
    preview.add_argument("--n", type=int, default=8, help="number of samples")
    preview.add_argument("--out", default="grid.png", help="PNG file to write")
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    stream = commands.add_parser("stream", help="pull batches from a DiffuMaskStream through a DataLoader and report",
                                 formatter_class=HelpFormatter)
    add_generator_arguments(stream)
    stream.add_argument("--steps", action=RenamedFlag, new="--gen-steps")
    stream.add_argument("--n", type=int, default=64, help="samples to pull")
    stream.add_argument("--batch-size", type=int, default=16, help="DataLoader batch size")
    stream.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    stream.add_argument("--reuse", type=int, default=1, help="times each generated sample is served")
    stream.add_argument("--seed", type=int, default=0)
    stream.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    export = commands.add_parser("export", help="write generated samples to a folder: a VOC tree, WebDataset shards "
                                 "or a Hugging Face dataset (resumable: rerun the same command to finish)",
                                 formatter_class=HelpFormatter)
    add_generator_arguments(export)
    export.add_argument("--steps", action=RenamedFlag, new="--gen-steps")
    export.add_argument("--batch-size", action=RenamedFlag, new="--gen-batch-size")
    export.add_argument("--out", required=True, help="folder: new, empty, or an earlier export of the same settings")
    export.add_argument("--n", type=int, required=True, help="samples to write")
    export.add_argument("--start", type=int, default=0, help="index of the first sample")
    export.add_argument("--format", default="voc", help="voc, webdataset or hf")
    export.add_argument("--shard-size", type=int, default=1000,
                        help="samples per shard (per tar or parquet file; the unit a rerun skips when finished)")
    export.add_argument("--image-format", choices=["jpg", "png"], default="jpg", help="png: lossless images")
    export.add_argument("--workers", type=int, default=0, help="generating processes (GPUs taken round-robin)")
    export.add_argument("--overwrite", action="store_true", help="remove an earlier export in --out and start afresh")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    label = commands.add_parser("label", help="pseudo-label a folder of your own images from their tags and write "
                                "them in an export format (read back like an export: --from-export)",
                                formatter_class=HelpFormatter)
    add_generator_arguments(label)
    label.add_argument("--images", required=True, metavar="DIR",
                       help="folder of images (png, jpg, ... directly in it, read in name order)")
    label.add_argument("--tags", default=None, metavar="FILE",
                       help="JSON tags file: per image the classes it contains, a list in name order or an object "
                            "keyed by file name (default: none; every class of --classes is read and the presence "
                            "test keeps those the attention finds)")
    label.add_argument("--strength", type=float, nargs="+", default=[0.1],
                       help="point(s) of the noise schedule the images are read at (LabelConfig.strength)")
    label.add_argument("--noise", choices=["random", "inversion"], default="random",
                       help="how the images reach that point: seeded random noise, or deterministic inversion with "
                            "the model's own predictions (LabelConfig.noise)")
    label.add_argument("--out", required=True, help="folder: new, empty, or an earlier label export of the same "
                                                    "settings")
    label.add_argument("--format", default="voc", help="voc, webdataset or hf")
    label.add_argument("--shard-size", type=int, default=1000, help="samples per shard (per tar or parquet file)")
    label.add_argument("--image-format", choices=["jpg", "png"], default="jpg", help="png: lossless images")
    label.add_argument("--overwrite", action="store_true", help="remove an earlier export in --out and start afresh")
    label.add_argument("--seed", type=int, default=0, help="seed of the noise the images are read with")
    label.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    config = commands.add_parser("config", help="print the merged settings (preset, then flags) as JSON",
                                 formatter_class=HelpFormatter)
    add_generator_arguments(config)
    config.add_argument("--steps", action=RenamedFlag, new="--gen-steps")
    config.add_argument("--batch-size", action=RenamedFlag, new="--gen-batch-size")
    config.add_argument("--out", default=None, help="also save the JSON here (loadable as a preset or as arguments)")
    return parser


def run_stream(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import time

    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .data.stream import DiffuMaskStream

    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    try:
        config, classes = resolve_generator(args)
        stream = DiffuMaskStream(args.model, classes, seed=args.seed, reuse=args.reuse, num_samples=args.n,
                                 device=args.device, **config.to_dict())
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    label_space = stream.config.label_space
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


# Samples in one preview image: 64 rows of 4, about 20,000 px tall.
MAX_PREVIEW = 256


def run_preview(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tqdm.auto import tqdm

    from .generation.generator import DiffuMaskGenerator
    from .preview import write_preview

    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.n > MAX_PREVIEW:  # one image: 100,000 samples would be hours of generation, then a 3-gigapixel grid
        parser.error(f"--n must be at most {MAX_PREVIEW} for a preview grid, got {args.n}; write more samples with "
                     "'export'")
    try:
        check_output_file(args.out)
    except ValueError as error:
        parser.error(f"--out {error}")
    try:
        config, classes = resolve_generator(args)
        generator = DiffuMaskGenerator(args.model, classes, seed=args.seed, device=args.device, **config.to_dict())
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    batch = generator.generator_config.batch_size
    samples = []
    with tqdm(total=args.n, desc="generating", unit="img") as bar:
        for start in range(0, args.n, batch):
            samples += generator.samples(range(start, min(start + batch, args.n)))
            bar.update(len(samples) - bar.n)
    out = write_preview(samples, generator.label_space, args.out)
    print(f"wrote {out} ({args.n} samples; stats: {generator.stats()})")
    return 0


def run_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .exports.plan import ExportError
    from .exports.run import check_export_args, export, torchrun_process_group
    from .generation.generator import DiffuMaskGenerator

    for flag, value, minimum in (("--n", args.n, 1), ("--start", args.start, 0), ("--shard-size", args.shard_size, 1),
                                 ("--workers", args.workers, 0)):
        if value < minimum:
            parser.error(f"{flag} must be >= {minimum}, got {value}")
    try:
        check_export_args(args.out, args.n, start=args.start, format=args.format, shard_size=args.shard_size,
                          image_format=args.image_format, workers=args.workers)
        config, classes = resolve_generator(args)
        generator = DiffuMaskGenerator(args.model, classes, seed=args.seed, device=args.device, **config.to_dict())
    except (ValueError, TypeError, ImportError, FileNotFoundError) as error:
        parser.error(str(error))
    with torchrun_process_group():
        try:
            metadata = export(generator, args.out, args.n, start=args.start, format=args.format,
                              shard_size=args.shard_size, image_format=args.image_format, workers=args.workers,
                              overwrite=args.overwrite)
        except ExportError as error:
            parser.error(str(error))
    if metadata.get("complete"):
        print(f"wrote {args.n} samples ({args.format}, {metadata['shards']} shards) to {args.out}; "
              f"quality gate: {metadata['gate']}")
    else:
        print(f"wrote this rank's shards to {args.out}; the last rank to finish writes {args.out}/metadata.json")
    return 0


def run_label(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .exports.plan import ExportError
    from .exports.run import check_export_args
    from .real import DiffuMaskLabeler, ImageFolderImages, LabelConfig, PseudoLabelledDataset, read_tags

    if args.shard_size < 1:
        parser.error(f"--shard-size must be >= 1, got {args.shard_size}")
    try:
        images = ImageFolderImages(args.images)
    except (OSError, ValueError) as error:
        parser.error(f"--images: {error}")
    try:
        config, classes = resolve_generator(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    if args.tags is not None:
        try:
            read_tags(args.tags, len(images), images.names, config.label_space, classes)
        except (ValueError, FileNotFoundError) as error:
            parser.error(f"--tags: {error}")
    try:
        labelling = LabelConfig(strength=args.strength, noise=args.noise)
    except ValueError as error:
        parser.error(f"--{error}")
    try:
        check_export_args(args.out, len(images), format=args.format, shard_size=args.shard_size,
                          image_format=args.image_format)
        labeler = DiffuMaskLabeler(args.model, classes, seed=args.seed, device=args.device, labelling=labelling,
                                   **config.to_dict())
        dataset = PseudoLabelledDataset(images, args.tags, labeler)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as error:
        parser.error(str(error))
    try:
        metadata = dataset.export(args.out, format=args.format, shard_size=args.shard_size,
                                  image_format=args.image_format, overwrite=args.overwrite)
    except ExportError as error:
        parser.error(str(error))
    except ValueError as error:  # an image PIL cannot decode, or every pseudo-mask left out
        raise SystemExit(f"error: {error}") from None
    counts = metadata["pseudo_labels"]
    left_out = {reason: n for reason, n in metadata["gate"].items() if n and reason not in ("generated", "accepted")}
    print(f"labelled {counts['images']} images from {args.images}: wrote {counts['written']} ({args.format}, "
          f"{metadata['shards']} shards) to {args.out}; left out {counts['left_out']}{f' {left_out}' if left_out else ''}")
    return 0


def run_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        if args.out:
            check_output_file(args.out)
    except ValueError as error:
        parser.error(f"--out {error}")
    try:
        config, _ = resolve_generator(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    print(config.to_json())
    if args.out:
        config.save(args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a bad flag value is a usage error (exit 2) naming it, before any model loads."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = {"stream": run_stream, "preview": run_preview, "export": run_export, "label": run_label,
           "config": run_config}[args.command]
    return run(args, parser)


if __name__ == "__main__":
    sys.exit(main())
