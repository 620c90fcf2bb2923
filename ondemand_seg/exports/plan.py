"""What an export folder holds besides the data: the plan (what decides the files' content), written
before anything else, one stats file per finished shard (which also marks it finished), and the
final metadata summed from them."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.fingerprint import fingerprint_differences, sequence_fingerprint
from ..settings.files import read_json, read_json_object
from ..settings.label_spaces import IGNORE_INDEX
from .files import is_temporary, write_json

METADATA = "metadata.json"
# Each shard is a stats file (and a tar or parquet file): a million of them is already more than
# a file system lists comfortably, and listing the shards must not take the memory of the run.
MAX_SHARDS = 1_000_000
STATS = "shard-stats"


class ExportError(ValueError):
    """An export folder that cannot take this export: a file, a folder holding something else, an
    export made with other settings (the message names each differing field), or a broken
    ``metadata.json``. Raised before any model loads; a usage error on the command line."""


@dataclass(frozen=True)
class Shard:
    """Shard ``number`` of an export: the samples ``start`` to ``stop - 1``."""

    number: int
    start: int
    stop: int

    @property
    def indices(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True)
class ExportOptions:
    """The checked arguments of an export (see :func:`~ondemand_seg.exports.run.export`)."""

    format: str
    n: int
    start: int
    shard_size: int
    image_format: str
    workers: int

    def __post_init__(self) -> None:
        count = -(-self.n // self.shard_size)
        if count > MAX_SHARDS:
            raise ValueError(f"n={self.n} in shards of shard_size={self.shard_size} makes {count:,} shards, more than "
                             f"an export keeps track of ({MAX_SHARDS:,}); raise shard_size")

    def shards(self) -> list[Shard]:
        """The export's shards: ``shard_size`` contiguous indices each, the last one shorter."""
        stop = self.start + self.n
        return [Shard(number, first, min(first + self.shard_size, stop))
                for number, first in enumerate(range(self.start, stop, self.shard_size))]


def export_plan(generator: Any, options: ExportOptions) -> dict:
    """Everything that decides the files of an export, in plain data: the generator's
    :func:`~ondemand_seg.data.fingerprint.sequence_fingerprint` (model weights, settings, seed,
    classes) and the export's range, shard size, format and image encoding."""
    # The generation batch stays in: it decides an image's last bit (float rounding of batched kernels).
    plan = sequence_fingerprint(generator.model, generator.config, seed=generator.seed,
                                classes=list(generator.classes))
    return {"format": options.format, "start": options.start, "n": options.n, "shard_size": options.shard_size,
            "image_format": options.image_format, **plan}


