"""Validators: each checks one user-given value and returns it in canonical form, or raises an
error naming the value. Every constructor (configs, datasets, augmentation, ToyWorld) checks its
arguments with these, so a bad value fails at construction in the main process, not in a worker."""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


# Every constructor checks its arguments with these, so a bad value is an error naming it at
# construction, in the main process, not a crash in a worker at the first draw.
def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int when it is one (``bool``, ``float`` and ``str`` are not) and ``>= minimum``.

    Raises:
        TypeError: not an integer. ValueError: below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_count_range(name: str, value: Any) -> int | tuple[int, int]:
    """A count >= 1, or a ``(min, max)`` pair of them with min <= max (a list, as JSON gives it,
    becomes a tuple)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return check_int(name, value, minimum=1)
    if len(value) != 2:
        raise ValueError(f"{name} must be a count or a (min, max) pair, got {value!r}")
    low, high = (check_int(name, v, minimum=1) for v in value)
    if low > high:
        raise ValueError(f"{name} must be (min, max) with min <= max, got {value!r}")
    return (low, high)


def check_finite(name: str, value: Any) -> float:
    """``value`` as a float when it is a finite real number (not a ``bool`` nor a ``str``).

    Raises:
        TypeError: not a real number. ValueError: NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` when it is ``True`` or ``False`` (a truthy string is not)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_callable(name: str, value: Any) -> Any:
    """``value`` when it is ``None`` or callable (a transform)."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {value!r} ({type(value).__name__})")
    return value


def check_names(name: str, value: Any) -> tuple[str, ...]:
    """A list or tuple of non-empty strings as a tuple (one string is not a list of names)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of names, got {value!r} ({type(value).__name__})")
    bad = [item for item in value if not isinstance(item, str) or not item.strip()]
    if bad:
        raise TypeError(f"{name} must hold non-empty strings, got {bad[0]!r} in {list(value)!r}")
    return tuple(value)


def check_classes(classes: Any) -> tuple[str, ...]:
    """The classes to generate as a tuple: one name or a list of names."""
    if isinstance(classes, str):
        classes = (classes,)
    return check_names("classes", classes)


def check_size(name: str, value: Any, minimum: int = 1) -> tuple[int, int]:
    """``(height, width)`` from one int for both sides or a pair of ints, each ``>= minimum``
    (numpy ints too, returned as plain ints for JSON and PIL).

    Raises:
        ValueError: naming ``name`` and the value.
    """
    if isinstance(value, numbers.Integral):
        sides = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        sides = tuple(value)
    else:
        sides = ()
    if len(sides) != 2 or any(not isinstance(s, numbers.Integral) or isinstance(s, bool) or s < minimum for s in sides):
        kind = "positive ints" if minimum == 1 else f"ints >= {minimum}"
        raise ValueError(f"{name} must be an int or (height, width) of {kind}, got {value!r}")
    return int(sides[0]), int(sides[1])


def check_probability(name: str, value: Any) -> float:
    """``value`` as a float when it is a probability in [0, 1] (``True``/``False`` are 1 and 0)."""
    # NaN fails both comparisons, so it is refused too.
    if not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1] (or a bool), got {value!r}")
    return float(value)


def check_increasing_pair(name: str, value: Any) -> tuple[float, float]:
    """A ``(low, high)`` pair of finite numbers with ``0 < low <= high`` (a range of factors)."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if not (math.isfinite(high) and 0.0 < low <= high):
        raise ValueError(f"{name} must satisfy 0 < min <= max, got {value!r}")
    return low, high


# Larger than any supported model generates (Sana's 4K models: 4096 px).
MAX_IMAGE_SIDE = 8192


def check_image_size(image_size: int | Sequence[int], spec: Any = None) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair of positive ints, each a multiple of
    :attr:`~ondemand_seg.pipelines.families.ModelSpec.size_multiple` when the model is known
    (what its pipeline and its attention tokens need), of 8 otherwise (every supported VAE's factor)."""
    size = check_size("image_size", image_size)
    if max(size) > MAX_IMAGE_SIDE:
        raise ValueError(f"image_size {image_size!r} is larger than any model generates ({MAX_IMAGE_SIDE} px a side); "
                         "a draw would try to allocate memory for it")
    if spec is not None:
        spec.check_image_size(size)
    elif any(s % 8 for s in size):
        raise ValueError(f"image_size {image_size!r} is not a multiple of 8 on each side (the VAEs of the supported "
                         "families downsample by 8 or more; this model is known only once loaded)")
    return size
