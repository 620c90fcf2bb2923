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
import math
import operator
import os
import tarfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image

from ..generation.generator import ForkSafeRLock, RawSample
from ..settings.config import SECTIONS, DiffuMaskConfig, from_dict
from ..settings.files import check_regular_file
from ..settings.label_spaces import IGNORE_INDEX
from ..settings.validation import MAX_IMAGE_SIDE, check_image_size, check_int
from ..settings.vocabulary import vocabulary_from
from .plan import METADATA, ExportError, ExportFolder
from .files import IMAGE_FORMATS, parquet_name, tar_name
from .voc import sample_id

# Plan fields that say how samples are stored, not which: the same samples in another format or
# sharding are the same data source (an image's bytes depend on its encoding, which stays).
STORAGE_FIELDS = ("format", "shard_size")
# Open shards (tar files, parquet files, record lists) kept per process: a stream shard reads its
# generation blocks in order, so it is inside one or two export shards at a time.
OPEN_SHARDS = 4
# Larger than any image or mask file an export writes (an 8,192 px square PNG, uncompressed, is
# 192 MiB): reading a bigger one whole would take the memory of a model.
MAX_FILE_BYTES = 256 * 2**20
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
        except (TypeError, ValueError, KeyError) as error:
            raise ExportError(f"{self.root / METADATA} holds settings this version cannot read: "
                              f"{error if not isinstance(error, KeyError) else f'config has no {error}'}") from None
        check_classes_in(self.root / METADATA, metadata, self.config)
        self.fingerprint = {key: value for key, value in metadata["plan"].items() if key not in STORAGE_FIELDS}
        self.lock = ForkSafeRLock()
        self._reader = READERS[self.format](self.root, metadata)
        self._reader.check(self.config)

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
            return [self._checked(self._reader.read(index, self._shard(index))) for index in wanted]

    def _checked(self, sample: RawSample) -> RawSample:
        """``sample`` when its image and mask are of the export's image size and its mask holds
        only ids of the export's label space (or 255): what the datasets serve and a model trains on."""
        where = self._reader.where(sample.index, self._shard(sample.index))
        size = tuple(self.config.image_size)
        if sample.image.shape[:2] != size or sample.mask.shape != size:
            raise ExportError(f"{where}: sample {sample.index}'s image is {sample.image.shape[0]}x{sample.image.shape[1]} "
                              f"and its mask {sample.mask.shape[0]}x{sample.mask.shape[1]}, but the export's image size "
                              f"is {size[0]}x{size[1]} ({METADATA}'s config.image_size); was the export changed?")
        ids = np.unique(sample.mask)
        bad = ids[(ids >= len(self.label_space)) & (ids != IGNORE_INDEX)]
        if len(bad):
            raise ExportError(f"{where}: sample {sample.index}'s mask holds label id(s) {bad.tolist()}, outside the "
                              f"export's label space of {len(self.label_space)} classes (ids 0 to "
                              f"{len(self.label_space) - 1}, 255 ignore); was the export changed?")
        return sample

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
    if metadata["complete"] is not True:
        raise ExportError(f"{root / METADATA}'s 'complete' must be true, got {metadata['complete']!r}")
    if metadata["samples"] < 1 or metadata["start"] < 0 or metadata["shard_size"] < 1:
        raise ExportError(f"{root / METADATA} holds an impossible range: samples {metadata['samples']}, start "
                          f"{metadata['start']}, shard_size {metadata['shard_size']}")
    if metadata["shards"] != math.ceil(metadata["samples"] / metadata["shard_size"]):
        raise ExportError(f"{root / METADATA} says {metadata['shards']} shard(s) of {metadata['shard_size']} for "
                          f"{metadata['samples']} samples, which take {math.ceil(metadata['samples'] / metadata['shard_size'])}")
    if metadata["seed"] < 0:
        raise ExportError(f"{root / METADATA}'s 'seed' must be >= 0, got {metadata['seed']}")
    if metadata["image_format"] not in IMAGE_FORMATS:
        raise ExportError(f"{root / METADATA}'s 'image_format' must be one of {', '.join(IMAGE_FORMATS)}, got "
                          f"{metadata['image_format']!r}")
    gate = metadata.get("gate", {})
    if not isinstance(gate, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in gate.items()):
        raise ExportError(f"{root / METADATA}'s 'gate' must map reasons to counts, got {gate!r}")
    return metadata


def check_classes_in(path: Path, metadata: dict, config: DiffuMaskConfig) -> None:
    """The metadata's ``classes`` and ``label_space`` agree with its ``config``: the classes are
    names of the label space, which is the config's."""
    if list(metadata["label_space"]) != list(config.label_space):
        raise ExportError(f"{path}'s 'label_space' {metadata['label_space']!r} is not its config's label_space "
                          f"{list(config.label_space)!r}; was the export changed?")
    classes = metadata["classes"]
    strange = [name for name in classes if not isinstance(name, str) or name not in config.label_space]
    if not classes or strange:
        raise ExportError(f"{path}'s 'classes' must be names of its label space {list(config.label_space)!r}, got "
                          f"{classes!r}")


