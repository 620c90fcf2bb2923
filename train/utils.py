"""Distributed set-up, checkpoints and metric logs for train_deeplab.py (torchvision-reference style)."""
from __future__ import annotations

import csv
import errno
import json
import os
import pickle
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


def all_gather_object(obj) -> list:
    """``obj`` from every rank, in rank order, on all ranks (``[obj]`` when single-process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and the cause."""


class MetricLogError(RuntimeError):
    """The metrics log cannot be appended to; the message names the file and the cause."""


# What save_checkpoint writes; a file without them is some other kind of file.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "epoch", "loader", "rng")


class _KeepWriteError:
    """The file torch.save writes through, keeping the OSError of a failed write: torch's zip writer
    replaces it with "unexpected pos", dropping the cause (ENOSPC, EDQUOT, EIO) a user needs."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically and durably, or raise :class:`CheckpointError` naming
    ``path`` and the cause (disk full, no permission, ...).

    The bytes go to ``<path>.tmp``, are fsynced, and only then renamed over ``path``; the folder is
    fsynced after the rename. A save that fails or is interrupted removes its partial file and leaves
    the previous checkpoint at ``path`` as it was; a power cut cannot leave a renamed, empty file.
    """
    tmp = path.with_name(path.name + ".tmp")
    sink = None
    try:
        with open(tmp, "wb") as file:
            sink = _KeepWriteError(file)
            torch.save(state, sink)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        cause = sink.error if sink is not None and sink.error is not None else error
        leftover = ""
        try:
            tmp.unlink(missing_ok=True)
        except OSError as unlink_error:
            leftover = f"; the partial file {tmp} could not be removed either: {unlink_error}"
        if not isinstance(cause, OSError):
            raise  # interrupted, or a state torch cannot save: not the disk's doing (a .tmp left is overwritten next save)
        raise CheckpointError(f"could not write checkpoint {path}: {cause}{leftover}") from error
    try:
        _fsync_directory(path.parent)
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} was written but its folder could not be synced: {error}") from error


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable. Windows cannot open a folder, and some filesystems
    (network and FUSE mounts) cannot sync one: there the rename is as durable as the OS makes it."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint :func:`save_checkpoint` wrote, loaded without unpickling code (tensors and plain
    containers only), or :class:`CheckpointError` naming ``path``: missing, unreadable, truncated,
    corrupt, or some other kind of file."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    except Exception as error:  # foreign or damaged bytes fail as RuntimeError, EOFError, KeyError, UnpicklingError, ...
        if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
            raise CheckpointError(f"checkpoint {path} holds Python objects besides tensors and containers, which "
                                  "train_deeplab.py never saves; it is not loaded (weights_only=True)") from error
        detail = type(error).__name__ + (f": {str(error).strip().splitlines()[0]}" if str(error).strip() else "")
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not a PyTorch file ({detail})") from error
    missing = [key for key in CHECKPOINT_KEYS if key not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(f"{path} is not a train_deeplab.py checkpoint: it lacks {', '.join(missing)}")
    check_checkpoint_fields(state, path)
    return state


def check_checkpoint_fields(state: dict, path: Path) -> None:
    """A :class:`CheckpointError` naming ``path`` and the field for what :func:`save_checkpoint`
    never writes: a ``step`` or ``epoch`` that is not an int >= 0, weights that are not named
    tensors or not finite (resuming would continue from NaN), ``args`` that are not flag names
    mapped to strings."""
    for key in ("step", "epoch"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"checkpoint {path}: {key} must be an int >= 0, got {value!r}; it was not written "
                                  "by train_deeplab.py")
    for key in ("model", "ema"):
        weights = state.get(key)
        if weights is None and key == "ema":
            continue
        if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in weights.items()):
            raise CheckpointError(f"checkpoint {path}: {key} must map parameter names to tensors")
        # A meta tensor holds no values (torch.save writes it, torch.load gives it back): nothing to resume from.
        empty = next((name for name, tensor in weights.items() if tensor.is_meta), None)
        if empty is not None:
            raise CheckpointError(f"checkpoint {path}: {key} {empty!r} is a meta tensor, which holds no values; it was "
                                  "not written by train_deeplab.py")
        # Complex too: loading one into a real parameter keeps its real part, NaN included.
        broken = next((name for name, tensor in weights.items() if (tensor.is_floating_point() or tensor.is_complex())
                       and not torch.isfinite(tensor).all()), None)
        if broken is not None:
            raise CheckpointError(f"checkpoint {path} holds non-finite weights ({key} {broken!r}); resume from an "
                                  "earlier checkpoint")
    args = state.get("args", {})
    if not isinstance(args, dict):
        raise CheckpointError(f"checkpoint {path}: args must map flag names to the strings train_deeplab.py records, "
                              f"got a {type(args).__name__}")
    bad = next(((k, v) for k, v in args.items() if not isinstance(k, str) or not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path}: args must map flag names to the strings train_deeplab.py records, "
                              f"got {bad[0]!r}: {bad[1]!r}")


def output_dir_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot hold a run's files (it is a file, is under a file, or is not
    writable), or None when it exists or can be created."""
    existing = next(folder for folder in (directory, *directory.parents) if folder.exists())
    if not existing.is_dir():
        return "is a file" if existing == directory else f"is under {existing}, which is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "is not writable" if existing == directory else f"cannot be created: {existing} is not writable"
    return None


class MetricLog:
    """Appends one row per event to ``metrics.jsonl`` and ``metrics.csv`` (rank 0 only)."""

    def __init__(self, directory: Path) -> None:
        self.jsonl = directory / "metrics.jsonl"
        self.csv = directory / "metrics.csv"

    def write(self, row: dict) -> None:
        """Append ``row``; a full disk or unwritable log is :class:`MetricLogError` naming the file (the
        run's figures are its result, so losing rows silently is worse than stopping)."""
        if not is_main_process():
            return
        path = self.jsonl
        try:
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            path = self.csv
            new = not path.exists()
            with path.open("a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["event", "step", "key", "value"])
                for key, value in row.items():
                    if key not in ("event", "step"):
                        writer.writerow([row.get("event"), row.get("step"), key, value])
        except OSError as error:
            raise MetricLogError(f"could not append to metrics log {path}: {error.strerror or error}") from error
