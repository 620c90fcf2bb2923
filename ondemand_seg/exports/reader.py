"""An export read back as a sample source: :class:`ExportSource` gives the samples an export folder
holds, by index, as :meth:`DiffuMaskGenerator.samples <ondemand_seg.DiffuMaskGenerator.samples>`
gives generated ones, so that :meth:`DiffuMaskStream.from_export <ondemand_seg.DiffuMaskStream.from_export>`
and :meth:`DiffuMaskDataset.from_export <ondemand_seg.DiffuMaskDataset.from_export>` serve them on
the live datasets' schedule, with their augmentation seeds. Reading loads no model.

One reader per format, each random access by sample index: a VOC tree's files by name (prompts and
attempts from its sample records), a tar shard's members through an index of its headers (stdlib
``tarfile``, so no ``webdataset`` is needed to read), a parquet shard's row group (``pyarrow``).
"""
from __future__ import annotations

import bisect
import io
import json
import operator
import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image

from ..generation.generator import ForkSafeRLock, RawSample
from ..settings.config import SECTIONS, DiffuMaskConfig, from_dict
from ..settings.validation import check_int
from ..settings.vocabulary import vocabulary_from
from .plan import METADATA, ExportError, ExportFolder
from .files import parquet_name, tar_name
from .voc import sample_id

# Plan fields that say how samples are stored, not which: the same samples in another format or
# sharding are the same data source (an image's bytes depend on its encoding, which stays).
STORAGE_FIELDS = ("format", "shard_size")
# Open shards (tar files, parquet files, record lists) kept per process: a stream shard reads its
# generation blocks in order, so it is inside one or two export shards at a time.
OPEN_SHARDS = 4
_REQUIRED = {"format": str, "samples": int, "start": int, "shards": int, "shard_size": int, "image_format": str,
             "seed": int, "classes": list, "config": dict, "label_space": list, "plan": dict}


