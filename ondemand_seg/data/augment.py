"""DiffuMask's training augmentations on image and mask together: splicing 2-4 synthetic samples
into one mosaic, scale jitter, horizontal flip, perspective, occlusion and Gaussian blur.

Every pixel an augmentation invents (padding, an occluder, the area outside a warp) is labelled
255 (ignore) in the mask, never background, so the model is not taught that padding is background.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from ..generation.seeding import splice_generator
from ..settings.label_spaces import IGNORE_INDEX
from ..settings.validation import check_increasing_pair, check_probability, check_size
from .transforms import IMAGENET_MEAN, IMAGENET_STD, PairAugmentation

Pair = tuple[np.ndarray, np.ndarray]

_PROBABILITIES = ("splice", "blur", "occlusion", "perspective", "flip")
# Where a mosaic's split falls, as a fraction of the side: keeps every tile at least 30 % wide/tall.
_SPLIT_RANGE = (0.3, 0.7)
# Resizing masks with NEAREST_EXACT samples pixel centres as the image's interpolation does; plain
# NEAREST samples top-left corners and shifts the mask up to half a source pixel against the image.
_RESIZE_MASK = cv2.INTER_NEAREST_EXACT


@dataclass
class AugmentConfig:
    """Which augmentations run, and how often; each one is off at probability 0 (or ``None``).

    splice: probability that :meth:`DiffuMaskAugment.apply_many` tiles several samples into one.
    splice_max: most samples in one mosaic, 2-4.
    splice_fit: how a sample fills its tile: ``"crop"`` (default) cuts a random tile-sized window
        from the sample at the scale an unspliced sample has (objects keep their size and shape;
        some are cut by the tile border); ``"whole"`` resizes the whole sample into the tile (the
        paper's splicing; objects shrink and change aspect with the tile). Real objects keep their
        scale, so ``"crop"`` keeps training images closer to real ones.
    blur: probability of a Gaussian blur (sigma 0.5-1.5 px; image only, the mask is unchanged).
    occlusion: probability of 1-3 rectangles of random colour, each 10-30 % of a side (mask 255).
    perspective: probability of a perspective warp that keeps the whole image (outside it: mask 255).
    scale_jitter: ``(min, max)`` zoom factor, then a random crop or padding (mask 255) back to size;
        ``None`` for no jitter.
    flip: probability of a horizontal flip.
    """

    splice: float = 0.5
    splice_max: int = 4
    splice_fit: str = "crop"
    blur: float = 0.3
    occlusion: float = 0.3
    perspective: float = 0.3
    scale_jitter: tuple[float, float] | None = (0.75, 1.25)
    flip: float = 0.5

    def __post_init__(self) -> None:
        for name in _PROBABILITIES:
            setattr(self, name, check_probability(name, getattr(self, name)))
        splice_max = self.splice_max
        if isinstance(splice_max, bool) or not isinstance(splice_max, Integral) or not 2 <= splice_max <= 4:
            raise ValueError(f"splice_max must be an int from 2 to 4, got {self.splice_max!r}")
        if self.splice_fit not in ("whole", "crop"):
            raise ValueError(f"splice_fit must be 'whole' or 'crop', got {self.splice_fit!r}")
        if self.scale_jitter is not None:
            self.scale_jitter = check_increasing_pair("scale_jitter", self.scale_jitter)

    @classmethod
    def off(cls) -> "AugmentConfig":
        """Every augmentation disabled: only resizing to the output size and normalisation remain."""
        return cls(splice=0.0, blur=0.0, occlusion=0.0, perspective=0.0, scale_jitter=None, flip=0.0)


class DiffuMaskAugment(PairAugmentation):
    """DiffuMask's augmentations with :class:`~ondemand_seg.transforms.SegmentationTransform`'s contract.

    Args:
        size: output ``(height, width)`` or one int; each side >= 2.
        config: which augmentations run (default :class:`AugmentConfig()`).
        mean, std: normalisation of the output image.
        seed: seed of the random state (``None``: nondeterministic); see :meth:`set_random_seed`.
    Call: ``(image, target)`` with PIL images or uint8 arrays (``h×w×3`` RGB, ``h×w`` ids) of any
    size → ``(float [3, H, W] normalized, long [H, W] ids, 255 ignore)``. A single sample is never
    spliced; :meth:`apply_many` is the call that can.

    As a :class:`~ondemand_seg.transforms.PairAugmentation` the datasets reseed it per serving and
    pass the served sample first and a few others after it (the stream: other cached samples; the
    map-style dataset: other items of the same generation block)::

        augment.set_random_seed(seed)
        image, mask = augment.apply_many([(served_image, served_mask), (other_image, other_mask), ...])

    The result depends only on the seed and the samples given, so the datasets stay reproducible
    as long as they pick the others deterministically (they do, from the serving's seed).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        config: AugmentConfig | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int | None = None,
    ) -> None:
        self.size = check_size("size", size, minimum=2)
        self.config = config if config is not None else AugmentConfig()
        ops = _single_image_ops(self.config, *self.size)
        self.compose = A.Compose(ops + [A.Normalize(mean=mean, std=std), ToTensorV2()], seed=seed)
        self.rng = splice_generator(seed)

    def set_random_seed(self, seed: int | None) -> None:
        """Reseed every random choice, splicing included (per sample, for reproducible streams)."""
        self.compose.set_random_seed(seed)
        self.rng = splice_generator(seed)

    @property
    def splices(self) -> bool:
        return self.config.splice > 0

    def apply_many(self, samples: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """Splice (with probability ``config.splice``) then augment; otherwise augment ``samples[0]``.

        A mosaic holds ``samples[0]`` and 1 to ``splice_max - 1`` others drawn at random from the rest.
        Args: ``samples``: ``(image, mask)`` pairs as accepted by ``__call__``, the served one first.
        Returns: image float ``[3, H, W]`` normalized, mask long ``[H, W]`` ids (255 ignore).
        """
        if not samples:
            raise ValueError("apply_many needs at least one (image, mask) sample")
        pairs = [_as_pair(image, mask) for image, mask in samples]
        image, mask = self._maybe_splice(pairs)
        out = self.compose(image=image, mask=mask)
        return out["image"], out["mask"].long()

    def _maybe_splice(self, pairs: list[Pair]) -> Pair:
        if len(pairs) < 2 or not self.rng.random() < self.config.splice:
            return pairs[0]
        count = int(self.rng.integers(2, min(self.config.splice_max, len(pairs)) + 1))
        others = 1 + self.rng.choice(len(pairs) - 1, size=count - 1, replace=False)
        return self.splice([pairs[0]] + [pairs[i] for i in others], self.rng)

    def splice(self, samples: Sequence[Pair], rng: np.random.Generator) -> Pair:
        """Tile 2-4 samples into one mosaic of the output size (``config.splice_fit`` says how each
        fills its tile: a window at the unspliced scale, or the whole sample resized).

        Two samples sit side by side; three or four share a 2×2 grid (with three, one sample spans a
        full row or column). Split points fall in the middle 40 % of each side, and which sample takes
        which tile is random. Masks are resized with nearest, so labels stay ids, and every mosaic
        pixel comes from a sample (no ignore is added).

        Albumentations' ``Mosaic`` is not used: its layout is a fixed 2×2 grid of output-sized cells
        seen through a random window (a tile can be a sliver, and two samples never sit side by
        side), and it has no whole-sample mode, the paper's splicing, which stays measurable here.

        Args:
            samples: 2-4 ``(image [h, w, 3] uint8, mask [h, w] uint8)`` pairs, sizes may differ.
            rng: the generator that draws the layout.
        Returns: image ``[H, W, 3]`` uint8 and mask ``[H, W]`` uint8.
        """
        if not 2 <= len(samples) <= 4:
            raise ValueError(f"splice takes 2 to 4 samples, got {len(samples)}")
        height, width = self.size
        boxes = _tile_boxes(len(samples), height, width, rng)
        mosaic = np.zeros((height, width, 3), dtype=np.uint8)
        mosaic_mask = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
        for sample, box in zip(samples, [boxes[i] for i in rng.permutation(len(boxes))]):
            image, mask = _as_pair(*sample)
            top, bottom, left, right = box
            if self.config.splice_fit == "crop":
                tile = self._window(image, mask, bottom - top, right - left, rng)
            else:
                resize = A.Resize(bottom - top, right - left, interpolation=cv2.INTER_AREA,
                                  mask_interpolation=_RESIZE_MASK)
                tile = resize(image=image, mask=mask)
            mosaic[top:bottom, left:right] = tile["image"]
            mosaic_mask[top:bottom, left:right] = tile["mask"]
        return mosaic, mosaic_mask


    def _window(self, image: np.ndarray, mask: np.ndarray, height: int, width: int, rng: np.random.Generator) -> dict:
        """A random ``height×width`` window of the sample resized to the output size, as an unspliced
        sample would be (same interpolation), so spliced objects keep that scale."""
        full = A.Resize(*self.size, interpolation=cv2.INTER_LINEAR, mask_interpolation=_RESIZE_MASK)(image=image, mask=mask)
        top = int(rng.integers(0, self.size[0] - height + 1))
        left = int(rng.integers(0, self.size[1] - width + 1))
        return {"image": full["image"][top : top + height, left : left + width],
                "mask": full["mask"][top : top + height, left : left + width]}


def _single_image_ops(config: AugmentConfig, height: int, width: int) -> list[A.BasicTransform]:
    """Resize to ``(height, width)``, then the enabled augmentations.

    Geometry comes first so that occluders stay axis-aligned rectangles of the final image, and blur
    comes last so that it softens occluder edges like real defocus would.
    """
    linear, nearest, constant = cv2.INTER_LINEAR, _RESIZE_MASK, cv2.BORDER_CONSTANT
    ops = [A.Resize(height, width, interpolation=linear, mask_interpolation=nearest)]
    if config.scale_jitter is not None:
        low, high = config.scale_jitter
        ops += [
            A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=linear, mask_interpolation=nearest, p=1.0),
            A.RandomCrop(height, width, pad_if_needed=True, pad_position="random", border_mode=constant,
                         fill=0, fill_mask=IGNORE_INDEX),
        ]
    ops += [
        A.HorizontalFlip(p=config.flip),
        # fit_output keeps the whole warped image in view instead of cropping into it. A warp maps
        # pixel centres for image and mask alike, so plain NEAREST has no offset here.
        A.Perspective(scale=(0.05, 0.1), fit_output=True, interpolation=linear, mask_interpolation=cv2.INTER_NEAREST,
                      border_mode=constant, fill=0, fill_mask=IGNORE_INDEX, p=config.perspective),
        A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.3), hole_width_range=(0.1, 0.3),
                        fill="random_uniform", fill_mask=IGNORE_INDEX, p=config.occlusion),
        A.GaussianBlur(sigma_limit=(0.5, 1.5), p=config.blur),
    ]
    return [op for op in ops if op.p > 0]


