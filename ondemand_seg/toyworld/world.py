"""ToyWorld: procedural images whose segmentation masks are exact by construction.

Every object class owns a saturated hue band and every background is low-saturation, so the truth
can be read back from colour alone (`color_oracle`). That is what lets a text-to-image model
trained on ToyWorld be scored on the images it *generates*, where no true mask exists.

Images are built in HSV and converted to RGB once: object pixels are painted through their shape
mask, so image and mask can never disagree at an edge (no antialiasing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..settings.label_spaces import validate_label_space
from ..settings.validation import check_int, check_size

TOY_CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle", "ring", "cross")

# Hue centre in degrees: red, yellow, green, blue, magenta. Neighbours are >= 60 deg apart, so
# with +-_HUE_JITTER per object the bands stay >= 48 deg apart.
CLASS_HUES: dict[str, float] = {
    "circle": 0.0, "square": 60.0, "triangle": 125.0, "ring": 220.0, "cross": 295.0,
}

_HUE_JITTER = 6.0
_OBJECT_SATURATION = (0.7, 1.0)
_OBJECT_VALUE = (0.6, 1.0)
# The texture's second shade: darker keeps saturation, lighter keeps value; either way every
# object pixel keeps chroma (S * V) >= 0.7 * 0.6 * 0.65 = 0.27, well above the background's 0.15.
_SHADE_FACTOR = 0.65
_BACKGROUND_MAX_SATURATION = 0.15
_BACKGROUND_VALUE = (0.2, 0.95)
_PIXEL_NOISE = 0.015  # relative V noise on every pixel; V noise never changes saturation
_RADIUS_FRACTION = (0.12, 0.28)  # of the short side
# An object may be covered by later ones, but keeps at least this share of its pixels, so the
# caption never names an object that is barely (or not) visible.
_MIN_VISIBLE_FRACTION = 0.5
_MAX_PLACEMENT_TRIES = 64


@dataclass
class ToySample:
    """One ToyWorld image with its exact truth.

    Attributes:
        image: ``uint8`` array ``(H, W, 3)``, RGB.
        mask: ``uint8`` array ``(H, W)`` of class ids into `TOY_CLASSES`, 0 = background.
        caption: e.g. ``"a photo of a circle and a ring"``, naming every class in ``mask``.
        class_names: the classes in caption order, which is drawing order (back to front).
        object_masks: ``bool`` array ``(N, H, W)``, the full unoccluded footprint of each object
            in drawing order; object ``i`` has class ``class_names[i]``.
    """

    image: np.ndarray
    mask: np.ndarray
    caption: str
    class_names: list[str]
    object_masks: np.ndarray | None = None


class ToyWorld:
    """A deterministic, infinite set of ToyWorld samples.

    Args:
        image_size: ``S`` for ``S x S`` images or ``(H, W)``; each side >= 16.
        seed: non-negative int; with the index it fully determines a sample.
        min_objects, max_objects: objects per image, ``1 <= min <= max <= 5``. Classes are drawn
            without replacement, so each object in an image has a distinct class.

    Later objects occlude earlier ones and the mask shows only what is visible, but an object is
    never placed where it would hide more than half of an earlier one: every drawn object stays
    visible, so the caption names exactly the classes in the mask.
    """

    def __init__(self, image_size: int | tuple[int, int] = 64, seed: int = 0,
                 min_objects: int = 1, max_objects: int = 3):
        self.height, self.width = check_size("image_size", image_size, minimum=16)
        self.seed = check_int("seed", seed, minimum=0)
        self.min_objects = check_int("min_objects", min_objects, minimum=1)
        self.max_objects = check_int("max_objects", max_objects, minimum=1)
        num_object_classes = len(TOY_CLASSES) - 1
        if self.max_objects > num_object_classes:
            raise ValueError(
                f"max_objects={max_objects} exceeds the {num_object_classes} object classes; "
                "each object in an image has its own class"
            )
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects={min_objects} is greater than max_objects={max_objects}")

    def sample(self, index: int) -> ToySample:
        """Render sample ``index``: a pure function of ``(seed, index)``."""
        index = check_int("index", index, minimum=0)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, index]))
        h, w = self.height, self.width
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5  # pixel centres

        hue, sat, val = _background(rng, yy, xx)
        mask = np.zeros((h, w), np.uint8)
        owner = np.full((h, w), -1, np.int16)  # index of the object that shows at each pixel
        footprints: list[np.ndarray] = []
        names: list[str] = []

        num_objects = int(rng.integers(self.min_objects, self.max_objects + 1))
        for name in rng.choice(TOY_CLASSES[1:], size=num_objects, replace=False).tolist():
            footprint = self._place(name, rng, yy, xx, owner, footprints)
            if footprint is None:
                continue
            owner[footprint] = len(footprints)
            mask[footprint] = TOY_CLASSES.index(name)
            _paint(rng, name, footprint, yy, xx, hue, sat, val)
            footprints.append(footprint)
            names.append(name)

        val = val * (1.0 + rng.normal(0.0, _PIXEL_NOISE, val.shape))
        image = _hsv_to_rgb(hue, sat, np.clip(val, 0.0, 1.0))
        return ToySample(image=image, mask=mask, caption=_caption(names), class_names=names,
                         object_masks=np.stack(footprints))

    def _place(self, name: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
               owner: np.ndarray, footprints: list[np.ndarray]) -> np.ndarray | None:
        """Draw a footprint for ``name`` that leaves every earlier object visible enough.

        Returns ``None`` if no placement works; with shapes this small against the image that
        does not happen in practice, so the object count stays within bounds.
        """
        short = min(self.height, self.width)
        for _ in range(_MAX_PLACEMENT_TRIES):
            radius = rng.uniform(*_RADIUS_FRACTION) * short
            cy = rng.uniform(radius, self.height - radius)
            cx = rng.uniform(radius, self.width - radius)
            u, v = _rotated(yy - cy, xx - cx, rng.uniform(0.0, 2 * np.pi))
            footprint = _SHAPES[name](u, v, radius, rng)
            if not footprint.any():
                continue
            covered = owner[footprint]
            if all(np.count_nonzero(owner == i) - np.count_nonzero(covered == i)
                   >= _MIN_VISIBLE_FRACTION * np.count_nonzero(f)
                   for i, f in enumerate(footprints)):
                return footprint
        return None


def color_oracle(image: np.ndarray, classes: Sequence[str] = TOY_CLASSES, *,
                 min_chroma: float = 0.2, max_hue_distance: float = 30.0,
                 min_class_fraction: float = 0.002) -> np.ndarray:
    """Label each pixel by its colour alone, as ToyWorld's class hues define it.

    A pixel gets the class whose hue centre is nearest if it is colourful enough for its hue to
    mean something and lies within ``max_hue_distance`` degrees of that centre; otherwise it is
    background. No mask or ToyWorld state is used, so this also labels generated images.

    Colourfulness is chroma, ``max(R, G, B) - min(R, G, B)`` in 0..1 (HSV saturation times
    value), not HSV saturation: in dark pixels saturation blows up on a few levels of noise or
    JPEG ringing, chroma does not. ToyWorld backgrounds have chroma <= 0.15, objects >= 0.27.

    Args:
        image: ``uint8`` array ``(H, W, 3)``, RGB.
        classes: the label space for the output ids; ``classes[0]`` is ``"background"`` and every
            other name must be a ToyWorld class (any subset, any order).
        min_chroma: below this a pixel is background.
        max_hue_distance: degrees; farther from every class hue means background.
        min_class_fraction: a class covering less than this share of the image is treated as
            stray pixels (compression or generation noise) and set to background.

    Returns:
        ``uint8`` array ``(H, W)`` of ids into ``classes``.
    """
    names = validate_label_space(classes)
    unknown = [n for n in names[1:] if n not in CLASS_HUES]
    if unknown:
        raise ValueError(f"color_oracle has no hue for classes {unknown}; known: {list(CLASS_HUES)}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 in 0..255, got dtype {image.dtype}")

    hue, sat, val = _rgb_to_hsv(image)
    centres = np.array([CLASS_HUES[n] for n in names[1:]])
    distance = np.abs(hue[..., None] - centres) % 360.0
    distance = np.minimum(distance, 360.0 - distance)
    nearest = distance.argmin(axis=-1)
    labelled = ((sat * val >= min_chroma)
                & (np.take_along_axis(distance, nearest[..., None], -1)[..., 0] <= max_hue_distance))
    labels = np.where(labelled, nearest + 1, 0)
    stray = np.bincount(labels.ravel(), minlength=len(names)) < min_class_fraction * labels.size
    stray[0] = False
    return np.where(stray[labels], 0, labels).astype(np.uint8)


def _rotated(dy: np.ndarray, dx: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets from a centre expressed in a frame rotated by ``angle`` radians."""
    c, s = np.cos(angle), np.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def _circle(u, v, r, rng):
    return u * u + v * v <= r * r


