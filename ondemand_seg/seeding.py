"""Every seed in the library comes from here, and how work splits across ranks and workers.

A sample is named by its global index and a retry counter (a rejected sample is redrawn with
the next attempt); its seed depends on (base seed, index, attempt) alone, so sample ``i`` is the
same whatever the batch, worker or rank that draws it.
"""
from __future__ import annotations

import numpy as np
import torch


def derive_seed(base_seed: int, *keys: int) -> int:
    """A 63-bit seed from ``base_seed`` and integer ``keys`` (NumPy's SeedSequence hashing, so
    nearby keys give unrelated seeds)."""
    words = np.random.SeedSequence(entropy=int(base_seed), spawn_key=tuple(int(k) for k in keys)).generate_state(2)
    return int((int(words[0]) << 32 | int(words[1])) & (2**63 - 1))


def split_by_node() -> tuple[int, int]:
    """``(rank, world_size)`` of ``torch.distributed``, or ``(0, 1)`` when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def split_by_worker() -> tuple[int, int]:
    """``(worker_id, num_workers)`` of the current DataLoader worker, ``(0, 1)`` in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def shard() -> tuple[int, int]:
    """This process's shard and the shard count over all ranks and their workers."""
    rank, world = split_by_node()
    worker, workers = split_by_worker()
    return rank * workers + worker, world * workers
