"""Train torchvision's DeepLabV3 on DiffuMask's synthetic stream, alone or mixed with real VOC-format data.

    python train/train_deeplab.py --synthetic-only                  # the embedded toy model, ~10 CPU minutes
    python train/train_deeplab.py --voc-root data/VOC --synthetic-ratio 0.5
    torchrun --nproc_per_node=2 train/train_deeplab.py --synthetic-only   # DDP (nccl on GPUs, gloo on CPU)
    python train/train_deeplab.py --synthetic-only --resume out/train/checkpoint.pt
    python train/train_deeplab.py --synthetic-only --from-export data/toy_wds   # samples read, not generated
    python train/train_deeplab.py --pseudo-images my_images --pseudo-tags my_images/tags.json   # + your own images

A bad flag is refused before anything is built, as argparse refuses its own: one line
``train_deeplab.py: error: ...`` on stderr and exit status 2. Only rank 0 logs and writes checkpoints
and metrics (``metrics.jsonl``/``metrics.csv``). A checkpoint that cannot be written (disk full) is a
warning and training continues, the previous one kept; the last one failing stops the run with an error.
A resumed run is given its checkpoint's flags, but for those that leave the run the same and those
``--allow-changed`` names (see ``--resume``). A loss that is not finite stops the run
(``--max-nonfinite-steps``), and weights that are not finite stop it before they are saved: the last
good checkpoint is kept. A checkpoint resumes under another number of ranks or DataLoader workers:
the stream's position is resharded (no sample served twice or skipped), a map-style mix continues
from the start of the next epoch.
"""
from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import math
import pickle
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, Subset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.datasets import VOCSegmentation
from torchvision.models import segmentation
from tqdm.auto import tqdm

from ondemand_seg import AugmentConfig, DiffuMaskAugment, DiffuMaskDataset, DiffuMaskStream, SegmentationTransform
from ondemand_seg.cli import HelpFormatter, add_generator_arguments, resolve_generator
from ondemand_seg.data.fingerprint import files_digest, model_fingerprint
from ondemand_seg.data.label_noise import LabelNoiseFilter
from ondemand_seg.data.stream import find_stream_states
from ondemand_seg.exports import ExportError, ExportSource
from ondemand_seg.exports.run import model_name
from ondemand_seg.pipelines.devices import check_device
from ondemand_seg.pipelines.loading import check_model_source
from ondemand_seg.real.labeler import LabelConfig, check_labelling_family
from ondemand_seg.settings.label_spaces import class_ids
from ondemand_seg.settings.validation import MAX_IMAGE_SIDE
from ondemand_seg.metrics import ConfusionMatrix
from ondemand_seg.toyworld import TOY_CLASSES, write_voc
from dilated_convs import crop_dilated_convs
from seeded_data import SeededServings, SourceFlaggedConcatDataset, StatefulConcatDataset
from utils import (CheckpointError, MetricLog, MetricLogError, all_gather_object, all_reduce_mean, init_distributed,
                   is_main_process, load_checkpoint, output_dir_problem, save_checkpoint)

# torchdata 0.11 calls an API torch has deprecated; the message says nothing about this run.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

PROG = Path(__file__).name


# Crops are allocated whole: no larger than the largest image side the library generates.
MAX_CROP_SIZE = MAX_IMAGE_SIDE

class FlagError(SystemExit):
    """A bad flag: :func:`cli` prints it as argparse prints its own errors (``train_deeplab.py:
    error: MESSAGE``, one line on stderr) and exits with argparse's status, 2."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = " ".join(line.strip() for line in message.splitlines())

    def __str__(self) -> str:
        return self.message


# On --resume every flag is compared with the checkpoint's run (check_resume_args) except these,
# which change neither the samples, their order, the weights' shapes nor the learning rate: where
# and how often the run writes, what and how often it evaluates, how fast it runs. The backbone
# weights only initialise a run, and a resumed one takes the checkpoint's weights instead. --workers
# (like the number of ranks) changes how the data position is split, which restore_data_position
# moves to the new split. --from-export is compared by the export's identity, not its path.
RESUME_FREE = ("output_dir", "resume", "checkpoint_every", "eval_every", "eval_limit", "eval_root", "data_dir",
               "threads", "device", "prefetch_batches", "print_config", "backbone_weights", "allow_changed",
               "max_nonfinite_steps", "workers")
# Compared flags whose change is applied from the resumed step on when --allow-changed names them:
# the optimiser's settings, the run's length (which the learning-rate decay ends with: see
# retarget_schedule), the weight average's decay and online noise learning (whose history a
# checkpoint does not keep anyway). Every other compared flag picks the samples and their order that
# the checkpoint's loader position belongs to (seed, batch sizes, data, generator, augmentation,
# the export read) or the weights' shapes (backbone).
RESUME_ALLOWABLE = ("lr", "weight_decay", "steps", "ema_decay", "noise_cutoff", "noise_warmup", "noise_drop_fraction",
                    "noise_mode")


# The learning rate decays as (1 - step / --steps) ** LR_POWER, to 0 at the last step.
LR_POWER = 0.9

# DeepLabHead's last convolution, one output channel a class whatever the backbone: a checkpoint's
# number of classes.
CLASSIFIER_WEIGHT = "classifier.4.weight"


def flag_name(key: str) -> str:
    """The command-line spelling of an ``args`` attribute: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


BACKBONES = {
    "mobilenet_v3_large": segmentation.deeplabv3_mobilenet_v3_large,
    "resnet50": segmentation.deeplabv3_resnet50,
    "resnet101": segmentation.deeplabv3_resnet101,
}


