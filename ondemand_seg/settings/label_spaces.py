"""Label spaces: the ordered class names whose position is the class id in a mask.

Id 0 is always ``"background"``; 255 is the ignore index used by Pascal VOC and by torchvision's
segmentation references, so it never names a class.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Mapping, Sequence

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
    # "Circle" beside "circle" would give one kind of object two ids, as would a class typed twice.
    spellings: dict[str, str] = {}
    for name in (n for n in names if isinstance(n, str)):
        other = spellings.setdefault(_folded(name), name)
        if other != name:
            raise ValueError(f"label_space names one class twice, as {other!r} and {name!r} (they differ only in case, "
                             "spacing, Unicode form or invisible characters)")
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


# Characters that draw nothing and are not spaces: Unicode's default-ignorable code points that are
# not format characters (Cf), which are all dropped too: the combining grapheme joiner, Hangul
# fillers, variation selectors; and the blank braille pattern.
_INVISIBLE = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\ufe00-\ufe0f\uffa0"
                        "\U000e0100-\U000e01ef]")
# Cyrillic and Greek letters drawn like Latin ones: a class written wholly in them reads as the
# Latin class ("сігсӏе" is "circle") yet would be a class of its own.
_LOOK_ALIKES = str.maketrans({
    "\u0430": "a", "\u0433": "r", "\u0441": "c", "\u0435": "e", "\u04bb": "h", "\u0456": "i", "\u0458": "j", "\u04cf": "l",
    "\u043a": "k", "\u043e": "o", "\u0440": "p", "\u0455": "s", "\u0445": "x", "\u0443": "y", "\u0501": "d",
    "\u051b": "q", "\u051d": "w", "\u03b1": "a", "\u03b9": "i", "\u03ba": "k", "\u03bd": "v", "\u03bf": "o",
    "\u03c1": "p", "\u03c5": "u", "\u03c7": "x",
})


def _folded(name: str) -> str:
    """The form two spellings of one class share: Unicode-compatibility normalised (full-width and
    composed letters), without control, format or other invisible characters (zero-width space,
    soft hyphen, variation selectors), case-folded, and without spaces ("tv monitor" is VOC's
    "tvmonitor")."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", name))
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf"))
    return "".join(text.casefold().split())


def _visible(folded: str) -> bool:
    """Whether a folded name draws anything: a letter, digit, mark on one, symbol or punctuation
    (combining marks alone attach to nothing)."""
    return any(not unicodedata.category(ch).startswith("M") for ch in folded)


def _scripts(name: str) -> set[str]:
    """The writing systems of a name's letters (LATIN, CYRILLIC, ...)."""
    return {unicodedata.name(ch, "?").split()[0] for ch in unicodedata.normalize("NFKC", name) if ch.isalpha()}


def check_class_spelling(classes: Sequence[str], label_space: Sequence[str],
                         aliases: Mapping[str, str] | None = None) -> None:
    """Refuse ``classes`` that repeat a class, that differ from each other or from a class of
    ``label_space`` (or one of its ``aliases``: the words a vocabulary writes for a label) only in
    case, spacing, Unicode form or invisible characters, that have no visible letters, or that mix
    writing systems (a Cyrillic "с" in "сircle").

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
    for alias, label in (aliases or {}).items():
        known.setdefault(_folded(alias), label)
    for name in classes:
        if not _visible(_folded(name)):
            raise ValueError(f"class {name!r} has no visible characters")
        if len(_scripts(name)) > 1:
            raise ValueError(f"class {name!r} mixes writing systems ({', '.join(sorted(_scripts(name)))}); a "
                             "look-alike letter from another alphabet would make it a class of its own")
        match = known.get(_folded(name)) or known.get(_folded(name).translate(_LOOK_ALIKES))
        if match is not None and match != name:
            raise ValueError(f"class {name!r} is another spelling of the label space's {match!r} (case, spacing, "
                             f"Unicode form, invisible characters or look-alike letters); write {match!r} (a new free-text class must "
                             "differ by more than that)")
    seen: dict[str, str] = {}
    for name in classes:
        other = seen.setdefault(_folded(name), name)
        if other != name:
            raise ValueError(f"classes {other!r} and {name!r} are spellings of one class (case, spacing, Unicode form "
                             "or invisible characters): name each class once")