def _tile_boxes(count: int, height: int, width: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """``count`` boxes ``(top, bottom, left, right)`` that partition a ``height×width`` canvas."""
    x = _split(width, rng)
    if count == 2:
        return [(0, height, 0, x), (0, height, x, width)]
    y = _split(height, rng)
    quadrants = [(0, y, 0, x), (0, y, x, width), (y, height, 0, x), (y, height, x, width)]
    if count == 4:
        return quadrants
    # Three samples: merge two neighbouring quadrants (a row or a column) into one tile.
    first, second = ((0, 1), (2, 3), (0, 2), (1, 3))[int(rng.integers(4))]
    merged = (quadrants[first][0], quadrants[second][1], quadrants[first][2], quadrants[second][3])
    return [merged] + [box for i, box in enumerate(quadrants) if i not in (first, second)]


def _split(length: int, rng: np.random.Generator) -> int:
    return int(np.clip(round(length * rng.uniform(*_SPLIT_RANGE)), 1, length - 1))


def _as_pair(image, mask) -> Pair:
    """``image`` as ``[h, w, 3]`` uint8 RGB and ``mask`` as ``[h, w]`` uint8, both copied."""
    # Copies: PIL-backed arrays are read-only, albumentations may write in place, and cached
    # samples must stay untouched.
    image = np.array(image.convert("RGB") if hasattr(image, "convert") else image)
    mask = np.array(mask)
    if image.dtype != np.uint8 or mask.dtype != np.uint8:
        raise ValueError(f"image and mask must be uint8, got {image.dtype} and {mask.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(f"expected image [h, w, 3] and mask [h, w], got {image.shape} and {mask.shape}")
    return image, mask
