"""Joint image/mask transforms with torchvision's ``transforms(image, target)`` contract.

The same :class:`SegmentationTransform` serves ``torchvision.datasets.VOCSegmentation`` and the
DiffuMask datasets, so their samples are interchangeable inside a ``ConcatDataset``.
"""
from __future__ import annotations

from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentationTransform:
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

    def __call__(self, image, target) -> tuple[torch.Tensor, torch.Tensor]:
        # np.array copies: PIL-backed arrays are read-only and cached samples must stay untouched.
        out = self.compose(image=np.array(image.convert("RGB") if hasattr(image, "convert") else image),
                           mask=np.array(target))
        return out["image"], out["mask"].long()