def get_args_parser() -> argparse.ArgumentParser:
    """The trainer's flags; :func:`check_args` checks their values."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--synthetic-only", action="store_true", help="train on the DiffuMask stream alone")
    source.add_argument("--real-only", action="store_true", help="train on the real VOC-format data alone (a baseline)")
    data.add_argument("--voc-root", type=Path, default=None,
                      help="folder holding VOCdevkit/VOC2012 with real training data (default: a ToyWorld folder in --data-dir)")
    data.add_argument("--eval-root", type=Path, default=None,
                      help="folder holding VOCdevkit/VOC2012 whose val split is evaluated (default: same as --voc-root)")
    data.add_argument("--data-dir", type=Path, default=Path("data/toyworld"),
                      help="where the ToyWorld VOC folder is written when no --voc-root/--eval-root is given")
    data.add_argument("--synthetic-ratio", type=float, default=0.5, help="share of synthetic samples when mixing")
    data.add_argument("--real-images", type=int, default=None,
                      help="train on this many images of the real train split, drawn with --seed (default: all); "
                           "the few-labels regime")
    data.add_argument("--pseudo-label-rest", action="store_true",
                      help="with --real-images: add the real train images left out, pseudo-labelled by the model from "
                           "their tags (the classes their own masks hold; image-level labels only)")
    data.add_argument("--pseudo-images", type=Path, default=None, metavar="DIR",
                      help="add your own unlabelled images (the image files directly in DIR, in name order), "
                           "pseudo-labelled by the model, beside the real images: with --real-only, or in the mix "
                           "(--synthetic-ratio stays the share of the real and synthetic parts); not with "
                           "--synthetic-only")
    data.add_argument("--pseudo-tags", type=Path, default=None, metavar="FILE",
                      help="with --pseudo-images: JSON tags file, per image the classes it contains (a list in name "
                           "order, or an object keyed by file name); without it every class of --classes is read "
                           "and the presence test keeps those the attention finds (rougher masks)")
    data.add_argument("--pseudo-strength", type=float, default=0.1,
                      help="noise strength the pseudo-labelled images (--pseudo-label-rest, --pseudo-images) are read "
                           "at (LabelConfig.strength)")
    data.add_argument("--crop-size", type=int, default=64, help="training and evaluation image size")
    data.add_argument("--from-export", type=Path, default=None, metavar="DIR",
                      help="read the synthetic samples from an export (python -m ondemand_seg export) instead of "
                           "generating them: with --synthetic-only a stream over it, else the mix's synthetic set; "
                           "it serves what the live generator of the export's settings and seed would, so the "
                           "generator flags are the export's and may not be given")
    add_generator_arguments(p)
    gen = p.add_argument_group("synthetic data")
    gen.add_argument("--reuse", type=int, default=8, help="times each generated sample is served")
    gen.add_argument("--cache-size", type=int, default=64, help="generated samples kept per worker")
    gen.add_argument("--augment", choices=["basic", "full", "off"], default="full",
                     help="synthetic-sample augmentation: the full recipe (splicing, blur, occlusion, perspective, "
                          "scale jitter; default), crop+flip only, or none")
    gen.add_argument("--splice-fit", choices=["crop", "whole"], default="crop",
                     help="--augment full: splice windows cut at an unspliced sample's scale (default; objects keep "
                          "size and shape), or whole samples resized into their tiles (the paper)")
    gen.add_argument("--noise-cutoff", type=float, default=None,
                     help="online noise learning: after --noise-warmup steps, a synthetic class region whose "
                          "mask agrees with the model's prediction below this IoU (and among its class's lowest "
                          "--noise-drop-fraction) is dropped or relabelled; real labels are never pruned")
    gen.add_argument("--noise-warmup", type=int, default=200, help="steps before noise learning starts")
    gen.add_argument("--noise-drop-fraction", type=float, default=0.1,
                     help="prune only a class's lowest-scoring share of regions (recent history); 1 = plain cutoff")
    gen.add_argument("--noise-mode", choices=["drop", "relabel"], default="drop",
                     help="what a pruned region becomes: ignore, or the model's prediction")
    gen.add_argument("--synthetic-length", type=int, default=None,
                     help="size of the map-style synthetic set when mixing (default: from --synthetic-ratio); when "
                          "given, the real images are repeated so that --synthetic-ratio still holds")
    model = p.add_argument_group("model and optimisation")
    model.add_argument("--backbone", default="mobilenet_v3_large", help="one of " + ", ".join(BACKBONES))
    model.add_argument("--backbone-weights", type=Path, default=None,
                       help="local ImageNet backbone weights (.safetensors or .pth); default random init")
    model.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    model.add_argument("--batch-size", type=int, default=16, help="per process")
    model.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate, polynomial decay")
    model.add_argument("--weight-decay", type=float, default=1e-4)
    model.add_argument("--ema-decay", type=float, default=0.0,
                       help="evaluate an exponential moving average of the weights, updated every step with this "
                            "decay (torchvision references' --model-ema); 0: off, the trained weights are evaluated")
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, default=1, help="DataLoader workers per process")
    run.add_argument("--prefetch-batches", type=int, default=None,
                     help="batches each worker prepares ahead of the trainer (default: with --synthetic-only, the "
                          "batches one generation call feeds, generation batch x reuse / batch size; else torch's 2)")
    run.add_argument("--output-dir", type=Path, default=Path("out/train"))
    run.add_argument("--resume", type=Path, default=None,
                     help="checkpoint to continue from; the run's flags must be the checkpoint's, except "
                          + ", ".join(map(flag_name, RESUME_FREE)) + " and what --allow-changed names; a flag the "
                          "checkpoint has no record of (it predates the flag) is not compared")
    run.add_argument("--allow-changed", nargs="+", default=[], metavar="FLAG",
                     choices=[name.replace("_", "-") for name in RESUME_ALLOWABLE],
                     help="with --resume, accept these flags' new values and apply them from the resumed step on "
                          "(named without dashes: " + ", ".join(name.replace("_", "-") for name in RESUME_ALLOWABLE)
                          + "; --ema-decay cannot turn the average on or off; with --steps the learning rate "
                          "becomes, from the resumed step on, the one a run started with the new --steps has there, "
                          "decaying to 0 at its last step); the change is printed and logged. "
                          "Flags that choose the samples, their order or the weights' shapes never change "
                          "(default: none)")
    run.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    run.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end only)")
    run.add_argument("--eval-limit", type=int, default=None, help="evaluate at most this many val images")
    run.add_argument("--max-nonfinite-steps", type=int, default=0, metavar="N",
                     help="steps in a row whose loss is NaN or infinite that are skipped (no weight update; "
                          "logged) before the run stops with an error; 0: the first one stops it. Weights that "
                          "are not finite stop the run before any checkpoint of them is written")
    run.add_argument("--seed", type=int, default=0, help="seed of the generator, the model and the data order")
    run.add_argument("--print-config", action="store_true",
                     help="print the generator settings (model preset merged with the flags) as JSON and exit")
    run.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads per process (default: torch's, less one core per DataLoader worker "
                          "when the workers generate on the CPU)")
    return p


@dataclass
class LoopTimes:
    """Where the training loop's time goes: waiting for batches or training on them. The first step
    (worker start-up, pipeline loading) is kept apart from steady-state feeding."""

    startup: float = 0.0
    waited: float = 0.0
    trained: float = 0.0
    first: bool = True

    def add(self, started: float, fetched: float, done: float) -> None:
        """Count one step that started waiting at ``started``, had its batch at ``fetched`` and was done at ``done``."""
        if self.first:
            self.startup, self.first = done - started, False
        else:
            self.waited += fetched - started
            self.trained += done - fetched

    @property
    def wait_share(self) -> float:
        """The share of the loop's steady-state time spent waiting for data."""
        return self.waited / max(self.waited + self.trained, 1e-9)


@dataclass
class Run:
    """What the training loop reads and advances: built by :func:`build_run`, restored by
    :func:`restore_checkpoint`, saved by :func:`save_run_checkpoint`."""

    args: argparse.Namespace
    label_space: tuple[str, ...]
    device: torch.device
    rank: int
    world: int
    bare: nn.Module  # what is saved, loaded and averaged
    model: nn.Module  # what the loop calls: with several ranks, DDP around the same module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.PolynomialLR
    criterion: nn.Module
    noise: LabelNoiseFilter | None
    loader: StatefulDataLoader
    train_data: Dataset
    log: MetricLog
    last_saved: Path | None  # the latest good checkpoint, named when the run stops
    step: int = 0
    epoch: int = 0
    nonfinite_in_a_row: int = 0
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))  # for BatchNorm recalibration
    times: LoopTimes = field(default_factory=LoopTimes)

    @property
    def evaluated(self) -> nn.Module:
        """The weights every evaluation scores: their average when one is kept."""
        return self.ema.module if self.ema is not None else self.model


def main(args: argparse.Namespace) -> dict:
    """Train and evaluate as ``args`` say; the final metrics row (with ``--print-config``, the
    generator settings instead). A bad flag is a :class:`FlagError`, raised before anything is built
    but where only the data or the backbone weights show it."""
    config, args.classes = generator_config(args)
    if args.print_config:
        print(config.to_json())
        return {"config": config.to_dict()}
    check_args(args, config)
    # The flags as checkpoints record them, taken now: --pseudo-images/--pseudo-tags by their content
    # before it is labelled, so an edit during the run cannot be recorded as what was labelled.
    saved_args(args)
    checkpoint = read_resume_checkpoint(args)
    changes = check_resume_args(checkpoint, args, config.label_space) if checkpoint is not None else {}
    rank, world, local_rank = init_distributed()
    device = set_up_process(args, rank, world, local_rank)
    prepare_folders(args, config)
    run = build_run(args, config, device, rank, world, local_rank)
    if checkpoint is not None:
        restore_checkpoint(run, checkpoint, changes)
    train(run, resumed_rng=checkpoint["rng"] if checkpoint is not None else None)
    summary = final_evaluation(run)
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


def generator_config(args: argparse.Namespace):
    """The generator's settings and classes: the model's preset merged with the flags (the library's
    :func:`~ondemand_seg.settings.resolve.resolve_config`), or with ``--from-export`` the export's;
    a bad value is a :class:`FlagError` naming it."""
    if args.from_export is not None:
        source = read_export(args)
        return source.config, list(source.classes)
    try:
        return resolve_generator(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise FlagError(str(error)) from None


def read_export(args: argparse.Namespace) -> ExportSource:
    """The ``--from-export`` export, or a :class:`FlagError` naming what is wrong with it or the
    generator flags given with it (its samples were generated with the export's settings)."""
    given = [flag_name(key) for key, default in generator_flag_defaults().items() if getattr(args, key) != default]
    if given:
        raise FlagError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} how samples are generated, and "
                        f"--from-export {args.from_export} reads samples generated with the export's settings: drop "
                        f"{'it' if len(given) == 1 else 'them'} (--print-config shows the export's)")
    if args.real_only:
        raise FlagError("--from-export reads synthetic samples and a --real-only run has none")
    try:
        return ExportSource(args.from_export)
    except ExportError as error:
        raise FlagError(f"--from-export: {error}") from None