def export_config(data: dict) -> DiffuMaskConfig:
    """The resolved settings an export's metadata holds (``config``), rebuilt without the model."""
    sections = {name: from_dict(cls, data[name]) for name, cls in SECTIONS.items()}
    size = check_image_size(data["image_size"])
    return DiffuMaskConfig(vocabulary_from(data["vocabulary"]), tuple(data["label_space"]), size, **sections)


def export_file(path: Path, root: Path, limit: int | None = MAX_FILE_BYTES) -> Path:
    """``path`` when it is a regular file inside the export folder ``root`` (through links too) of
    at most ``limit`` bytes; an :class:`ExportError` naming it otherwise. Opening a FIFO or a device
    would block or never end, and a link out of the folder reads what the export did not write."""
    try:
        check_regular_file(path)
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {path}: {error}") from None
    real, inside = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, inside]) != inside:
        raise ExportError(f"{path} links to {real}, outside the export folder {root}; an export's files are its own")
    size = os.stat(path).st_size
    if limit is not None and size > limit:
        raise ExportError(f"{path} is {size / 2**20:.0f} MiB, larger than any file an export writes "
                          f"({limit // 2**20} MiB)")
    return path


def read_export_file(path: Path, root: Path) -> bytes:
    """The bytes of the export file ``path`` (:func:`export_file`'s checks)."""
    try:
        return export_file(path, root).read_bytes()
    except OSError as error:
        raise ExportError(f"cannot read {path}: {error}") from None


def open_image(data: bytes, what: str) -> PIL.Image.Image:
    try:
        with warnings.catch_warnings():  # a size beyond PIL's bomb warning is refused below, before decoding
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))
        if max(image.size) > MAX_IMAGE_SIDE:
            raise ExportError(f"{what} is {image.size[1]}x{image.size[0]}, larger than any image an export holds "
                              f"({MAX_IMAGE_SIDE} px a side)")
        image.load()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        # PIL's decoders raise OSError, SyntaxError and ValueError on damaged bytes
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
    attempt = record.get("attempt") if isinstance(record, dict) else None
    if not isinstance(record, dict) or record.get("index") != index or isinstance(record.get("index"), bool) \
            or not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0 \
            or not isinstance(record.get("prompt"), str):
        raise ExportError(f"{where} holds no record of sample {index} (index, attempt, prompt); was the export changed?")
    return record


class VocReader:
    """A VOC tree: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` and each shard's records."""

    def __init__(self, root: Path, metadata: dict) -> None:
        self.root, self.shards = root, metadata["shards"]
        self.voc = root / "VOCdevkit" / "VOC2012"
        self.records = ShardCache(self._records)

    def where(self, index: int, shard: int) -> Path:
        return self.voc / "SegmentationClass" / f"{sample_id(index)}.png"

    def check(self, config: DiffuMaskConfig) -> None:
        """Every shard's record file is there, a regular file of the folder (what a sample's read needs first)."""
        for number in range(self.shards):
            export_file(self._records_path(number), self.root)

    def _records_path(self, number: int) -> Path:
        return self.voc / "SampleRecords" / f"{number:06d}.jsonl"

    def _records(self, number: int) -> dict[int, dict]:
        path = self._records_path(number)
        try:
            lines = read_export_file(path, self.root).decode("utf-8").splitlines()
            return {record["index"]: record for record in map(json.loads, lines)}
        except (ValueError, KeyError, TypeError, IndexError) as error:  # UnicodeDecodeError is a ValueError
            raise ExportError(f"cannot read the sample records {path}: {type(error).__name__}: {error}") from None

    def read(self, index: int, shard: int) -> RawSample:
        name = sample_id(index)
        where = self._records_path(shard)
        record = check_record(self.records[shard].get(index), index, str(where))
        image_path, mask_path = self.voc / "JPEGImages" / f"{name}.jpg", self.voc / "SegmentationClass" / f"{name}.png"
        image, mask = read_export_file(image_path, self.root), read_export_file(mask_path, self.root)
        return RawSample(decode_image(image, str(image_path)), decode_mask(mask, str(mask_path)), record["prompt"],
                         index, record["attempt"])


