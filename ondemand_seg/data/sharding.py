"""How work splits across ``torch.distributed`` ranks and DataLoader workers: each process is one
shard of ``world_size x num_workers``, named by small functions in webdataset's style."""
from __future__ import annotations

import torch


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