def generator_flag_defaults() -> dict:
    """The generator flags (``args`` keys) and their defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    add_generator_arguments(parser)
    return vars(parser.parse_args([]))


def export_identity(folder: Path) -> str:
    """What a checkpoint records of ``--from-export``: the export's identity (its plan, which
    names its generator, settings, seed and range, but not the folder or its format), readable."""
    source = ExportSource(folder)
    digest = hashlib.sha256(json.dumps(source.fingerprint, sort_keys=True).encode()).hexdigest()
    return (f"export of samples {source.indices.start} to {source.indices.stop - 1}, seed {source.export_seed} "
            f"(sha256:{digest[:16]})")


# More torch threads than any machine has cores; a million made torch run out of memory.
MAX_THREADS = 1024
# More DataLoader worker processes per rank than any machine runs.
MAX_WORKERS = 256
# The largest --seed: torch.manual_seed takes 64-bit values, and ranks seed with --seed + rank.
MAX_SEED = 2**63 - 1


def check_args(args: argparse.Namespace, config) -> None:
    """Refuse every bad flag with a :class:`FlagError` naming it, before data or models load
    (generator values already failed in :func:`generator_config`; ``config`` holds them)."""
    label_space = config.label_space
    if args.backbone not in BACKBONES:
        raise FlagError(f"--backbone: unknown backbone {args.backbone!r}; choose one of {', '.join(BACKBONES)}")
    for flag in ("voc_root", "eval_root"):
        root = getattr(args, flag)
        if root is not None and not (root / "VOCdevkit" / "VOC2012").is_dir():
            raise FlagError(f"--{flag.replace('_', '-')} {root} has no VOCdevkit/VOC2012 folder")
    if args.backbone_weights is not None and not args.backbone_weights.is_file():
        raise FlagError(f"--backbone-weights {args.backbone_weights} is not a file")
    if args.noise_cutoff is not None and args.real_only:
        raise FlagError("--noise-cutoff prunes synthetic labels and a --real-only run has none")
    if not 0.0 <= args.ema_decay < 1.0:
        raise FlagError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not 0.0 < args.synthetic_ratio < 1.0:
        raise FlagError(f"--synthetic-ratio must be in (0, 1), got {args.synthetic_ratio}")
    # AdamW takes a NaN or infinite rate without complaint and trains the weights to NaN.
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise FlagError(f"--lr must be a finite number > 0, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise FlagError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    for flag, problem in (("output_dir", output_dir_problem(args.output_dir)), ("data_dir", data_dir_problem(args))):
        if problem:
            raise FlagError(f"--{flag.replace('_', '-')} {getattr(args, flag)} {problem}")
    try:
        check_device(args.device)
    except (ValueError, TypeError) as error:
        raise FlagError(f"--device: {error}") from None
    if args.real_images is not None and args.synthetic_only:
        raise FlagError("--real-images picks real training images and cannot go with --synthetic-only")
    if args.pseudo_label_rest and args.real_images is None:
        raise FlagError("--pseudo-label-rest pseudo-labels the train images --real-images leaves out; give --real-images")
    if not 0 < args.pseudo_strength <= 1:
        raise FlagError(f"--pseudo-strength must be in (0, 1], got {args.pseudo_strength}")
    check_pseudo_labelling(args)
    if args.pseudo_tags is not None and args.pseudo_images is None:
        raise FlagError("--pseudo-tags names the classes of the --pseudo-images images; give --pseudo-images")
    if args.pseudo_images is not None:
        if args.synthetic_only:
            raise FlagError("--pseudo-images adds pseudo-labelled images beside the real ones and --synthetic-only "
                            "trains on the stream alone: drop --synthetic-only (a mix) or use --real-only")
        pseudo_folder(args, label_space)
    for flag, problem in inert_flags(args):
        raise FlagError(f"--{flag.replace('_', '-')} {problem}; drop it")
    if args.synthetic_length is not None and (args.synthetic_only or args.real_only):
        raise FlagError("--synthetic-length sizes the synthetic part of a mixed run; drop --synthetic-only/--real-only")
    for flag in ("steps", "batch_size", "reuse", "cache_size", "crop_size", "checkpoint_every", "real_images",
                 "synthetic_length", "prefetch_batches", "threads", "eval_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise FlagError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.synthetic_only and args.cache_size < config.generator.batch_size:
        # A stream's cache holds at least one generation call's samples.
        raise FlagError(f"--cache-size {args.cache_size} is less than the generation batch "
                        f"({config.generator.batch_size}, --gen-batch-size): the cache holds a whole generation call")
    if args.crop_size > MAX_CROP_SIZE:  # crops are allocated whole: 100,000 px a side is 28 GiB per image
        raise FlagError(f"--crop-size must be at most {MAX_CROP_SIZE}, got {args.crop_size}")
    for flag in ("workers", "eval_every", "noise_warmup", "max_nonfinite_steps", "seed"):
        if getattr(args, flag) < 0:
            raise FlagError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.workers > MAX_WORKERS:
        raise FlagError(f"--workers must be at most {MAX_WORKERS}, got {args.workers} (each worker is a process "
                        "holding its own model; starting that many exhausts the machine before the first batch)")
    if args.threads is not None and args.threads > MAX_THREADS:
        raise FlagError(f"--threads must be at most {MAX_THREADS}, got {args.threads} (torch makes a thread pool that "
                        "large, which exhausts memory long before it is used)")
    if args.seed > MAX_SEED:  # torch's generators take 64-bit seeds; each rank seeds with --seed + rank
        raise FlagError(f"--seed must be at most {MAX_SEED} (2**63 - 1), got {args.seed}")
    if label_space != TOY_CLASSES and uses_toyworld(args):
        raise FlagError("the default real data is ToyWorld; with another label space pass --voc-root and --eval-root")
    try:
        class_ids(args.classes, label_space)
        if args.noise_cutoff is not None:
            noise_filter(args)
    except ValueError as error:
        raise FlagError(str(error)) from None


def inert_flags(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Flags given (not at their defaults) that would do nothing with the others, and why: a user
    who gives one expects an effect the run would silently not have."""
    parser = get_args_parser()
    given = [key for key, value in vars(args).items() if value != parser.get_default(key)]
    inert = []
    if args.resume is None and "allow_changed" in given:
        inert.append(("allow_changed", "accepts changed flags on --resume, and this run does not resume"))
    if args.noise_cutoff is None:
        inert += [(key, "tunes noise learning, which is off without --noise-cutoff")
                  for key in ("noise_warmup", "noise_drop_fraction", "noise_mode") if key in given]
    if "splice_fit" in given and args.augment != "full":
        inert.append(("splice_fit", f"places the splices of --augment full, and --augment is {args.augment}"))
    if "synthetic_ratio" in given and (args.real_only or args.synthetic_only):
        inert.append(("synthetic_ratio", f"sets the synthetic share of a mix, and {'--real-only' if args.real_only else '--synthetic-only'} "
                                         "runs no mix"))
    return inert


def check_pseudo_labelling(args: argparse.Namespace) -> None:
    """Refuse, before anything is built, what ``--pseudo-label-rest`` / ``--pseudo-images`` could not
    do: a strength that starts no denoising step, a model family with no image-to-image pipeline, an
    export's model that is not here as it was; and ``--pseudo-strength`` without either (it would do
    nothing)."""
    if not args.pseudo_label_rest and args.pseudo_images is None:
        if args.pseudo_strength != get_args_parser().get_default("pseudo_strength"):
            raise FlagError("--pseudo-strength sets how --pseudo-label-rest or --pseudo-images reads its images; "
                            "without either it does nothing: drop it or add --pseudo-label-rest")
        return
    try:
        LabelConfig(strength=args.pseudo_strength)
    except ValueError as error:
        raise FlagError(f"--pseudo-strength: {error}") from None
    spec = check_model_source(labelling_model(args))
    if spec is not None:  # a callable's family is known once it is loaded
        try:
            check_labelling_family(spec.family)
        except ValueError as error:
            flag = "--pseudo-label-rest" if args.pseudo_label_rest else "--pseudo-images"
            raise FlagError(f"{flag}: {error}") from None


