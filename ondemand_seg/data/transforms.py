"""Joint image/mask transforms with torchvision's ``transforms(image, target)`` contract, and how
the DiffuMask datasets apply them.

A dataset item before any transform is what ``torchvision.datasets.VOCSegmentation`` yields: a PIL
RGB image and a PIL mode-"P" mask. The datasets take ``transforms`` (joint), ``transform`` (image
only) and ``target_transform`` (target only) with ``VisionDataset``'s meaning and precedence, so
any transform written for VOC runs unchanged on them (:func:`joint_transforms`).

The library's own augmentations are :class:`PairAugmentation` objects: the datasets reseed them
per sample from ``(seed, index)`` and, where they splice, hand them other samples too. Any other
transform runs with torch's and Python's random state seeded the same way, so it is reproducible
too. :class:`SegmentationTransform` serves ``VOCSegmentation`` and the DiffuMask datasets alike.
"""
from __future__ import annotations

import abc
import random
from typing import Any, Callable, Sequence

import albumentations as A
import cv2
import numpy as np
import PIL.Image
import torch
from albumentations.pytorch import ToTensorV2
from torchvision.datasets.vision import StandardTransform

from ..settings.validation import check_callable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

JointTransform = Callable[[Any, Any], tuple[Any, Any]]


class PairAugmentation(abc.ABC):
    """The library's augmentation protocol: a seeded joint transform that may splice samples.

    The datasets call :meth:`set_random_seed` with each serving's seed, then :meth:`apply_many`
    with the served ``(image, target)`` first and, when :attr:`splices` is true, other generated
    samples after it. Called directly (``aug(image, target)``) it augments one pair, as any
    ``transforms(image, target)`` does.
    """

    @abc.abstractmethod
    def set_random_seed(self, seed: int | None) -> None:
        """Reseed every random choice (``None``: nondeterministic)."""

    @abc.abstractmethod
    def apply_many(self, samples: Sequence[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``samples[0]``, possibly spliced with others of ``samples``."""

    @property
    def splices(self) -> bool:
        """Whether :meth:`apply_many` may combine several samples (then datasets pass others)."""
        return False

    def __call__(self, image, target) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply_many([(image, target)])


def joint_transforms(transforms: JointTransform | None, transform: Callable | None,
                     target_transform: Callable | None, default: JointTransform) -> JointTransform:
    """The one joint transform a dataset applies, with ``torchvision.datasets.VisionDataset``'s rule:
    ``transforms`` alone, or ``transform``/``target_transform`` wrapped as a ``StandardTransform``;
    both kinds at once is an error. Nothing given: ``default`` (the library's augmentation)."""
    for name, value in (("transforms", transforms), ("transform", transform), ("target_transform", target_transform)):
        check_callable(name, value)
    has_separate = transform is not None or target_transform is not None
    if transforms is not None and has_separate:
        raise ValueError("Only transforms or transform/target_transform can be passed as argument")
    if isinstance(transform, PairAugmentation):
        raise ValueError(
            f"transform= is image-only (torchvision's meaning), but {type(transform).__name__} transforms image and "
            "mask together: pass it as transforms="
        )
    if has_separate:
        return StandardTransform(transform, target_transform)
    return default if transforms is None else transforms


def apply_transforms(transforms: JointTransform, pairs: Sequence[tuple[Any, Any]], seed: int) -> tuple[Any, Any]:
    """Apply ``transforms`` to ``pairs[0]`` (a PIL image and mask), reproducibly from ``seed``.

    A :class:`PairAugmentation` is reseeded and, if it splices, given every pair; any other
    transform runs under torch's and Python's global random state seeded with ``seed`` (restored
    afterwards), since torchvision's transforms draw from those.
    Raises:
        ValueError: the transformed image and mask differ in size (naming both sizes).
    """
    if isinstance(transforms, PairAugmentation):
        transforms.set_random_seed(seed)
        image, target = transforms.apply_many(pairs if transforms.splices else pairs[:1])
    else:
        python_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                image, target = transforms(*pairs[0])
        finally:
            random.setstate(python_state)
    check_same_size(image, target)
    return image, target


def spatial_size(value: Any) -> tuple[int, int] | None:
    """``(height, width)`` of a PIL image, an ``[..., H, W]`` tensor or an ``[H, W(, C)]`` array;
    ``None`` for anything else (a transform may turn the target into something without a size)."""
    if isinstance(value, PIL.Image.Image):
        return value.height, value.width
    if isinstance(value, torch.Tensor) and value.ndim >= 2:
        return tuple(value.shape[-2:])
    if isinstance(value, np.ndarray) and value.ndim >= 2:
        return tuple(value.shape[:2])
    return None


def check_same_size(image: Any, target: Any) -> None:
    """Raise if a transformed image and its mask no longer cover the same pixels."""
    image_size, target_size = spatial_size(image), spatial_size(target)
    if image_size is not None and target_size is not None and image_size != target_size:
        raise ValueError(
            f"the transforms returned an image of size {image_size[0]}x{image_size[1]} and a mask of size "
            f"{target_size[0]}x{target_size[1]} (height x width); a segmentation transform must resize both "
            "alike (with transforms.v2, wrap the mask as tv_tensors.Mask)"
        )


class SegmentationTransform(PairAugmentation):
    """Albumentations on image and mask together, then torchvision-style normalisation.

    Args:
        size: output ``(height, width)`` or one int.
        train: random scale/crop and horizontal flip when True; a plain resize when False.
        scale: area range of the random crop, relative to the input.
        seed: seed of the augmentation's random state (``None``: nondeterministic).
    Call: ``(image, target)`` with PIL images or arrays (``H×W×3`` uint8, ``H×W`` ids) →
    ``(float [3, H, W] normalized with ImageNet mean/std, long [H, W] ids, 255 ignore)``.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        train: bool = True,
        scale: tuple[float, float] = (0.5, 1.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int | None = None,
    ) -> None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if train:
            geometry = [
                A.RandomResizedCrop(size=(height, width), scale=scale, p=1.0),
                A.HorizontalFlip(p=0.5),
            ]
        else:
            geometry = [A.Resize(height, width, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)]
        self.compose = A.Compose(geometry + [A.Normalize(mean=mean, std=std), ToTensorV2()], seed=seed)

    def set_random_seed(self, seed: int | None) -> None:
        """Reseed the augmentation (per sample, for reproducible streams)."""
        self.compose.set_random_seed(seed)

    def apply_many(self, samples: Sequence[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform ``samples[0]`` (this transform never splices)."""
        image, target = samples[0]
        # np.array copies: PIL-backed arrays are read-only and cached samples must stay untouched.
        out = self.compose(image=np.array(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image),
                           mask=np.array(target))
        return out["image"], out["mask"].long()

