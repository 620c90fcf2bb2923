"""A Hugging Face ``datasets`` dataset as parquet shards: ``data/train-<shard:05d>-of-<count:05d>.parquet``,
read with ``datasets.load_dataset("OUT")`` (or ``load_dataset("parquet", data_files="OUT/data/*.parquet")``).

Columns (``datasets`` features, stored in each file's schema so a reader gets them back): ``image``
and ``mask`` (``Image``: the image as JPEG or PNG bytes, the mask as a palette PNG whose pixel values
are the label ids), ``index``, ``attempt``, ``prompt``, ``classes`` (``List(ClassLabel(names=label
space))``: the classes the prompt names) and ``seed``.

Parquet shards rather than ``save_to_disk``: a shard is written, renamed into place and skipped on a
rerun on its own, and rows are written as they are generated (``datasets`` encodes them, pyarrow
writes them), so memory holds one row group, not the dataset.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from ..generation.generator import RawSample
from .files import encode_image, encode_mask, parquet_name, publish, temporary_path
from .plan import ExportOptions, Shard

# Rows per parquet row group, as datasets writes image datasets: larger groups read faster, smaller
# ones hold less in memory while writing.
ROWS_PER_GROUP = 100
# Parquet leaf columns of the image and mask (their bytes are compressed already and never repeat:
# stored plainly, without the dictionary, compression and min/max statistics the other columns get,
# whose statistics would copy two whole images per row group into the file's footer).
BLOB_COLUMNS = ("image.bytes", "image.path", "mask.bytes", "mask.path")
OTHER_COLUMNS = ("index", "attempt", "prompt", "classes.list.element", "seed")


def features(label_space: Sequence[str]) -> datasets.Features:
    """The dataset's columns and their ``datasets`` feature types."""
    return datasets.Features({
        "image": datasets.Image(), "mask": datasets.Image(), "index": datasets.Value("int64"),
        "attempt": datasets.Value("int64"), "prompt": datasets.Value("string"),
        "classes": datasets.List(datasets.ClassLabel(names=list(label_space))), "seed": datasets.Value("int64"),
    })


class HfWriter:
    """Writes an export's shards as parquet files under ``root/data`` (see the module's docstring)."""

    def __init__(self, root: Path, options: ExportOptions, label_space: Sequence[str]) -> None:
        self.data, self.options = root / "data", options
        self.features = features(label_space)
        self.count = len(options.shards())
        self.data.mkdir(parents=True, exist_ok=True)

    def shard(self, shard: Shard) -> "HfShard":
        return HfShard(self, self.data / parquet_name(shard.number, self.count))

    def finish(self, shards: Sequence[Shard]) -> dict:
        return {"data_files": "data/train-*.parquet", "features": self.features.to_dict(),
                "read": "datasets.load_dataset('OUT', split='train')"}


class HfShard:
    """One parquet file, written under its temporary name one row group at a time and renamed into
    place when complete."""

    def __init__(self, writer: HfWriter, path: Path) -> None:
        self.writer, self.path = writer, path
        self.temporary = temporary_path(path)
        self.schema = writer.features.arrow_schema
        self.file = pq.ParquetWriter(self.temporary, self.schema, compression=dict.fromkeys(BLOB_COLUMNS, "none"),
                                     use_dictionary=list(OTHER_COLUMNS), write_statistics=list(OTHER_COLUMNS),
                                     column_encoding=dict.fromkeys(BLOB_COLUMNS, "PLAIN"))
        self.rows: list[dict] = []

    def add(self, sample: RawSample, record: dict) -> None:
        self.rows.append({"image": {"bytes": encode_image(sample.image, self.writer.options.image_format), "path": None},
                          "mask": {"bytes": encode_mask(sample.mask), "path": None}, **record})
        if len(self.rows) >= ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            columns = {name: [row[name] for row in self.rows] for name in self.schema.names}
            self.file.write_table(pa.Table.from_pydict(self.writer.features.encode_batch(columns), schema=self.schema))
            self.rows = []

    def commit(self) -> None:
        self._flush()
        self.file.close()
        publish(self.temporary, self.path)

    def abort(self) -> None:
        self.file.close()
        self.temporary.unlink(missing_ok=True)
