"""Files that appear whole or not at all, the image and mask encodings every format shares, and the
shard file names the writers and the reader share."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image

from ..settings.label_spaces import voc_palette

IMAGE_FORMATS = ("jpg", "png")
# 4:4:4 because class is colour: chroma subsampling would smear hues across edges (as ToyWorld's VOC).
JPEG_OPTIONS = {"quality": 95, "subsampling": 0}
_PALETTE = voc_palette()


def tar_name(number: int) -> str:
    """The WebDataset shard ``number``'s file name."""
    return f"train-{number:06d}.tar"


def parquet_name(number: int, count: int) -> str:
    """The parquet shard ``number`` of ``count``'s file name (``datasets``' split-file naming)."""
    return f"train-{number:05d}-of-{count:05d}.parquet"


def temporary_path(path: Path, unique: bool = False) -> Path:
    """The name ``path`` is written under before it is renamed into place: hidden, in the same
    folder (so the rename is atomic), ending in ``.tmp``. A shard's files have one writer, so their
    name is fixed and a rerun overwrites what a killed run left; ``unique`` adds the process id for
    files several processes may write at once (metadata, split lists)."""
    suffix = f".{os.getpid()}.tmp" if unique else ".tmp"
    return path.with_name(f".{path.name}{suffix}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one :func:`temporary_path` gives."""
    return name.startswith(".") and name.endswith(".tmp")


def publish(temporary: Path, path: Path) -> None:
    """Flush ``temporary`` to disk, then rename it to ``path``: a reader (or a rerun after a crash)
    sees the old file or the whole new one, never a part."""
    with open(temporary, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)


def write_atomically(path: Path, data: bytes, unique: bool = False) -> None:
    """Write ``data`` to ``path`` through :func:`temporary_path` and :func:`publish`; a write that
    fails removes its temporary file."""
    temporary = temporary_path(path, unique)
    try:
        temporary.write_bytes(data)
        publish(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON, atomically (several processes may write the same file)."""
    write_atomically(path, (json.dumps(data, indent=2) + "\n").encode(), unique=True)


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    """``[H, W, 3]`` uint8 RGB as JPEG (quality 95, 4:4:4) or lossless PNG bytes."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        PIL.Image.fromarray(image).save(buffer, format="JPEG", **JPEG_OPTIONS)
    else:
        PIL.Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_mask(mask: np.ndarray, palette: bool = True) -> bytes:
    """``[H, W]`` uint8 label ids as PNG: a palette ("P") image in VOC's colours, whose pixel values
    are the ids, or with ``palette=False`` a grey ("L") image of the ids."""
    image = PIL.Image.fromarray(mask)
    if palette:
        image.putpalette(_PALETTE)  # an "L" image with a palette becomes "P", ids unchanged
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
