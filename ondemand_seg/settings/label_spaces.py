"""Label spaces: the ordered class names whose position is the class id in a mask.

Id 0 is always ``"background"``; 255 is the ignore index used by Pascal VOC and by torchvision's
segmentation references, so it never names a class.
"""
from __future__ import annotations

from typing import Sequence

IGNORE_INDEX = 255

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

def voc_palette(num_colors: int = 256) -> list[int]:
    """The Pascal VOC colour map as a flat ``[r0, g0, b0, r1, ...]`` list for ``PIL.Image.putpalette``.

    Written out because VOC's bit-interleaving colour map ships with no library we depend on.
    """
    palette = []
    for index in range(num_colors):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.extend((r, g, b))
    return palette


def validate_label_space(label_space: Sequence[str]) -> tuple[str, ...]:
    """Check that ``label_space`` is a usable class list and return it as a tuple."""
    names = tuple(label_space)
    if len(names) < 2:
        raise ValueError(f"label_space needs background and at least one class, got {names!r}")
    if names[0] != "background":
        raise ValueError(f"label_space[0] must be 'background', got {names[0]!r}")
    if len(names) > IGNORE_INDEX:
        raise ValueError(f"label_space has {len(names)} classes; ids must stay below {IGNORE_INDEX}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"label_space repeats class names: {duplicates}")
    return names


def class_ids(classes: Sequence[str], label_space: Sequence[str]) -> list[int]:
    """Map class names to their ids in ``label_space``, naming any unknown or invalid class."""
    names = validate_label_space(label_space)
    if len(classes) == 0:
        raise ValueError("classes is empty: name at least one class to generate")
    ids = []
    for name in classes:
        if name == "background":
            raise ValueError("'background' cannot be generated as a class; it is what the mask leaves")
        if name not in names:
            raise ValueError(
                f"unknown class {name!r} for this label space; known classes: {', '.join(names[1:])}"
            )
        ids.append(names.index(name))
    return ids


def _folded(name: str) -> str:
    return " ".join(name.split()).casefold()


def check_class_spelling(classes: Sequence[str], label_space: Sequence[str]) -> None:
    """Refuse ``classes`` that repeat a class, or that differ from each other or from a class of
    ``label_space`` only by case or whitespace.

    Left alone, ``"Circle"`` next to a label space's ``"circle"`` would become a free-text class of
    its own, with its own id, splitting one kind of object over two labels; and a repeated class
    would be named twice in one prompt ("a circle and a circle").
    Raises:
        ValueError: naming the classes at fault and the spelling to use.
    """
    repeated = sorted({name for name in classes if list(classes).count(name) > 1})
    if repeated:
        raise ValueError(f"classes repeats {', '.join(map(repr, repeated))}: name each class once")
    known = {_folded(name): name for name in label_space}
    for name in classes:
        match = known.get(_folded(name))
        if match is not None and match != name:
            raise ValueError(f"class {name!r} differs from the label space's {match!r} only by case or whitespace; "
                             f"write {match!r} (a new free-text class must differ by more than that)")
    seen: dict[str, str] = {}
    for name in classes:
        other = seen.setdefault(_folded(name), name)
        if other != name:
            raise ValueError(f"classes {other!r} and {name!r} differ only by case or whitespace: name each class once")