def labelling_model(args: argparse.Namespace):
    """The model that pseudo-labels (``--pseudo-label-rest``): ``--model``, or with ``--from-export``
    the model the export was generated with, which must be here with the same weights (its
    recipe, the export's settings, belongs to those weights); a :class:`FlagError` otherwise."""
    if args.from_export is None:
        return args.model
    source = ExportSource(args.from_export)
    try:
        here = model_fingerprint(source.model)
    except (ValueError, OSError, TypeError):
        here = None
    if here != source.fingerprint.get("model"):
        raise FlagError(f"--pseudo-label-rest labels with the model --from-export {args.from_export} was generated "
                        f"with ({source.model!r}), and it is not here with the same weights; drop --pseudo-label-rest "
                        "or train with that model generating live (--model)")
    return source.model


def uses_toyworld(args: argparse.Namespace) -> bool:
    """Whether the run trains or evaluates on the ToyWorld folder in ``--data-dir``: no ``--voc-root``,
    and real training data or a val split are wanted (``--eval-root`` defaults to ``--voc-root``)."""
    return args.voc_root is None and (not args.synthetic_only or args.eval_root is None)


def toyworld_ready(data_dir: Path) -> Path:
    """The file whose presence says the ToyWorld folder in ``data_dir`` is complete (written last)."""
    return data_dir / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"


def data_dir_problem(args: argparse.Namespace) -> str | None:
    """Why ToyWorld cannot be written into ``--data-dir`` when this run needs it written; a complete
    one already there is only read, so a read-only copy is fine."""
    if not uses_toyworld(args) or toyworld_ready(args.data_dir).is_file():
        return None
    return output_dir_problem(args.data_dir)


def read_resume_checkpoint(args: argparse.Namespace) -> dict | None:
    """The ``--resume`` checkpoint, or a :class:`FlagError` naming what is wrong with the file."""
    if args.resume is None:
        return None
    try:
        return load_checkpoint(args.resume)
    except CheckpointError as error:
        raise FlagError(f"--resume: {error}") from None


def check_resume_args(checkpoint: dict, args: argparse.Namespace, label_space: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """The changes from the checkpoint's run that ``--allow-changed`` accepts, ``{key: (old, new)}``;
    a :class:`FlagError` naming every other change with its old and new value.

    Compared: every flag but :data:`RESUME_FREE`, as the checkpoint's ``args`` records it (a flag it
    has no record of, from a checkpoint older than the flag, is not compared: see
    :func:`unrecorded_flags`); the number of classes, against the checkpoint's classifier; whether a
    weight average is kept. Only :data:`RESUME_ALLOWABLE` flags may be accepted, never the backbone,
    the classes, ``--workers`` or turning the average on or off.
    """
    recorded_workers = checkpoint.get("args", {}).get("workers", str(args.workers))
    if not str(recorded_workers).isdigit():  # its loader states are laid out by this number
        raise FlagError(f"--resume {args.resume}: its args record --workers {recorded_workers!r}, not a number of "
                        "DataLoader workers; it was not written by this trainer")
    old, new = comparable(checkpoint.get("args", {})), comparable(saved_args(args))
    changes = {key: (old[key], new[key]) for key in new if key not in RESUME_FREE and key in old and old[key] != new[key]}
    accepted = {name.replace("-", "_") for name in args.allow_changed}
    why = {}
    averaged = "ema" in checkpoint
    if averaged != (args.ema_decay > 0):  # the average's state would be dropped, or is not there to continue
        changes.setdefault("ema_decay", ("on" if averaged else "off", str(args.ema_decay)))
        why["ema_decay"] = f" (the checkpoint keeps {'a' if averaged else 'no'} weight average)"
        accepted.discard("ema_decay")
    refused = [f"{flag_name(key)} {before} -> {after}{why.get(key, '')}" for key, (before, after) in changes.items()
               if key not in accepted]
    classifier = checkpoint["model"].get(CLASSIFIER_WEIGHT)
    if classifier is not None and classifier.shape[0] != len(label_space):
        refused.append(f"the label space (--model, --vocabulary, --classes) {classifier.shape[0]} -> {len(label_space)} classes")
    if refused:
        allowable = [key for key in changes if key in RESUME_ALLOWABLE and key not in accepted and key not in why]
        hint = f" or accept {', '.join(map(flag_name, allowable))} with --allow-changed" if allowable else ""
        raise FlagError(f"--resume {args.resume} continues a run with other flags: {', '.join(refused)}; "
                        f"resume with the checkpoint's values{hint}")
    if args.steps < checkpoint["step"]:
        raise FlagError(f"--steps {args.steps} ends before step {checkpoint['step']}, where --resume {args.resume} "
                        "continues")
    return {key: change for key, change in changes.items() if key in accepted}


def saved_args(args: argparse.Namespace) -> dict[str, str]:
    """The flags as a checkpoint records them (``str`` of each value; ``--from-export`` as the
    export's :func:`export_identity`) and :func:`check_resume_args` compares them."""
    saved = {key: str(value) for key, value in vars(args).items()}
    if args.from_export is not None:
        saved["from_export"] = export_identity(args.from_export)
    # The pseudo-labelled images and their tags by content too: an image or tag edited in place
    # between a run and its resume would give other pseudo-masks under the same path.
    if args.pseudo_images is not None:
        saved["pseudo_images"] = content_identity(str(args.pseudo_images), folder=True)
    if args.pseudo_tags is not None:
        saved["pseudo_tags"] = content_identity(str(args.pseudo_tags), folder=False)
    return saved


@functools.lru_cache(maxsize=None)
def content_identity(path: str, folder: bool) -> str:
    """``path`` and a sha256 of its content (a folder's: its image files' names and contents),
    taken once per process: the data the run labelled at its start."""
    from ondemand_seg.real.images import image_files

    try:
        digest = files_digest(image_files(path) if folder else [path])
    except (OSError, ValueError):
        return path  # refused with its reason where the flag is checked
    return f"{path} (sha256:{digest[:16]})"


def comparable(recorded: dict[str, str]) -> dict[str, str]:
    """``recorded`` flags as compared on resume. Without ``--voc-root`` the run reads the ToyWorld
    folder in ``--data-dir`` and stores that folder as its ``--voc-root``: the same data whichever
    ``--data-dir`` holds it."""
    if "voc_root" in recorded and recorded["voc_root"] in ("None", recorded.get("data_dir")):
        recorded = {**recorded, "voc_root": "ToyWorld"}
    return {key: "unset" if value == "None" else value for key, value in recorded.items()}


def unrecorded_flags(checkpoint: dict, args: argparse.Namespace) -> list[str]:
    """Compared flags the checkpoint has no record of (it predates them), so not compared."""
    recorded = checkpoint.get("args", {})
    return [flag_name(key) for key in vars(args) if key not in RESUME_FREE and key not in recorded]


def set_up_process(args: argparse.Namespace, rank: int, world: int, local_rank: int) -> torch.device:
    """Set this process's torch threads and seed; the device it trains on."""
    threads = training_threads(args, world)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed + rank)
    return device


