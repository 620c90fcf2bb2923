"""Distributed set-up, checkpoints and metric logs for train_deeplab.py (torchvision-reference style)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, int]:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPU); ``(rank, world, local_rank)``.

    Without torchrun's environment it is a single process: ``(0, 1, 0)``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank, world, local_rank


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a float over ranks (the value itself when single-process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically, so a run killed mid-save keeps its previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """Our own checkpoints: tensors and plain containers only, loaded without unpickling code."""
    return torch.load(path, map_location="cpu", weights_only=True)


class MetricLog:
    """Appends one row per event to ``metrics.jsonl`` and ``metrics.csv`` (rank 0 only)."""

    def __init__(self, directory: Path) -> None:
        self.jsonl = directory / "metrics.jsonl"
        self.csv = directory / "metrics.csv"

    def write(self, row: dict) -> None:
        if not is_main_process():
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        new = not self.csv.exists()
        with self.csv.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["event", "step", "key", "value"])
            for key, value in row.items():
                if key not in ("event", "step"):
                    writer.writerow([row.get("event"), row.get("step"), key, value])