class WdsReader:
    """WebDataset tar shards: each sample's ``.image.<ext>``, ``.mask.png`` and ``.json`` members,
    found through the shard's member index (its headers, read once per opened shard)."""

    def __init__(self, root: Path, metadata: dict) -> None:
        self.root, self.extension, self.shards = root, metadata["image_format"], metadata["shards"]
        self.tars = ShardCache(self._open, lambda shard: shard[0].close())

    def where(self, index: int, shard: int) -> Path:
        return self.root / tar_name(shard)

    def check(self, config: DiffuMaskConfig) -> None:
        """Every tar shard is there, a regular file of the folder."""
        for number in range(self.shards):
            export_file(self.root / tar_name(number), self.root, limit=None)

    def _open(self, number: int) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
        path = export_file(self.root / tar_name(number), self.root, limit=None)
        try:
            tar = tarfile.open(path, "r:")
            members: dict[str, tarfile.TarInfo] = {}
            for member in tar.getmembers():
                if member.name in members:  # tar readers differ on which copy wins: the export wrote one
                    tar.close()
                    raise ExportError(f"{path} holds {member.name!r} twice; was the export changed?")
                members[member.name] = member
            return tar, members
        except (OSError, tarfile.TarError) as error:
            raise ExportError(f"cannot read the tar shard {path}: {error}") from None

    def read(self, index: int, shard: int) -> RawSample:
        tar, members = self.tars[shard]
        key = f"{index:010d}"
        path = self.root / tar_name(shard)

        def member(suffix: str) -> bytes:
            info = members.get(f"{key}.{suffix}")
            if info is None:
                raise ExportError(f"{path} has no {key}.{suffix}; was the export changed?")
            if not info.isreg():  # a link, folder or device entry: the export writes files only
                raise ExportError(f"{path}'s {key}.{suffix} is not a file (tar type {info.type!r}); was the export "
                                  "changed?")
            if info.size > MAX_FILE_BYTES:
                raise ExportError(f"{path}'s {key}.{suffix} is {info.size / 2**20:.0f} MiB, larger than any file an "
                                  f"export writes ({MAX_FILE_BYTES // 2**20} MiB)")
            try:
                return tar.extractfile(info).read()
            except (OSError, tarfile.TarError) as error:
                raise ExportError(f"cannot read {key}.{suffix} of {path}: {error}") from None

        try:
            record = json.loads(member("json").decode("utf-8"))
        except ValueError as error:  # UnicodeDecodeError and JSONDecodeError
            raise ExportError(f"{path}'s {key}.json is not a JSON record: {error}") from None
        record = check_record(record, index, str(path))
        return RawSample(decode_image(member(f"image.{self.extension}"), f"{path}'s {key}.image.{self.extension}"),
                         decode_mask(member("mask.png"), f"{path}'s {key}.mask.png"), record["prompt"], index,
                         record["attempt"])


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

    def where(self, index: int, shard: int) -> Path:
        return self.path(shard)

    def check(self, config: DiffuMaskConfig) -> None:
        """Every parquet shard is there, a regular file of the folder."""
        for number in range(self.count):
            export_file(self.path(number), self.root, limit=None)

    def _open(self, number: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = export_file(self.path(number), self.root, limit=None)
        try:
            file = pq.ParquetFile(path)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise ExportError(f"cannot read the parquet shard {path}: {error}") from None
        schema = file.schema_arrow

        def image_column(kind):
            return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and \
                (pa.types.is_binary(kind.field("bytes").type) or pa.types.is_large_binary(kind.field("bytes").type))

        expected = {"image": ("struct<bytes: binary>", image_column), "mask": ("struct<bytes: binary>", image_column),
                    "index": ("integer", pa.types.is_integer), "attempt": ("integer", pa.types.is_integer),
                    "prompt": ("string", lambda kind: pa.types.is_string(kind) or pa.types.is_large_string(kind))}
        for name, (wanted, fits) in expected.items():
            kind = schema.field(name).type if name in schema.names else None
            if kind is None or not fits(kind):
                found = "no such column" if kind is None else f"a column of {kind}"
                raise ExportError(f"the parquet shard {path} needs a column {name!r} of {wanted}, has {found}; was the "
                                  "export changed?")
        sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
        return file, np.cumsum(sizes).tolist()

    def read(self, index: int, shard: int) -> RawSample:
        file, ends = self.files[shard]
        row = index - self.first - shard * self.shard_size
        group = bisect.bisect_right(ends, row)
        if group >= len(ends):
            raise ExportError(f"{self.path(shard)} holds {ends[-1] if ends else 0} rows, not sample {index}")
        if self.group is None or self.group[0] != (shard, group):
            try:
                self.group = (shard, group), file.read_row_group(group, columns=self.COLUMNS).to_pylist()
            except (OSError, ValueError) as error:
                raise ExportError(f"cannot read row group {group} of the parquet shard {self.path(shard)}: "
                                  f"{error}") from None
        start = ends[group - 1] if group else 0
        record = check_record(self.group[1][row - start], index, str(self.path(shard)))
        data = {}
        for column in ("image", "mask"):
            data[column] = record[column]["bytes"] if record[column] else None
            if not isinstance(data[column], bytes) or len(data[column]) > MAX_FILE_BYTES:
                raise ExportError(f"{self.path(shard)}'s {column} of sample {index} holds no image bytes (or more than "
                                  f"{MAX_FILE_BYTES // 2**20} MiB); was the export changed?")
        return RawSample(decode_image(data["image"], f"{self.path(shard)} image {index}"),
                         decode_mask(data["mask"], f"{self.path(shard)} mask {index}"), record["prompt"],
                         index, record["attempt"])


READERS = {"voc": VocReader, "webdataset": WdsReader, "hf": HfReader}