class ExportSource:
    """The samples of an export folder (any format ``ondemand_seg.export`` writes), by index.

    A drop-in for the generator where the datasets draw from it: :meth:`samples` returns
    :class:`~ondemand_seg.generation.generator.RawSample` s with the recorded ``index``, ``attempt``
    and prompt; ``seed``, ``config``, ``generator_config``, ``image_size``, ``label_space``,
    ``classes`` and :meth:`stats` are the export's. Sample ``i`` holds the generator's sample ``i``:
    its mask's ids exactly and, for an export with ``image_format="png"``, its image's pixels (JPEG
    ones are decoded JPEG).

    Args:
        export: a complete export folder.
        seed: base seed of serving (the stream's order, every serving's augmentation); ``None``:
            the export's generation seed, so that the datasets serve what the live ones of that
            seed serve. Another seed serves the same samples in another order and augmentation.

    Attributes:
        indices: the sample indices the export holds, ``range(start, start + samples)``.
        fingerprint: the export's identity (its plan but for the format and shard size): what a
            stream's resume state compares.
        metadata: the export's ``metadata.json``.

    Raises:
        ExportError: the folder holds no export, an unfinished one, or a ``metadata.json`` this
            version cannot read, naming what is wrong.
    """

    def __init__(self, export: str | os.PathLike, seed: int | None = None) -> None:
        if not isinstance(export, (str, os.PathLike)):
            raise TypeError(f"export must be an export folder's path, got {export!r} ({type(export).__name__})")
        self.root = Path(export)
        if not self.root.is_dir():
            raise ExportError(f"export {str(export)!r} is not a folder")
        self.metadata = metadata = read_complete_metadata(self.root)
        self.format = metadata["format"]
        if self.format not in READERS:
            raise ExportError(f"{self.root / METADATA} names format {self.format!r}, which this version does not read "
                              f"({', '.join(READERS)})")
        self.indices = range(metadata["start"], metadata["start"] + metadata["samples"])
        self.export_seed = metadata["seed"]
        self.seed = self.export_seed if seed is None else check_int("seed", seed, minimum=0)
        self.classes = tuple(metadata["classes"])
        self.model = metadata.get("model", "export")
        try:
            self.config = export_config(metadata["config"])
        except (TypeError, ValueError) as error:
            raise ExportError(f"{self.root / METADATA} holds settings this version cannot read: {error}") from None
        self.fingerprint = {key: value for key, value in metadata["plan"].items() if key not in STORAGE_FIELDS}
        self.lock = ForkSafeRLock()
        self._reader = READERS[self.format](self.root, metadata)

    @property
    def label_space(self) -> tuple[str, ...]:
        return self.config.label_space

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.image_size

    @property
    def generator_config(self):
        return self.config.generator

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return (f"ExportSource({str(self.root)!r}: {self.format}, samples {self.indices.start} to "
                f"{self.indices.stop - 1}, seed {self.export_seed})")

    def stats(self) -> dict[str, int]:
        """The quality-gate counts of the export's generation (its metadata's ``gate``): reading
        generates and rejects nothing."""
        return dict(self.metadata.get("gate", {}))

    counts = stats

    def samples(self, indices: Sequence[int]) -> list[RawSample]:
        """The export's samples ``indices``, in order, each with its recorded index, attempt and prompt.

        Raises:
            IndexError: an index the export does not hold, naming its range.
            ExportError: a file is missing or does not hold what the metadata says.
        """
        if isinstance(indices, (str, bytes)) or not isinstance(indices, (Sequence, range)):
            raise TypeError(f"indices must be a sequence of ints, got {indices!r} ({type(indices).__name__})")
        wanted = [operator.index(i) for i in indices]
        for index in wanted:
            if index not in self.indices:
                raise IndexError(f"sample {index} is not in export {self.root}, which holds samples "
                                 f"{self.indices.start} to {self.indices.stop - 1} (seed {self.export_seed}): export "
                                 "more samples, or serve fewer")
        with self.lock:  # open files and their caches are shared by the threads of one process
            return [self._reader.read(index, self._shard(index)) for index in wanted]

    def _shard(self, index: int) -> int:
        return (index - self.indices.start) // self.metadata["shard_size"]

    def __getstate__(self) -> dict:
        # Open files stay in the process that opened them; a DataLoader worker opens its own.
        return {**self.__dict__, "_reader": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reader = READERS[self.format](self.root, self.metadata)


def read_complete_metadata(root: Path) -> dict:
    """The metadata of the complete export in ``root``, its fields checked; an :class:`ExportError`
    naming what is missing, unfinished or of the wrong type."""
    metadata = ExportFolder(root).read_metadata()
    if metadata is None:
        raise ExportError(f"{root} holds no export ({METADATA} is missing)")
    if not metadata.get("complete"):
        done = len(list((root / "shard-stats").glob("*.json"))) if (root / "shard-stats").is_dir() else 0
        raise ExportError(f"export {root} is unfinished ({done} shard(s) written): rerun its export command to "
                          "finish it")
    for key, kind in _REQUIRED.items():
        value = metadata.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ExportError(f"{root / METADATA}'s {key!r} must be a {kind.__name__}, got {value!r}: it was not "
                              "written by a complete export of this version")
    if metadata["samples"] < 1 or metadata["start"] < 0 or metadata["shard_size"] < 1:
        raise ExportError(f"{root / METADATA} holds an impossible range: samples {metadata['samples']}, start "
                          f"{metadata['start']}, shard_size {metadata['shard_size']}")
    return metadata


def export_config(data: dict) -> DiffuMaskConfig:
    """The resolved settings an export's metadata holds (``config``), rebuilt without the model."""
    sections = {name: from_dict(cls, data[name]) for name, cls in SECTIONS.items()}
    size = tuple(data["image_size"])
    return DiffuMaskConfig(vocabulary_from(data["vocabulary"]), tuple(data["label_space"]), size, **sections)


def open_image(data: bytes, what: str) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # PIL's decoders raise all three on damaged bytes
        raise ExportError(f"{what} is not a readable image: {error}") from None
    return image


def decode_image(data: bytes, what: str) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB from JPEG or PNG bytes (``what`` names them in errors)."""
    image = open_image(data, what)
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


def decode_mask(data: bytes, what: str) -> np.ndarray:
    """``[H, W]`` uint8 label ids from a palette or grey PNG, whose pixel values are the ids."""
    image = open_image(data, what)
    if image.mode not in ("P", "L"):
        raise ExportError(f"{what} is a {image.mode} image, not a mask of label ids (palette or grey PNG)")
    return np.array(image)


class ShardCache:
    """The last :data:`OPEN_SHARDS` shards a reader opened, closing what falls out."""

    def __init__(self, open_shard: Callable[[int], Any], close: Callable[[Any], None] = lambda shard: None) -> None:
        self.open_shard, self.close = open_shard, close
        self.shards: OrderedDict[int, Any] = OrderedDict()

    def __getitem__(self, number: int) -> Any:
        if number in self.shards:
            self.shards.move_to_end(number)
            return self.shards[number]
        shard = self.shards[number] = self.open_shard(number)
        while len(self.shards) > OPEN_SHARDS:
            self.close(self.shards.popitem(last=False)[1])
        return shard


def check_record(record: Any, index: int, where: str) -> dict:
    """A sample record (index, attempt, prompt) that is the one of ``index``."""
    if not isinstance(record, dict) or record.get("index") != index or not isinstance(record.get("attempt"), int) \
            or not isinstance(record.get("prompt"), str):
        raise ExportError(f"{where} holds no record of sample {index} (index, attempt, prompt); was the export changed?")
    return record


class VocReader:
    """A VOC tree: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` and each shard's records."""

    def __init__(self, root: Path, metadata: dict) -> None:
        self.voc = root / "VOCdevkit" / "VOC2012"
        self.records = ShardCache(self._records)

    def _records(self, number: int) -> dict[int, dict]:
        path = self.voc / "SampleRecords" / f"{number:06d}.jsonl"
        try:
            lines = path.read_text().splitlines()
            return {record["index"]: record for record in map(json.loads, lines)}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ExportError(f"cannot read the sample records {path}: {error}") from None

    def read(self, index: int, shard: int) -> RawSample:
        name = sample_id(index)
        where = self.voc / "SampleRecords" / f"{shard:06d}.jsonl"
        record = check_record(self.records[shard].get(index), index, str(where))
        image_path, mask_path = self.voc / "JPEGImages" / f"{name}.jpg", self.voc / "SegmentationClass" / f"{name}.png"
        try:
            image, mask = image_path.read_bytes(), mask_path.read_bytes()
        except OSError as error:
            raise ExportError(f"cannot read sample {index} of the VOC export {self.voc.parents[1]}: {error}") from None
        return RawSample(decode_image(image, str(image_path)), decode_mask(mask, str(mask_path)), record["prompt"],
                         index, record["attempt"])


class WdsReader:
    """WebDataset tar shards: each sample's ``.image.<ext>``, ``.mask.png`` and ``.json`` members,
    found through the shard's member index (its headers, read once per opened shard)."""

    def __init__(self, root: Path, metadata: dict) -> None:
        self.root, self.extension = root, metadata["image_format"]
        self.tars = ShardCache(self._open, lambda shard: shard[0].close())

    def _open(self, number: int) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
        path = self.root / tar_name(number)
        try:
            tar = tarfile.open(path, "r:")
            return tar, {member.name: member for member in tar.getmembers()}
        except (OSError, tarfile.TarError) as error:
            raise ExportError(f"cannot read the tar shard {path}: {error}") from None

    def read(self, index: int, shard: int) -> RawSample:
        tar, members = self.tars[shard]
        key = f"{index:010d}"

        def member(suffix: str) -> bytes:
            info = members.get(f"{key}.{suffix}")
            if info is None:
                raise ExportError(f"{self.root / tar_name(shard)} has no {key}.{suffix}; was the export changed?")
            return tar.extractfile(info).read()

        record = check_record(json.loads(member("json")), index, str(self.root / tar_name(shard)))
        return RawSample(decode_image(member(f"image.{self.extension}"), f"{key}.image.{self.extension}"),
                         decode_mask(member("mask.png"), f"{key}.mask.png"), record["prompt"], index, record["attempt"])


class HfReader:
    """Parquet shards: the row group holding a sample, read whole (the stream reads neighbours next)."""

    COLUMNS = ["image", "mask", "index", "attempt", "prompt"]

    def __init__(self, root: Path, metadata: dict) -> None:
        self.root, self.count = root, metadata["shards"]
        self.first = metadata["start"]
        self.shard_size = metadata["shard_size"]
        self.files = ShardCache(self._open)
        self.group: tuple[tuple[int, int], list[dict]] | None = None

    def path(self, number: int) -> Path:
        return self.root / "data" / parquet_name(number, self.count)

    def _open(self, number: int):
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(self.path(number))
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise ExportError(f"cannot read the parquet shard {self.path(number)}: {error}") from None
        sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
        return file, np.cumsum(sizes).tolist()

    def read(self, index: int, shard: int) -> RawSample:
        file, ends = self.files[shard]
        row = index - self.first - shard * self.shard_size
        group = bisect.bisect_right(ends, row)
        if group >= len(ends):
            raise ExportError(f"{self.path(shard)} holds {ends[-1] if ends else 0} rows, not sample {index}")
        if self.group is None or self.group[0] != (shard, group):
            self.group = (shard, group), file.read_row_group(group, columns=self.COLUMNS).to_pylist()
        start = ends[group - 1] if group else 0
        record = check_record(self.group[1][row - start], index, str(self.path(shard)))
        return RawSample(decode_image(record["image"]["bytes"], f"{self.path(shard)} image {index}"),
                         decode_mask(record["mask"]["bytes"], f"{self.path(shard)} mask {index}"), record["prompt"],
                         index, record["attempt"])


READERS = {"voc": VocReader, "webdataset": WdsReader, "hf": HfReader}