def training_threads(args: argparse.Namespace, world: int) -> int | None:
    """torch threads for the training process: ``--threads``, else, when DataLoader workers
    generate synthetic data on the CPU, the cores left after one per worker (each worker runs one
    thread), shared by the ranks; ``None`` keeps torch's choice.

    The trainer at torch's default takes every core and then competes with the generating workers
    for them: both slow down, and the workers are what the trainer waits on.
    """
    if args.threads is not None:
        return args.threads
    if args.real_only or args.workers == 0 or torch.cuda.is_available():
        return None
    return max(1, torch.get_num_threads() // world - args.workers)


def prepare_folders(args: argparse.Namespace, config) -> None:
    """Write ToyWorld where the run needs it (``--voc-root``/``--eval-root`` then name it), create
    ``--output-dir`` and save the generator settings there (rank 0)."""
    # ToyWorld is written at the generator's image size whatever the run, so real-only, synthetic
    # and mixed runs sharing a --data-dir are scored on the same val images.
    if uses_toyworld(args):
        args.voc_root = default_voc_root(args, config.image_size)
    args.eval_root = args.eval_root or args.voc_root
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FlagError(f"--output-dir {args.output_dir} cannot be created: {error}") from None
    if is_main_process() and not args.real_only:
        config.save(args.output_dir / "generator_config.json")


def default_voc_root(args: argparse.Namespace, image_size: int) -> Path:
    """The ToyWorld VOC folder (written once by rank 0) used when no real data is named."""
    if is_main_process() and not toyworld_ready(args.data_dir).is_file():
        # A fixed dataset, not drawn from --seed: runs with different training seeds are scored on
        # the same val split.
        write_voc(args.data_dir, n_train=1000, n_val=200, image_size=image_size, seed=0)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return args.data_dir


def build_run(args: argparse.Namespace, config, device: torch.device, rank: int, world: int, local_rank: int) -> Run:
    """The model (in DDP with several ranks), AdamW, the polynomial schedule, the loss, noise learning,
    the training loader and the weight average, as a fresh run starts them."""
    bare = build_model(args, len(config.label_space)).to(device)
    model = bare
    if world > 1:
        model = nn.parallel.DistributedDataParallel(bare, device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=args.steps, power=LR_POWER)
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    noise = noise_filter(args) if args.noise_cutoff is not None else None
    loader, train_data = build_train_loader(args, config, rank, world, device)
    ema = ema_model(bare, args.ema_decay) if args.ema_decay else None
    return Run(args, config.label_space, device, rank, world, bare, model, ema, optimizer, scheduler, criterion, noise,
               loader, train_data, MetricLog(args.output_dir), last_saved=args.resume)


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """DeepLabV3 on ``--backbone``, from random init or ``--backbone-weights``, its padding-only dilated taps skipped."""
    model = BACKBONES[args.backbone](weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    # Same function and parameters; on crops smaller than the ASPP's dilations most taps read padding only.
    crop_dilated_convs(model)
    if args.backbone_weights is None:
        if is_main_process():
            print(f"backbone {args.backbone}: random init (pass --backbone-weights PATH for ImageNet weights)")
        return model
    state = read_backbone_weights(args.backbone_weights)
    # torchvision classifiers keep the DeepLab backbone under "features." (MobileNet) or at the root (ResNet).
    state = {k.removeprefix("features."): v for k, v in state.items()}
    own = model.backbone.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(matched) < len(own) // 2:
        raise FlagError(f"--backbone-weights {args.backbone_weights} matches {len(matched)} of {len(own)} "
                        f"{args.backbone} backbone tensors")
    model.backbone.load_state_dict(matched, strict=False)
    if is_main_process():
        print(f"backbone {args.backbone}: loaded {len(matched)}/{len(own)} tensors from {args.backbone_weights}")
    return model


def read_backbone_weights(path: Path) -> dict:
    """The tensors of ``--backbone-weights`` (safetensors, or a torch file read with
    ``weights_only=True``: a pickle naming code is refused, never run); a :class:`FlagError` naming
    the file when it cannot be read as either."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as error:
        detail = " ".join(str(error).split())[:300]
        raise FlagError(f"--backbone-weights {path} cannot be read as weights ({type(error).__name__}: {detail})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FlagError(f"--backbone-weights {path} holds {type(state).__name__}, not a dict of named tensors")
    return state


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """torch's :class:`AveragedModel` keeping ``decay``-weighted moving averages of ``model``'s
    parameters (``update_parameters`` after each optimizer step). BatchNorm statistics are not
    averaged: :func:`recalibrate_batchnorm` re-estimates them for the averaged weights before each
    evaluation, as for the trained ones."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def noise_filter(args: argparse.Namespace) -> LabelNoiseFilter:
    """Online noise learning as the ``--noise-*`` flags set it."""
    return LabelNoiseFilter(args.noise_cutoff, args.noise_warmup, args.noise_mode, args.noise_drop_fraction)


def build_train_loader(args, config, rank: int, world: int, device: torch.device) -> tuple[StatefulDataLoader, object]:
    """This rank's training loader and the dataset it serves: the stream (``--synthetic-only``) or the
    real set, alone or mixed with a synthetic set, in a seeded sampler whose position resumes."""
    # CUDA cannot start in forked workers; generation on the GPU needs spawned ones.
    context = "spawn" if device.type == "cuda" and args.workers > 0 else None
    common = dict(batch_size=args.batch_size, num_workers=args.workers, multiprocessing_context=context, drop_last=True,
                  persistent_workers=args.workers > 0)
    prefetch = args.prefetch_batches
    if prefetch is None and args.synthetic_only:
        prefetch = generation_burst(config.generator.batch_size, args.reuse, args.batch_size)
    if args.workers > 0 and prefetch is not None:
        common["prefetch_factor"] = prefetch
    if args.synthetic_only:
        if args.from_export is not None:
            stream = DiffuMaskStream.from_export(args.from_export, reuse=args.reuse, cache_size=args.cache_size,
                                                 seed=args.seed, transforms=synthetic_transform(args))
            say_export(stream.source, args.seed)
        else:
            stream = DiffuMaskStream(args.model, args.classes, reuse=args.reuse, cache_size=args.cache_size,
                                     seed=args.seed, transforms=synthetic_transform(args), **config.to_dict())
        return StatefulDataLoader(stream, **common), stream
    real = SeededServings(real_training_set(args), SegmentationTransform(args.crop_size, train=True), args.seed)
    pseudo = [SeededServings(part, SegmentationTransform(args.crop_size, train=True), args.seed)
              for part in pseudo_labelled_sets(args, config)]
    parts = [real] + pseudo
    if not args.real_only:
        length, repeats = mix_sizes(len(real), args.synthetic_ratio, args.synthetic_length)
        parts = [real] * repeats + pseudo
        # The whole synthetic set stays cached: later epochs reuse it, and splicing draws each item's
        # partners from its generation block, generated once.
        if args.from_export is not None:
            synthetic = synthetic_set_from_export(args, length)
        else:
            synthetic = DiffuMaskDataset(args.model, args.classes, length=length, transforms=synthetic_transform(args),
                                         cache_size=length, seed=args.seed, **config.to_dict())
        parts.append(synthetic)
        if is_main_process():
            added = sum(map(len, pseudo))
            print(f"mixing {len(real)} real images (x{repeats}){f' and {added} pseudo-labelled' if added else ''} "
                  f"with {length} synthetic: {length / (length + repeats * len(real) + added):.0%} of samples synthetic")
    # With noise learning each item carries whether it is synthetic: only those labels may be pruned.
    dataset = (StatefulConcatDataset(parts) if args.noise_cutoff is None
               else SourceFlaggedConcatDataset(parts, flagged=[len(parts) - 1]))
    if len(dataset) < args.batch_size * world:  # drop_last would make every epoch empty: a silent endless loop
        raise FlagError(f"the training set has {len(dataset)} samples, fewer than one batch "
                         f"(--batch-size {args.batch_size} x {world} processes); lower --batch-size or add images")
    sampler = (DistributedSampler(dataset, world, rank, seed=args.seed) if world > 1
               else RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed)))
    return StatefulDataLoader(dataset, sampler=sampler, **common), dataset


def synthetic_set_from_export(args: argparse.Namespace, length: int) -> DiffuMaskDataset:
    """The mix's synthetic set, its first ``length`` items read from ``--from-export``; a
    :class:`FlagError` when the export holds fewer."""
    try:
        dataset = DiffuMaskDataset.from_export(args.from_export, length=length, transforms=synthetic_transform(args),
                                               cache_size=length, seed=args.seed)
    except ValueError as error:
        raise FlagError(f"--from-export: the mix wants {length} synthetic samples (--synthetic-length, or "
                        f"--synthetic-ratio of the real images): {error}") from None
    say_export(dataset.source, args.seed)
    return dataset


def say_export(source: ExportSource, seed: int) -> None:
    """Print (rank 0) which export the synthetic (or exported pseudo-labelled) samples are read from."""
    if is_main_process():
        order = "" if seed == source.export_seed else f", served in --seed {seed}'s order and augmentation"
        kind = "pseudo-labelled" if "pseudo_labels" in source.metadata else "synthetic"
        print(f"reading {kind} samples from {source}{order}")


def synthetic_transform(args: argparse.Namespace):
    """The synthetic samples' augmentation, as ``--augment`` names it."""
    if args.augment == "full":
        return DiffuMaskAugment(args.crop_size, AugmentConfig(splice_fit=args.splice_fit))
    return SegmentationTransform(args.crop_size, train=args.augment == "basic")


