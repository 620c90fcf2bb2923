"""The trainer's optimizer step with and without skipping dilated taps that read padding only.

    python benchmarks/train_step.py --json benchmarks/results/train_step_cpu.json

DeepLabV3 (random init, AdamW, cross-entropy, ToyWorld's 6 labels) at the crop size, per backbone
and crop size:

- ``cropped``: the trainer's own step, whose segmenter skips the taps that read padding only
  (``train/dilated_convs.py``, the trainer's default): ``train/train_deeplab.py --real-only`` runs
  the warm-up steps and ``--rounds`` more, and its per-step ``train_s`` (forward, backward,
  optimizer step; data loading excluded) is read from its ``metrics.jsonl``;
- ``full``: torchvision's model as is (``convs_cropped`` counts its dilated convolutions, the
  ones the trainer crops), stepped here the same way on random images and labels.

Seconds per step are medians over the steps after the warm-up. The two forms run one after the
other rather than step by step in turn, so load on the machine hits them at different times: run
it on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from common import run_rows, write_json
from torch import nn
from torchvision.models import segmentation

WARM_UP = 2  # steps before the timed ones: allocator, kernel choice, lazy initialisation
CLASSES = 6  # ToyWorld's labels, background included: the trainer's head on its default data
# The trainer's --backbone choices are torchvision's DeepLabV3 builders.
BACKBONES = sorted(name.removeprefix("deeplabv3_") for name in dir(segmentation) if name.startswith("deeplabv3_"))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="training step time with and without cropped dilated convolutions")
    p.add_argument("--backbones", nargs="+", default=["mobilenet_v3_large"], choices=BACKBONES)
    p.add_argument("--crop-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=10, help="timed steps per form, after the warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the main job's trainer has 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work-dir", type=Path, default=Path("out/train_step"),
                   help="the trainer's runs and the ToyWorld data it trains on")
    p.add_argument("--json", type=Path, default=None)
    return p


def full_step_seconds(backbone: str, size: int, batch_size: int, rounds: int, device: torch.device) -> tuple[list[float], int]:
    """Seconds of each timed optimizer step of torchvision's uncropped DeepLabV3 on random data, and
    the number of dilated convolutions it has."""
    torch.manual_seed(0)
    model = getattr(segmentation, f"deeplabv3_{backbone}")(weights=None, weights_backbone=None, num_classes=CLASSES,
                                                           aux_loss=False).to(device).train()
    dilated = sum(type(m) is nn.Conv2d and max(m.dilation) > 1 for m in model.modules())
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(0, CLASSES, (batch_size, size, size), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    times = []
    for _ in range(WARM_UP + rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = criterion(model(images)["out"], labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times[WARM_UP:], dilated


def trainer_step_seconds(args, backbone: str, size: int) -> list[float]:
    """Seconds of each timed step of the trainer (cropped dilated convolutions), from its metrics."""
    flags = ["--real-only", "--backbone", backbone, "--crop-size", str(size), "--batch-size", str(args.batch_size),
             "--steps", str(WARM_UP + args.rounds), "--threads", str(args.threads), "--device", args.device,
             "--workers", "0", "--eval-limit", "1", "--output-dir", str(args.work_dir / f"{backbone}_{size}"),
             "--data-dir", str(args.work_dir / "toyworld")]
    steps = [row["train_s"] for row in run_rows(flags) if row.get("event") == "train"]
    return steps[WARM_UP:]


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for backbone in args.backbones:
        for size in args.crop_sizes:
            full, dilated = full_step_seconds(backbone, size, args.batch_size, args.rounds, device)
            cropped = trainer_step_seconds(args, backbone, size)
            row = {"backbone": backbone, "crop_size": size, "batch_size": args.batch_size, "convs_cropped": dilated,
                   "full_s_per_step": statistics.median(full), "cropped_s_per_step": statistics.median(cropped)}
            row["speedup"] = row["full_s_per_step"] / row["cropped_s_per_step"]
            rows.append(row)
            print(f"{backbone} {size} px: full {row['full_s_per_step']:.3f} s/step, cropped "
                  f"{row['cropped_s_per_step']:.3f} s/step ({row['speedup']:.2f}x, {dilated} convs)", flush=True)
    if args.json is not None:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        write_json(args.json, {"config": config, "torch": torch.__version__,
                               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                               "cpus": os.cpu_count(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