def _square(u, v, r, rng):
    half = r / np.sqrt(2.0)  # r is the circumradius, as for every shape
    return np.maximum(np.abs(u), np.abs(v)) <= half


def _triangle(u, v, r, rng):
    inside = np.ones(u.shape, bool)
    for k in range(3):  # equilateral: inradius is half the circumradius
        a = np.pi / 2 + k * 2 * np.pi / 3
        inside &= u * np.cos(a) + v * np.sin(a) <= r / 2
    return inside


def _ring(u, v, r, rng):
    inner = r * rng.uniform(0.45, 0.65)
    d2 = u * u + v * v
    return (d2 <= r * r) & (d2 >= inner * inner)


def _cross(u, v, r, rng):
    half_width = r * rng.uniform(0.25, 0.4)
    au, av = np.abs(u), np.abs(v)
    return ((au <= half_width) & (av <= r)) | ((av <= half_width) & (au <= r))


_SHAPES: dict[str, Callable[..., np.ndarray]] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "ring": _ring, "cross": _cross,
}


def _paint(rng: np.random.Generator, name: str, footprint: np.ndarray, yy: np.ndarray,
           xx: np.ndarray, hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> None:
    """Fill ``footprint`` in the HSV planes with a jittered, textured shade of the class hue."""
    h = (CLASS_HUES[name] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 360.0
    s = rng.uniform(*_OBJECT_SATURATION)
    v = rng.uniform(*_OBJECT_VALUE)
    second = _texture(rng, yy, xx)[footprint]
    darker = rng.random() < 0.5
    hue[footprint] = h
    sat[footprint] = np.where(second & ~darker, s * _SHADE_FACTOR, s)
    val[footprint] = np.where(second & darker, v * _SHADE_FACTOR, v)


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: where the second shade goes (plain, stripes or dots)."""
    kind = rng.integers(3)
    period = rng.uniform(0.06, 0.14) * min(yy.shape)
    u, v = _rotated(yy, xx, rng.uniform(0.0, np.pi))
    if kind == 0:
        return np.zeros(yy.shape, bool)
    if kind == 1:
        return (u % period) < period / 2
    du, dv = u % period - period / 2, v % period - period / 2
    return du * du + dv * dv <= (0.3 * period) ** 2


def _background(rng: np.random.Generator, yy: np.ndarray,
                xx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Low-saturation HSV planes, each ``(H, W)`` float: noise, gradient, stripes or clouds."""
    h, w = yy.shape
    base_hue = rng.uniform(0.0, 360.0)
    base_sat = rng.uniform(0.0, 0.12)
    angle = rng.uniform(0.0, 2 * np.pi)
    along = (xx * np.cos(angle) + yy * np.sin(angle)) / np.hypot(h, w) + 0.5  # roughly 0..1
    kind = rng.integers(4)
    if kind == 0:
        val = rng.uniform(0.3, 0.85) + rng.normal(0.0, rng.uniform(0.02, 0.08), (h, w))
    elif kind == 1:
        v0, v1 = rng.uniform(*_BACKGROUND_VALUE, size=2)
        val = v0 + (v1 - v0) * along
    elif kind == 2:
        period = rng.uniform(0.05, 0.25) * min(h, w)
        val = rng.uniform(0.3, 0.8) + rng.uniform(0.04, 0.12) * np.sin(
            2 * np.pi * along * np.hypot(h, w) / period)
    else:
        val = rng.uniform(0.25, 0.5) + rng.uniform(0.2, 0.45) * _smooth_noise(rng, h, w)
    hue = (base_hue + rng.uniform(-40.0, 40.0) * along) % 360.0
    sat = np.clip(base_sat + rng.uniform(-0.03, 0.03) + 0.03 * _smooth_noise(rng, h, w),
                  0.0, _BACKGROUND_MAX_SATURATION)
    return hue, sat, np.clip(val, *_BACKGROUND_VALUE)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int = 4) -> np.ndarray:
    """``(H, W)`` values in 0..1, bilinearly upsampled from a coarse random grid."""
    coarse = rng.random((cells + 1, cells + 1))
    ys, xs = np.linspace(0, cells, h), np.linspace(0, cells, w)
    rows = np.stack([np.interp(xs, np.arange(cells + 1), row) for row in coarse])
    return np.stack([np.interp(ys, np.arange(cells + 1), col) for col in rows.T], axis=1)


def _hsv_to_rgb(hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> np.ndarray:
    """HSV planes ``(H, W)`` (hue in degrees, S and V in 0..1) to ``uint8 (H, W, 3)`` RGB."""
    sector_pos = (hue % 360.0) / 60.0
    chroma = val * sat
    x = chroma * (1.0 - np.abs(sector_pos % 2.0 - 1.0))
    zero = np.zeros_like(chroma)
    sector = np.floor(sector_pos).astype(int) % 6
    r = np.choose(sector, [chroma, x, zero, zero, x, chroma])
    g = np.choose(sector, [x, chroma, chroma, x, zero, zero])
    b = np.choose(sector, [zero, zero, x, chroma, chroma, x])
    rgb = np.stack([r, g, b], axis=-1) + (val - chroma)[..., None]
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _rgb_to_hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``uint8 (H, W, 3)`` RGB to HSV planes ``(H, W)``: hue in degrees, S and V in 0..1."""
    rgb = image.astype(np.float32) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    top, bottom = rgb.max(axis=-1), rgb.min(axis=-1)
    delta = top - bottom
    safe_delta = np.where(delta > 0, delta, 1.0)  # grey pixels: hue is arbitrary, S is 0
    hue = 60.0 * np.select(
        [top == r, top == g],
        [((g - b) / safe_delta) % 6.0, (b - r) / safe_delta + 2.0],
        (r - g) / safe_delta + 4.0,
    )
    sat = np.where(top > 0, delta / np.where(top > 0, top, 1.0), 0.0)
    return hue, sat, top


def _caption(names: Sequence[str]) -> str:
    """``"a photo of a circle, a square and a ring"`` for the given names, in order."""
    phrases = [f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in names]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"a photo of {listed}"