def generation_burst(generation_batch: int, reuse: int, batch_size: int) -> int:
    """Training batches a worker serves from one generation call (at least torch's default 2).

    A stream worker generates a whole batch of images at once, then serves each ``reuse`` times,
    so its output comes in bursts. Holding a burst's worth of batches ready lets the trainer run
    through the next generation call instead of waiting on it whenever the worker keeps up on
    average; with torch's default of 2 the trainer stalls at every generation call.
    """
    return max(2, math.ceil(generation_batch * reuse / batch_size))


def real_training_set(args: argparse.Namespace) -> Dataset:
    """The real train split, untransformed, or ``--real-images`` of it drawn with ``--seed`` (the
    same images for a real-only and a mixed run of one seed)."""
    real = VOCSegmentation(str(args.voc_root), year="2012", image_set="train")
    if args.real_images is None:
        return real
    return Subset(real, chosen_real_images(args, len(real)))


def chosen_real_images(args: argparse.Namespace, total: int) -> list[int]:
    """Indices of the ``--real-images`` train images drawn with ``--seed``, sorted."""
    if args.real_images > total:
        raise FlagError(f"--real-images {args.real_images} but {args.voc_root} has {total} train images")
    return sorted(torch.randperm(total, generator=torch.Generator().manual_seed(args.seed))[: args.real_images].tolist())


def as_is(image, target):
    """No transform: the pairs are transformed where they are served (:class:`SeededServings`)."""
    return image, target


def pseudo_labelled_sets(args: argparse.Namespace, config) -> list[Dataset]:
    """The pseudo-labelled parts of the training set, untransformed: ``--pseudo-label-rest``'s, then
    ``--pseudo-images``'; one labeller (the run's model, ``--pseudo-strength``) reads both."""
    if not args.pseudo_label_rest and args.pseudo_images is None:
        return []
    from ondemand_seg.real import DiffuMaskLabeler

    labeler = DiffuMaskLabeler(labelling_model(args), args.classes, seed=args.seed, device=args.device,
                               labelling={"strength": args.pseudo_strength}, **config.to_dict())
    parts = []
    if args.pseudo_label_rest:
        parts.append(pseudo_labelled_rest(args, config, labeler))
    if args.pseudo_images is not None:
        parts.append(pseudo_labelled_folder(args, config, labeler))
    return parts


def pseudo_labelled_rest(args: argparse.Namespace, config, labeler) -> Dataset:
    """The train images ``--real-images`` leaves out, untransformed, with pseudo-masks the model makes
    from their tags: the classes each image's own mask holds, as image-level labels would give (the
    masks themselves are not used). Images whose mask holds no class are left out. Labelled here in
    batches, once, so DataLoader workers receive them made."""
    from ondemand_seg.real import PseudoLabelledDataset

    real = VOCSegmentation(str(args.voc_root), year="2012", image_set="train")
    chosen = set(chosen_real_images(args, len(real)))
    rest, tags = [], []
    for i in range(len(real)):
        if i in chosen:
            continue
        ids = np.unique(np.asarray(PIL.Image.open(real.masks[i])))
        names = [config.label_space[c] for c in ids.tolist() if 0 < c < len(config.label_space)]
        if names:
            rest.append(i)
            tags.append(names)
    if not rest:
        raise FlagError(f"--pseudo-label-rest: {args.voc_root} has no train image left to pseudo-label (--real-images "
                        f"{args.real_images} of {len(real)} takes every one that holds a class); lower --real-images")
    dataset = PseudoLabelledDataset(Subset(real, rest), tags, labeler, transforms=as_is)
    dataset.label_all()
    say_pseudo_labelled(dataset, f"left-out train images of {args.voc_root} from their tags")
    return dataset


def pseudo_folder(args: argparse.Namespace, label_space: tuple[str, ...]):
    """The ``--pseudo-images`` folder's images and their ``--pseudo-tags`` (``None`` without), checked
    against the label space; a :class:`FlagError` naming the flag and what is wrong."""
    from ondemand_seg.real import ImageFolderImages, read_tags

    try:
        images = ImageFolderImages(args.pseudo_images)
    except (OSError, ValueError) as error:
        raise FlagError(f"--pseudo-images: {error}") from None
    if args.pseudo_tags is None:
        return images, None
    try:
        return images, read_tags(args.pseudo_tags, len(images), images.names, label_space, args.classes)
    except (OSError, ValueError) as error:
        raise FlagError(f"--pseudo-tags: {error}") from None


def pseudo_labelled_folder(args: argparse.Namespace, config, labeler) -> Dataset:
    """The ``--pseudo-images`` images, untransformed, with pseudo-masks from their ``--pseudo-tags``
    (or, untagged, the presence test over ``--classes``), labelled here in batches, once."""
    from ondemand_seg.real import PseudoLabelledDataset

    images, tags = pseudo_folder(args, config.label_space)
    dataset = PseudoLabelledDataset(images, tags, labeler, transforms=as_is)
    try:
        dataset.label_all()
    except ValueError as error:  # an image file PIL cannot decode, named
        raise FlagError(f"--pseudo-images: {error}") from None
    how = "from --pseudo-tags" if tags is not None else "untagged (the presence test picks their classes)"
    say_pseudo_labelled(dataset, f"images of {args.pseudo_images} {how}")
    return dataset


def say_pseudo_labelled(dataset, what: str) -> None:
    """Print (rank 0) how many of ``dataset``'s images its labeller's model gave a pseudo-mask."""
    if is_main_process():
        model = model_name(dataset.labeler.generator.model)
        counts = dataset.counts()
        print(f"pseudo-labelled {counts['accepted']} of {len(dataset)} {what} with {model} "
              f"({counts['generated'] - counts['accepted']} left out by the quality gate and served as ignore)")


def mix_sizes(n_real: int, ratio: float, synthetic_length: int | None) -> tuple[int, int]:
    """(synthetic set length, times the real set is repeated) so that about ``ratio`` of a mixed
    epoch is synthetic. Repeating the real part, rather than weighting a sampler, keeps the plain
    ``RandomSampler``/``DistributedSampler`` whose position the stateful loader resumes exactly."""
    if synthetic_length is None:
        return max(1, round(n_real * ratio / (1 - ratio))), 1
    return synthetic_length, max(1, round(synthetic_length * (1 - ratio) / (ratio * n_real)))