class ExportFolder:
    """The export folder ``root``: its ``metadata.json`` and the per-shard stats files."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.metadata_path = self.root / METADATA
        self.stats = self.root / STATS

    def stats_path(self, shard: Shard) -> Path:
        return self.stats / f"{shard.number:06d}.json"

    def is_done(self, shard: Shard) -> bool:
        """Whether ``shard`` is finished: its stats file is written after all its data files."""
        return self.stats_path(shard).is_file()

    def write_stats(self, shard: Shard, stats: dict) -> None:
        self.stats.mkdir(exist_ok=True)
        write_json(self.stats_path(shard), {"shard": shard.number, "start": shard.start, "stop": shard.stop, **stats})

    def read_metadata(self) -> dict | None:
        """The metadata an earlier export wrote, ``None`` when there is none.

        Raises:
            ExportError: it is not JSON or has no plan.
        """
        if not self.metadata_path.exists() and not self.metadata_path.is_symlink():
            return None
        try:  # a regular file only: opening a FIFO would block
            metadata = read_json(self.metadata_path)
        except (OSError, ValueError) as error:
            raise ExportError(f"{error}; remove the folder or export elsewhere") from None
        if not isinstance(metadata, dict) or not isinstance(metadata.get("plan"), dict):
            raise ExportError(f"{self.metadata_path} holds no export plan: it was not written by an export")
        return metadata

    def prepare(self, plan: dict, overwrite: bool, owned: dict[str, Sequence[str]]) -> None:
        """Make ``root`` ready for the export ``plan``: a new or empty folder gets the plan as its
        metadata, before any data; a folder with the same plan is resumed as it is.

        With ``overwrite``, an earlier export in ``root`` (of any plan) is removed first: its
        metadata, stats and the files its format writes (``owned``: format -> glob patterns under
        ``root``). Files an export did not write are never removed.

        Raises:
            ExportError: ``root`` is a file; it holds files but no export; it holds an export made
                with another plan (naming each differing field) and ``overwrite`` is False.
        """
        if self.root.exists() and not self.root.is_dir():
            raise ExportError(f"out {str(self.root)!r} is a file; give a folder (new or empty, or an earlier export)")
        metadata = self.read_metadata()
        if metadata is None:
            if self.root.is_dir() and any(not is_temporary(path.name) for path in self.root.iterdir()):
                raise ExportError(f"out {str(self.root)!r} is not empty and holds no export ({METADATA} is missing); "
                                  "export into a new or empty folder (overwrite removes only what an export wrote)")
        elif overwrite:
            self.remove(metadata["plan"].get("format"), owned)
        else:
            changes = fingerprint_differences(metadata["plan"], plan)
            if changes:
                raise ExportError(f"{self.root} holds an export made with other settings: {'; '.join(changes)} "
                                  "(there -> now); export into another folder, or overwrite it (--overwrite)")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.metadata_path, {"complete": False, "plan": plan})

    def check_plan(self, plan: dict) -> None:
        """Refuse to write shards under a plan other than the one in ``metadata.json`` (another
        rank's arguments differ), naming the differing fields."""
        metadata = self.read_metadata()
        if metadata is None:
            raise ExportError(f"{self.metadata_path} is missing: rank 0 prepares the folder before the others write")
        changes = fingerprint_differences(metadata["plan"], plan)
        if changes:
            raise ExportError(f"this rank's export settings differ from those in {self.metadata_path}: "
                              f"{'; '.join(changes)} (there -> here); give every rank the same arguments")

    def remove(self, format: str | None, owned: dict[str, Sequence[str]]) -> None:
        """Remove an export: the files of its ``format``, its stats and its metadata."""
        if format not in owned:
            raise ExportError(f"{self.metadata_path} names format {format!r}, which this version does not write; "
                              f"remove {self.root} by hand")
        for pattern in owned[format]:
            for path in self.root.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        shutil.rmtree(self.stats, ignore_errors=True)
        for path in self.root.glob(f".{METADATA}.*.tmp"):
            path.unlink()
        self.metadata_path.unlink()

    def summary(self, shards: Sequence[Shard], label_space: Sequence[str]) -> dict:
        """Quality-gate counts and pixel counts summed over the shards' stats files, and each class's
        share of all pixels (``"ignore"``: label 255)."""
        gate: dict[str, int] = {}
        pixels = dict.fromkeys([*label_space, "ignore"], 0)
        for shard in shards:
            path = self.stats_path(shard)
            try:
                stats = read_json_object(path)
                for key, value in stats["gate"].items():
                    gate[key] = gate.get(key, 0) + int(value)
                for key, value in stats["pixels"].items():
                    pixels[key] += int(value)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise ExportError(f"{path} is not a shard's stats file ({type(error).__name__}: {error}); remove it "
                                  f"and run the export again to write shard {shard.number} anew") from None
        total = max(1, sum(pixels.values()))
        return {"gate": gate, "pixel_counts": pixels,
                "pixel_share": {name: round(count / total, 6) for name, count in pixels.items()}}


def pixel_counts(mask: np.ndarray, label_space: Sequence[str]) -> np.ndarray:
    """``[len(label_space) + 1]`` int64: pixels of each label id in ``mask``, then ignore (255)."""
    counts = np.bincount(mask.ravel(), minlength=256)
    return np.append(counts[:len(label_space)], counts[IGNORE_INDEX])
