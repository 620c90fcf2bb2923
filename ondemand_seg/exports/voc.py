"""The Pascal VOC 2012 segmentation layout, as ``torchvision.datasets.VOCSegmentation(out,
year="2012", image_set="train")`` reads it:

- ``VOCdevkit/VOC2012/JPEGImages/<id>.jpg``: the image (``image_format="png"``: PNG bytes under the
  ``.jpg`` name, because VOCSegmentation builds ``<id>.jpg`` paths and PIL opens a file by its
  content, so the pixels are the generated ones, unchanged);
- ``VOCdevkit/VOC2012/SegmentationClass/<id>.png``: the mask, a palette PNG of label ids (VOC colours);
- ``VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt``: every id, written when the export completes;
- ``VOCdevkit/VOC2012/SampleRecords/<shard>.jsonl``: each sample's index, attempt, prompt, classes, seed.

``<id>`` is the sample index, zero-padded to 10 digits (as ToyWorld's VOC folders).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..generation.generator import RawSample
from .files import encode_image, encode_mask, temporary_path, publish, write_atomically
from .plan import ExportOptions, Shard

def sample_id(index: int) -> str:
    return f"{index:010d}"


class VocWriter:
    """Writes an export's shards into a VOC tree under ``root`` (see the module's docstring)."""

    def __init__(self, root: Path, options: ExportOptions, label_space: Sequence[str]) -> None:
        self.options = options
        self.voc = root / "VOCdevkit" / "VOC2012"
        self.images, self.masks = self.voc / "JPEGImages", self.voc / "SegmentationClass"
        self.splits, self.records = self.voc / "ImageSets" / "Segmentation", self.voc / "SampleRecords"
        for folder in (self.images, self.masks, self.splits, self.records):
            folder.mkdir(parents=True, exist_ok=True)

    def shard(self, shard: Shard) -> "VocShard":
        return VocShard(self, shard)

    def files(self, shard: Shard) -> list[Path]:
        """The files a finished ``shard`` left: each sample's image and mask, and its records."""
        names = [sample_id(index) for index in shard.indices]
        return [*(self.images / f"{name}.jpg" for name in names), *(self.masks / f"{name}.png" for name in names),
                self.records / f"{shard.number:06d}.jsonl"]

    def finish(self, shards: Sequence[Shard]) -> dict:
        """Write the split list (streamed: an export may hold millions of ids); how to read the tree."""
        split = self.splits / "train.txt"
        temporary = temporary_path(split, unique=True)
        try:
            with open(temporary, "w") as file:
                for shard in shards:
                    file.writelines(f"{sample_id(i)}\n" for i in shard.indices)
            publish(temporary, split)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return {"root": "VOCdevkit/VOC2012", "image_set": "train",
                "read": "torchvision.datasets.VOCSegmentation(OUT, year='2012', image_set='train')"}


class VocShard:
    """One shard's files: each image and mask is renamed into place whole as it is written; the
    shard's sample records when it is complete."""

    def __init__(self, writer: VocWriter, shard: Shard) -> None:
        self.writer, self.shard = writer, shard
        self.lines: list[str] = []

    def add(self, sample: RawSample, record: dict) -> None:
        writer, name = self.writer, sample_id(sample.index)
        write_atomically(writer.images / f"{name}.jpg", encode_image(sample.image, writer.options.image_format))
        write_atomically(writer.masks / f"{name}.png", encode_mask(sample.mask))
        self.lines.append(json.dumps(record) + "\n")

    def commit(self) -> None:
        write_atomically(self.writer.records / f"{self.shard.number:06d}.jsonl", "".join(self.lines).encode())

    def abort(self) -> None:
        """Nothing to undo: every file in place is whole, and the shard counts as unfinished."""
