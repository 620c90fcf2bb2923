"""A user's image, in whatever form it comes, as the ``[3, H, W]`` float RGB tensor in [0, 1] the
labeller works on.

Conversions (each documented, none silent about what it cannot read):

- PIL images: RGB as is; grayscale (``"L"``, ``"1"``) repeated over three channels; ``"P"``
  through its palette; an alpha channel (``"RGBA"``, ``"LA"``, ``"PA"``) is dropped, not composited;
  16-bit grayscale (``"I;16"``, ``"I;16B"``, ``"I;16L"``) and 32-bit integer (``"I"``) are divided
  by 65535 (PIL's own ``convert("RGB")`` would clip them at 255); ``"F"`` (float) must lie in [0, 1];
  ``"CMYK"``, ``"YCbCr"``, ``"LAB"``, ``"HSV"`` through PIL's conversion to RGB.
- NumPy arrays, ``[H, W]`` or ``[H, W, C]`` (PIL's and OpenCV's layout, channels last), and torch
  tensors, ``[H, W]`` or ``[C, H, W]`` (torchvision's layout, channels first), ``C`` in 1 (gray),
  3 (RGB) or 4 (RGBA, alpha dropped): ``uint8`` is divided by 255, ``uint16`` by 65535, floats
  must already lie in [0, 1]. NumPy images are taken as RGB: an OpenCV (BGR) array must be
  flipped by the caller.

Anything else (another dtype or shape, an empty image, a non-finite or out-of-range float, a PIL
image whose file is truncated or corrupt) is a ``TypeError`` or ``ValueError`` naming the image's
position and what was found.

A folder of image files is read by :class:`ImageFolderImages` (PIL decodes them; the conversion
above then applies).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from ..settings.files import open_regular_file

ImageLike = Union[PIL.Image.Image, np.ndarray, torch.Tensor]

# File name endings read as images (any case): the formats PIL decodes that photos and datasets use.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L", "PA": "RGBA"}


def to_rgb_tensor(image: Any, where: str = "image") -> torch.Tensor:
    """``image`` as a ``[3, H, W]`` float32 RGB tensor in [0, 1] (see the module docstring).

    Args:
        image: a PIL image, a NumPy array ``[H, W(, C)]`` or a torch tensor ``[(C,) H, W]``.
        where: how errors name the image (e.g. ``"images[3]"``).
    """
    if isinstance(image, PIL.Image.Image):
        return _from_pil(image, where)
    if isinstance(image, np.ndarray):
        if image.ndim == 3:
            image = np.moveaxis(image, -1, 0)
        return _from_array(torch.from_numpy(np.ascontiguousarray(image)), where, "[H, W] or [H, W, C]")
    if isinstance(image, torch.Tensor):
        return _from_array(image.detach().cpu(), where, "[H, W] or [C, H, W]")
    raise TypeError(f"{where} must be a PIL image, a NumPy array or a torch tensor, got {type(image).__name__}")


def _from_pil(image: PIL.Image.Image, where: str) -> torch.Tensor:
    if 0 in image.size:
        raise ValueError(f"{where} is empty ({image.size[0]}x{image.size[1]} px)")
    try:
        # PIL decodes a file's pixels on first use: a truncated or corrupt file fails here.
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{where} cannot be decoded ({type(error).__name__}: {error}); is its file complete?") from None
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{where}: a mode {mode!r} image must hold values in [0, 65535] (16-bit), "
                             f"got [{values.min():g}, {values.max():g}]")
        return torch.from_numpy(values / 65535.0).float()[None].expand(3, -1, -1).contiguous()
    if mode == "F":
        return _from_array(torch.from_numpy(np.asarray(image, dtype=np.float32).copy()), where, "[H, W]")
    if mode in _ALPHA_MODES:
        image = image.convert(_ALPHA_MODES[mode])
        if image.mode == "RGBA":  # "PA": the palette resolved, then the alpha dropped
            image = image.convert("RGB")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def _from_array(values: torch.Tensor, where: str, layout: str) -> torch.Tensor:
    if values.ndim == 2:
        values = values[None]
    if values.ndim != 3 or values.shape[0] not in (1, 3, 4):
        raise ValueError(f"{where} must have shape {layout} with C in 1 (gray), 3 (RGB) or 4 (RGBA), "
                         f"got {tuple(values.shape)} in the channels-first order it was read in")
    if values.shape[-1] == 0 or values.shape[-2] == 0:
        raise ValueError(f"{where} is empty (shape {tuple(values.shape)})")
    if values.dtype == torch.uint8:
        values = values.float() / 255.0
    elif values.dtype == torch.uint16:
        values = values.float() / 65535.0
    elif values.dtype.is_floating_point:
        values = values.float()
        if not torch.isfinite(values).all():
            raise ValueError(f"{where} holds non-finite values (NaN or inf)")
        if values.min() < 0 or values.max() > 1:
            raise ValueError(f"{where}: a float image must lie in [0, 1], got [{values.min():g}, {values.max():g}] "
                             "(divide 8-bit values by 255)")
    else:
        raise TypeError(f"{where} has dtype {values.dtype}; give uint8, uint16 or float in [0, 1]")
    if values.shape[0] == 1:
        values = values.expand(3, -1, -1)
    return values[:3].contiguous()


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (not in sub-folders), sorted by name: names ending in
    one of :data:`IMAGE_EXTENSIONS`, any case; hidden files (a leading dot) and other files (a tags
    file kept beside the images) are skipped.

    Raises:
        FileNotFoundError: ``folder`` does not exist, or an image name in it is a link to nothing.
        NotADirectoryError: it is a file. ValueError: it holds no image file.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"{folder} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    named = [path for path in root.iterdir() if not path.name.startswith(".")
             and path.suffix.lower() in IMAGE_EXTENSIONS]
    # A link to a moved or deleted image is an image the user meant to list, not a file to skip quietly.
    dangling = sorted(path.name for path in named if path.is_symlink() and not path.exists())
    if dangling:
        raise FileNotFoundError(f"{folder}: {', '.join(dangling)} {'is a link' if len(dangling) == 1 else 'are links'} "
                                "to a file that does not exist; restore or remove "
                                f"{'it' if len(dangling) == 1 else 'them'}")
    files = sorted(path for path in named if path.is_file())
    if not files:
        raise ValueError(f"{folder} holds no image file (names ending in {', '.join(IMAGE_EXTENSIONS)})")
    return files


class ImageFolderImages(Sequence):
    """The images of a folder (:func:`image_files`: directly in it, sorted by name) as a sequence of
    PIL images, each decoded by PIL when it is read, in its own mode (:func:`to_rgb_tensor` converts
    it), turned upright by its EXIF orientation tag (as photo viewers show it); a multi-frame file
    gives its first frame.

    Attributes:
        root: the folder. files: the image paths, item ``i`` is ``files[i]``. names: their file names.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: as :func:`image_files`; reading an item
            that PIL cannot decode is a ``ValueError`` naming the file.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.root = Path(folder)
        self.files = image_files(folder)

    @property
    def names(self) -> list[str]:
        return [path.name for path in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int | slice) -> PIL.Image.Image | list[PIL.Image.Image]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if isinstance(index, bool):  # a bool is an int to Python, but never an image's position
            raise TypeError(f"index must be an int, got {index!r}")
        path = self.files[index]
        try:
            # Opened as a regular file: the file may have been replaced (by a FIFO, whose open would
            # block for ever) since the folder was listed.
            with open_regular_file(path) as stream, PIL.Image.open(stream) as image:
                image.load()
                return PIL.ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
            # PIL's decoders raise OSError, SyntaxError and ValueError on damaged bytes.
            raise ValueError(f"{path} is not an image PIL can read: {error}") from None

    def __repr__(self) -> str:
        return f"ImageFolderImages({str(self.root)!r}: {len(self)} images)"
