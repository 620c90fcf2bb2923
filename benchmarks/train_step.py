"""The trainer's optimizer step with and without skipping dilated taps that read padding only.

    python benchmarks/train_step.py --json benchmarks/results/train_step_cpu.json

DeepLabV3 as train_deeplab.py builds it (random init, AdamW), one batch of random images and
labels at the crop size; ``full`` runs torchvision's model as is, ``cropped`` after
``train/dilated_convs.crop_dilated_convs`` (the trainer's default). The two are timed step by step
in turn (medians over rounds after a warm-up), so load on the machine hits both alike.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from common import write_json  # noqa: E402
from dilated_convs import crop_dilated_convs  # noqa: E402
from train_deeplab import BACKBONES  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="training step time with and without cropped dilated convolutions")
    p.add_argument("--backbones", nargs="+", default=["mobilenet_v3_large"], choices=sorted(BACKBONES))
    p.add_argument("--crop-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the main job's trainer has 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    return p


def step_timer(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(ignore_index=255)

    def step() -> float:
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = criterion(model(images)["out"], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return step


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for backbone in args.backbones:
        for size in args.crop_sizes:
            torch.manual_seed(0)
            full = BACKBONES[backbone](weights=None, weights_backbone=None, num_classes=6, aux_loss=False).to(device)
            cropped = copy.deepcopy(full)
            replaced = crop_dilated_convs(cropped)
            images = torch.randn(args.batch_size, 3, size, size, device=device)
            labels = torch.randint(0, 6, (args.batch_size, size, size), device=device)
            timers = {"full": step_timer(full.train(), images, labels), "cropped": step_timer(cropped.train(), images, labels)}
            times = {name: [] for name in timers}
            for name, step in timers.items():  # warm-up
                step(), step()
            for _ in range(args.rounds):
                for name, step in timers.items():
                    times[name].append(step())
            row = {"backbone": backbone, "crop_size": size, "batch_size": args.batch_size, "convs_cropped": replaced,
                   **{f"{name}_s_per_step": statistics.median(t) for name, t in times.items()}}
            row["speedup"] = row["full_s_per_step"] / row["cropped_s_per_step"]
            rows.append(row)
            print(f"{backbone} {size} px: full {row['full_s_per_step']:.3f} s/step, cropped "
                  f"{row['cropped_s_per_step']:.3f} s/step ({row['speedup']:.2f}x, {replaced} convs)", flush=True)
    if args.json is not None:
        write_json(args.json, {"config": {**vars(args), "json": str(args.json)}, "torch": torch.__version__,
                               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                               "cpus": os.cpu_count(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
