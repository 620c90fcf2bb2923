"""WebDataset tar shards, written with the ``webdataset`` package: ``train-<shard:06d>.tar``, read
with ``webdataset.WebDataset("OUT/train-{000000..NNNNNN}.tar")``.

Each sample is ``<index:010d>.image.jpg`` (or ``.image.png``), ``<index:010d>.mask.png`` and
``<index:010d>.json`` (index, attempt, prompt, classes, seed). The mask is a grey ("L") PNG of the
label ids, not a palette one: webdataset's image decoders convert every image to L/RGB/RGBA, which
would turn palette indices into colours, while grey ids stay ids (``"l8"``: ``[H, W]``; ``"rgb8"``:
the ids in each channel).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import webdataset

from ..generation.generator import RawSample
from .files import encode_image, encode_mask, publish, tar_name, temporary_path
from .plan import ExportOptions, Shard


class WdsWriter:
    """Writes an export's shards as tar files under ``root`` (see the module's docstring)."""

    def __init__(self, root: Path, options: ExportOptions, label_space: Sequence[str]) -> None:
        self.root, self.options = root, options

    def shard(self, shard: Shard) -> "WdsShard":
        return WdsShard(self, shard)

    def finish(self, shards: Sequence[Shard]) -> dict:
        last = shards[-1].number
        urls = tar_name(0) if last == 0 else f"train-{{{0:06d}..{last:06d}}}.tar"
        return {"urls": urls, "read": f"webdataset.WebDataset('OUT/{urls}').decode('rgb8')"}


class WdsShard:
    """One tar shard. ``ShardWriter`` writes it under its temporary name (its pattern) as exactly one
    shard (``maxcount`` = the shard's length, ``start_shard`` = its number) and hands the closed file
    to ``post``, which renames it into place only when every sample was written: ``ShardWriter``
    closes (and calls ``post``) on an exception too, which must not publish a partial shard."""

    def __init__(self, writer: WdsWriter, shard: Shard) -> None:
        self.writer, self.shard = writer, shard
        self.path = writer.root / tar_name(shard.number)
        self.complete = False
        pattern = os.path.join(str(writer.root).replace("%", "%%"), temporary_path(Path("train-%06d.tar")).name)
        # mtime=0 and bytes in, bytes out (encoder=False): a shard written again is the same file.
        self.tar = webdataset.ShardWriter(pattern, maxcount=len(shard.indices), maxsize=float("inf"), post=self._post,
                                          start_shard=shard.number, verbose=0, encoder=False, mtime=0)

    def _post(self, name: str) -> None:
        if self.complete:
            publish(Path(name), self.path)
        else:
            os.unlink(name)

    def add(self, sample: RawSample, record: dict) -> None:
        extension = self.writer.options.image_format
        self.tar.write({"__key__": f"{sample.index:010d}",
                        f"image.{extension}": encode_image(sample.image, extension),
                        "mask.png": encode_mask(sample.mask, palette=False),
                        "json": json.dumps(record).encode()})

    def commit(self) -> None:
        self.complete = True
        self.tar.close()

    def abort(self) -> None:
        self.tar.close()