def restore_checkpoint(run: Run, checkpoint: dict, changes: dict[str, tuple[str, str]]) -> None:
    """Continue ``run`` from ``checkpoint``: weights, average, optimizer, schedule, step, epoch and
    the data position (:func:`restore_data_position`), with the changes ``--allow-changed``
    accepted applied."""
    run.bare.load_state_dict(checkpoint["model"])
    if run.ema is not None:
        run.ema.load_state_dict(checkpoint["ema"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    apply_allowed_changes(changes, run.optimizer, run.scheduler, run.args)
    run.step, run.epoch = checkpoint["step"], checkpoint["epoch"]
    moved = restore_data_position(run, checkpoint)
    report_resume(checkpoint, run.args, changes, run.log, run.step, moved)


def restore_data_position(run: Run, checkpoint: dict) -> str | None:
    """Put the data where the checkpoint's run left it; what changed when the number of processes did.

    The checkpoint holds each rank's loader state (its sampler position, each worker's dataset
    state). Under the same ranks and workers this rank loads its own: the batches of an uninterrupted
    run. Under other numbers, a stream's every shard position is gathered from all ranks' states
    and resharded (:meth:`~ondemand_seg.DiffuMaskStream.resharded_state`): the samples drawn and
    not served ``reuse`` times come first, then fresh ones; none is served twice, none skipped. A
    map-style set's position is a per-rank sampler position and per-worker augmentation counts,
    which do not split anew, so it continues from the start of the next epoch (the rest of the
    interrupted one is not served; the real images' augmentation counts restart).
    """
    args = run.args
    loaders = checkpoint["loader"]
    if not isinstance(loaders, list) or not loaders or not all(isinstance(state, dict) for state in loaders):
        raise FlagError(f"--resume {args.resume}: its 'loader' must hold one DataLoader state per rank, got "
                        f"{type(loaders).__name__}{'' if not isinstance(loaders, list) else f' of {len(loaders)}'}")
    old = (len(loaders), int(checkpoint.get("args", {}).get("workers", args.workers)))
    new = (run.world, args.workers)
    if old == new:
        if isinstance(run.train_data, DiffuMaskStream):
            # Each worker's stream state (one without workers): a missing one would start that
            # worker from the beginning, serving its samples again.
            states = find_stream_states(loaders[run.rank])
            try:
                if len(states) != max(args.workers, 1):
                    raise ValueError(f"rank {run.rank}'s loader state holds {len(states)} stream state(s), not one per "
                                     f"worker ({max(args.workers, 1)})")
                for state in states:
                    run.train_data.check_state(state)
            except ValueError as error:
                raise FlagError(f"--resume {args.resume}: {error}") from None
        replay_sampler_epochs(run.loader.sampler, args.seed, run.epoch)
        try:
            run.loader.load_state_dict(loaders[run.rank])
        except (ValueError, KeyError, TypeError, AssertionError) as error:  # torchdata asserts its layout
            raise FlagError(f"--resume {args.resume}: rank {run.rank}'s loader state cannot be loaded: "
                            f"{type(error).__name__}: {error}") from None
        return None
    moved = f"{process_layout(*old)} -> {process_layout(*new)}"
    if isinstance(run.train_data, DiffuMaskStream):
        stream = run.train_data
        try:
            # Into the stream before the DataLoader starts: its workers take it with their copy.
            stream.load_state_dict(stream.resharded_state(find_stream_states(checkpoint["loader"])))
        except ValueError as error:
            raise FlagError(f"--resume {args.resume}: its stream positions cannot be moved to {process_layout(*new)}: "
                            f"{error}") from None
        return f"{moved}; the stream's position resharded"
    run.epoch += 1
    replay_sampler_epochs(run.loader.sampler, args.seed, run.epoch)
    return f"{moved}; the map-style set continues from the start of epoch {run.epoch}"


def process_layout(ranks: int, workers: int) -> str:
    return f"{ranks} rank{'s' if ranks != 1 else ''} x {workers} worker{'s' if workers != 1 else ''}"


def replay_sampler_epochs(sampler, seed: int, epochs: int) -> None:
    """Bring a single process's :class:`RandomSampler` to the start of epoch ``epochs`` of a run from
    ``seed``: its generator draws every epoch's order in turn, so a fresh one would give epoch 0's.
    Each epoch of the run was iterated to its end, which this repeats. (A
    :class:`DistributedSampler` takes its epoch from ``set_epoch``.)"""
    if isinstance(sampler, RandomSampler):
        sampler.generator.manual_seed(seed)
        for _ in range(epochs):
            collections.deque(iter(sampler), maxlen=0)


def apply_allowed_changes(changes: dict, optimizer: torch.optim.Optimizer, scheduler, args: argparse.Namespace) -> None:
    """Put accepted ``--lr``/``--weight-decay`` changes into the optimizer and schedule just loaded
    from the checkpoint, which hold the checkpoint's values, and re-target the schedule to
    ``--steps`` (the other accepted flags act through what is built from ``args``)."""
    for group in optimizer.param_groups:
        if "lr" in changes:
            # The polynomial schedule scales the current rate at each step, so rescaling it once
            # moves the rest of the schedule onto the new base rate.
            group["lr"] *= args.lr / group["initial_lr"]
            group["initial_lr"] = args.lr
        if "weight_decay" in changes:
            group["weight_decay"] = args.weight_decay
    if "lr" in changes:
        scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
    # Compared on the schedule itself rather than on "steps" in changes: a checkpoint with no record
    # of --steps still holds its schedule's length, which would otherwise end the decay early and
    # train on at rate 0.
    if scheduler.total_iters != args.steps:
        retarget_schedule(optimizer, scheduler, args.steps)


def retarget_schedule(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> None:
    """Make the polynomial decay end at ``steps``: from the schedule's step on, the rate is the one
    a run started with ``steps`` has there, ``base_lr * (1 - step / steps) ** LR_POWER``, reaching 0 at
    ``steps``. Lengthening a run raises the rate to that value (a finished run's rate was 0);
    shortening lowers it."""
    scheduler.total_iters = steps
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * (1.0 - min(scheduler.last_epoch, steps) / steps) ** scheduler.power


def report_resume(checkpoint: dict, args: argparse.Namespace, changes: dict, log: MetricLog, step: int,
                  moved: str | None = None) -> None:
    """Say (rank 0) and log where the run resumed, which accepted flags changed (old -> new), how the
    data position moved to another number of processes (``moved``) and which flags the checkpoint
    could not be compared on."""
    changed = "; ".join(f"{flag_name(key)} {old} -> {new}" for key, (old, new) in changes.items())
    unrecorded = unrecorded_flags(checkpoint, args)
    row = {"event": "resume", "step": step, "checkpoint": str(args.resume)}
    if changed:
        row["changed"] = changed
    if moved:
        row["processes"] = moved
    if unrecorded:
        row["not_compared"] = " ".join(unrecorded)
    log.write(row)
    if is_main_process():
        print(f"resumed from {args.resume} at step {step}" + (f"; changed (--allow-changed): {changed}" if changed else "")
              + (f"; processes changed: {moved}" if moved else ""))
        if unrecorded:
            print(f"note: {args.resume} has no record of {', '.join(unrecorded)}: not compared with this run's")


def train(run: Run, resumed_rng: torch.Tensor | None) -> None:
    """Optimizer steps until ``--steps``, each logged; checkpoints every ``--checkpoint-every`` steps
    and at the last, evaluations every ``--eval-every``. ``resumed_rng``: the checkpoint's CPU RNG state."""
    args, loader = run.args, run.loader
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(run.epoch)
    batches = iter(loader)
    if resumed_rng is not None:
        # After iter(loader), which draws a base seed: dropout then continues as in an uninterrupted run.
        torch.set_rng_state(resumed_rng)
    bar = tqdm(total=args.steps, initial=run.step, desc="train", disable=not is_main_process(), dynamic_ncols=True)
    run.model.train()
    # The step at which the last pass ended: a pass ending there again served no batch, and so would every
    # pass after it (a resumed run's first pass may end at once, where the checkpoint's ended).
    last_pass_end = None
    # Closed on the way out too, so that an error is printed after the bar rather than on its line.
    try:
        while run.step < args.steps:
            started = time.perf_counter()
            try:
                images, masks, *flags = next(batches)
            except StopIteration:  # end of an epoch of the map-style mix, or of a pass over an export
                if run.step == last_pass_end:
                    raise empty_pass(run)
                last_pass_end = run.step
                run.log.write({"event": "epoch_end", "step": run.step, "epoch": run.epoch})
                run.epoch += 1
                if isinstance(run.train_data, DiffuMaskStream) and is_main_process():
                    tqdm.write(f"the pass over {run.train_data.source} ended at step {run.step} (each sample served "
                               f"--reuse {args.reuse} times); it is served again, in the same order and augmentation")
                if isinstance(loader.sampler, DistributedSampler):
                    loader.sampler.set_epoch(run.epoch)
                batches = iter(loader)
                continue
            fetched = time.perf_counter()
            loss = train_step(run, images, masks, flags[0] if flags else None)
            done = time.perf_counter()
            run.times.add(started, fetched, done)
            bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{args.batch_size * run.world / (done - started):.1f}",
                            data_wait=f"{run.times.wait_share:.0%}")
            bar.update(1)
            run.log.write({"event": "train", "step": run.step, "loss": loss, "lr": run.scheduler.get_last_lr()[0],
                           "data_wait_s": fetched - started, "train_s": done - fetched})
            if run.step % args.checkpoint_every == 0 or run.step == args.steps:
                save_run_checkpoint(run)
            if args.eval_every and run.step % args.eval_every == 0 and run.step < args.steps:
                run.log.write({"event": "eval", "step": run.step, "miou": score(run).mean_iou()})
    finally:
        bar.close()


def empty_pass(run: Run) -> FlagError:
    """The error for a pass over the training data that served no full batch: training would repeat
    it forever without a step."""
    args, data = run.args, run.train_data
    why = ""
    if isinstance(data, DiffuMaskStream):
        why = (f": {data.source} holds {len(data.source)} samples, each served --reuse {args.reuse} times, split over "
               f"{process_layout(run.world, args.workers)} in whole generation blocks, and each worker leaves out its "
               "last partial batch; lower --batch-size or --workers, or raise --reuse")
    return FlagError(f"a pass over the training data served no full batch of --batch-size {args.batch_size} (it would be "
                     f"repeated forever without a step){why}")


def train_step(run: Run, images: torch.Tensor, masks: torch.Tensor, prunable: torch.Tensor | None) -> float:
    """One step on a batch; the loss, mean over ranks. A non-finite loss skips the weight update
    (:func:`skip_nonfinite_step`). ``prunable``: which samples' labels noise learning may prune."""
    images, masks = images.to(run.device, non_blocking=True), masks.to(run.device, non_blocking=True)
    run.recent.append(images)
    logits = run.model(images)["out"]
    if run.noise is not None:
        masks = run.noise(run.step, logits, masks, prunable=prunable)
    loss = run.criterion(logits, masks)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.step += 1
    # Read before the optimizer step, which must not apply a non-finite loss's gradients; the mean
    # over ranks is non-finite when any rank's loss is, so every rank decides alike. .item() waits
    # for the device: the forward and backward are timed as training, not left to show up as the
    # next step's data wait (the optimizer step's device work is timed with it).
    loss_value = all_reduce_mean(loss.item(), run.device)
    if math.isfinite(loss_value):
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update_parameters(run.bare)
        run.nonfinite_in_a_row = 0
    else:
        run.nonfinite_in_a_row += 1
        skip_nonfinite_step(loss_value, run.step, run.nonfinite_in_a_row, run.args.max_nonfinite_steps, run.log,
                            run.last_saved)
    run.scheduler.step()  # on skipped steps too: the schedule follows the batches served
    return loss_value


def skip_nonfinite_step(loss: float, step: int, in_a_row: int, patience: int, log: MetricLog,
                        last_saved: Path | None) -> None:
    """Log a step whose loss (mean over ranks) is not finite, which is skipped without updating the
    weights; stop the run once more than ``patience`` such steps came in a row."""
    log.write({"event": "nonfinite_loss", "step": step, "loss": loss, "in_a_row": in_a_row})
    if in_a_row > patience:
        raise diverged(f"the loss is {loss} at step {step} ({in_a_row} non-finite in a row; "
                       f"--max-nonfinite-steps {patience})", last_saved)
    if is_main_process():
        tqdm.write(f"warning: the loss is {loss} at step {step}; the step is skipped, the weights not updated "
                   f"({in_a_row} in a row; --max-nonfinite-steps {patience})", file=sys.stderr)


def diverged(reason: str, last_saved: Path | None) -> SystemExit:
    """The exit (status 1) that stops a diverging run on every rank; rank 0's carries the message."""
    message = f"error: {reason}; the run stopped, keeping the last good checkpoint ({last_saved or 'none written'})"
    return SystemExit(message if is_main_process() else 1)


def save_run_checkpoint(run: Run) -> None:
    """Write ``checkpoint_<step>.pt`` and ``checkpoint.pt`` (rank 0), after checking on every rank
    that the weights are finite. A failed periodic save is a warning and a ``checkpoint_failed``
    row; a failed last save stops the run."""
    args = run.args
    check_finite_weights(run.bare, run.ema, run.step, run.device, run.last_saved)
    states = all_gather_object(run.loader.state_dict())  # each rank's stream shard differs
    if not is_main_process():
        return
    state = {"model": run.bare.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "step": run.step, "epoch": run.epoch, "loader": states,
             "rng": torch.get_rng_state(), "args": saved_args(args)}
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    try:
        for path in (args.output_dir / f"checkpoint_{run.step:06d}.pt", args.output_dir / "checkpoint.pt"):
            save_checkpoint(path, state)
            run.last_saved = path
    except CheckpointError as error:
        # A failed periodic save (disk full, quota) leaves the previous good checkpoint as it was:
        # training on loses nothing saved, while stopping would lose every step since it for
        # certain, and the next save retries, succeeding once space is freed. The last save has
        # nothing after it to retry, so its failure stops the run.
        latest = f"latest good checkpoint: {run.last_saved or 'none'}"
        if run.step == args.steps:
            raise SystemExit(f"error: {error} ({latest})") from None
        tqdm.write(f"warning: {error}; training continues and the next checkpoint retries ({latest})", file=sys.stderr)
        run.log.write({"event": "checkpoint_failed", "step": run.step, "error": str(error)})


def check_finite_weights(model: nn.Module, ema: AveragedModel | None, step: int, device: torch.device,
                         last_saved: Path | None) -> None:
    """Stop the run, on every rank alike, when the weights about to be checkpointed (trained or
    averaged, BatchNorm statistics included) hold a NaN or an infinity: saved, they would replace
    the last good checkpoint."""
    bad = nonfinite_tensors(model.state_dict())
    if ema is not None:
        bad += [f"averaged {name}" for name in nonfinite_tensors(ema.state_dict())]
    if all_reduce_mean(float(bool(bad)), device) > 0:
        named = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") if bad else "on another rank"
        raise diverged(f"the weights are not finite at step {step} ({named}); no checkpoint was written for it",
                       last_saved)


def nonfinite_tensors(state: dict) -> list[str]:
    """The names of ``state``'s floating-point tensors that hold a NaN or an infinity."""
    return [name for name, value in state.items()
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def score(run: Run) -> ConfusionMatrix:
    """The evaluated weights' confusion matrix on the val split, BatchNorm statistics re-estimated
    for them first."""
    recalibrate_batchnorm(run.evaluated, run.recent)
    return evaluate(run.evaluated, run.args, len(run.label_space), run.device)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> None:
    """Re-estimate BatchNorm running statistics as exact averages over recent training batches.

    A randomly initialised MobileNetV3 moves faster than BatchNorm's running averages follow,
    and evaluating with the lagging averages can predict all background. torchvision has no
    precise-BN helper, hence these lines.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for images in batches:
        model(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


@torch.inference_mode()
def evaluate(model: nn.Module, args, num_classes: int, device: torch.device) -> ConfusionMatrix:
    """mIoU on the val split of ``--eval-root`` (ignore 255), summed over ranks."""
    val = VOCSegmentation(str(args.eval_root), year="2012", image_set="val",
                          transforms=SegmentationTransform(args.crop_size, train=False))
    indices = list(range(len(val)))[: args.eval_limit]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    confusion = ConfusionMatrix(num_classes)
    model.eval()
    for start in range(rank * args.batch_size, len(indices), world * args.batch_size):
        items = [val[i] for i in indices[start : start + args.batch_size]]
        images = torch.stack([x for x, _ in items]).to(device)
        targets = torch.stack([y for _, y in items])
        confusion.update(targets, model(images)["out"].argmax(1).cpu())
    model.train()
    confusion.reduce_from_all_processes()
    return confusion


def final_evaluation(run: Run) -> dict:
    """Evaluate the finished run; its summary, logged as the ``final`` row and printed (rank 0)."""
    args, label_space, times = run.args, run.label_space, run.times
    confusion = score(run)
    per_class = {name: round(float(v), 4) for name, v in zip(label_space, confusion.iou())}
    summary = {"event": "final", "step": run.step, "miou": confusion.mean_iou(), "per_class_iou": per_class,
               "pixel_accuracy": confusion.pixel_accuracy(), "data_wait_fraction": times.wait_share,
               "train_seconds": times.trained, "data_wait_seconds": times.waited, "startup_seconds": times.startup,
               "torch_threads": torch.get_num_threads(), "ema_decay": args.ema_decay}
    if isinstance(run.train_data, DiffuMaskStream) and is_main_process():
        summary["generator_stats"] = run.train_data.stats()
    if run.noise is not None:
        counts = run.noise.counts
        summary["noise_filter"] = {**counts, "per_class": {label_space[c]: n for c, n in counts["per_class"].items()}}
    run.log.write(summary)
    if is_main_process():
        print(f"mIoU {summary['miou']:.3f} on {args.eval_root} val; per class {per_class}; "
              f"data wait {summary['data_wait_fraction']:.0%} of the loop")
    return summary


def cli(argv: list[str] | None = None) -> dict:
    """What ``python train_deeplab.py ARGS`` runs: :func:`main` on the parsed flags, a
    :class:`FlagError` printed as argparse prints its own (one line, exit status 2)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        return main(args)
    except FlagError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except MetricLogError as error:
        raise SystemExit(f"error: {error}; checkpoints written so far are kept") from None


if __name__ == "__main__":
    cli()
