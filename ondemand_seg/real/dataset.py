"""Unlabelled images with tags as a segmentation dataset: ``(image, pseudo-mask)`` pairs under the
same transform contract as the stream, so they mix with real and generated data in a ``ConcatDataset``."""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence, Union

import numpy as np
import PIL.Image
import torch
from torchvision.datasets import VisionDataset

from ..data.transforms import JointTransform, SegmentationTransform, apply_transforms, joint_transforms
from ..generation.seeding import augment_seed
from ..settings.files import read_json
from ..settings.label_spaces import IGNORE_INDEX, voc_palette
from ..settings.validation import check_bool, check_int
from .images import to_rgb_tensor
from .labeler import DiffuMaskLabeler, check_tags

Tags = Union[Sequence[Sequence[str]], Callable[[int], Sequence[str]], str, os.PathLike, None]
_PALETTE = voc_palette()


def read_tags(path: str | os.PathLike, length: int) -> list[list[str]]:
    """A tags file: UTF-8 JSON, either a list with one list of class names per image (dataset order)
    or an object mapping each image's index (as a string) to its list; every image must have an
    entry. A file that is not one (not JSON, another encoding, a FIFO) is an error naming it."""
    length = check_int("length", length, minimum=0)
    data = read_json(path)
    if isinstance(data, dict):
        missing = [i for i in range(length) if str(i) not in data]
        if missing:
            raise ValueError(f"{path}: no tags for image index(es) {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        data = [data[str(i)] for i in range(length)]
    if not isinstance(data, list) or len(data) != length or not all(isinstance(t, list) for t in data):
        raise ValueError(f"{path} must hold one list of class names per image ({length}), as a JSON list or an "
                         "object of index: list")
    return data


class PseudoLabelledDataset(VisionDataset):
    """``images`` (any map-style dataset or sequence of images) labelled by a :class:`DiffuMaskLabeler`.

    Before any transform, item ``i`` is what ``VOCSegmentation`` yields: a PIL RGB image (the source
    image converted as :func:`~ondemand_seg.real.images.to_rgb_tensor` documents) and a PIL mode-"P"
    mask of label ids with VOC's palette (255 ignore). A source item that is a tuple (torchvision's
    ``(image, target)``) gives its first element. A pseudo-mask the quality gate leaves out is served
    as all ignore (255), so it adds nothing to a loss and indices stay put; ``labeler.counts()``
    counts it. Item ``i``'s noise is drawn from ``(seed, i)`` (the labeller's ``ids``), so its
    pseudo-mask does not depend on which items were labelled with it.

    Args:
        images: the unlabelled images.
        tags: per image, the classes it contains: a sequence of lists, a function of the index, or
            the path of a JSON tags file (:func:`read_tags`); ``None`` reads every candidate class
            (the labeller's presence test decides). A sequence or file is checked at construction
            (every entry a non-empty list of label-space names); a function's answers when drawn.
        labeler: the labeller (default: ``DiffuMaskLabeler(model, seed=seed, **settings)``).
        transforms, transform, target_transform: torchvision's meaning; default the stream's
            :class:`~ondemand_seg.data.transforms.SegmentationTransform` at the labeller's image size
            (``augment`` says whether it augments).
        seed: seeds the augmentation of item ``i`` (with ``i``).
    Pseudo-masks are kept once made (per process: each DataLoader worker keeps those it made);
    :meth:`label_all` labels every image in batches up front.
    """

    def __init__(self, images: Sequence[Any], tags: Tags = None, labeler: DiffuMaskLabeler | None = None, *,
                 transforms: JointTransform | None = None, transform: Callable | None = None,
                 target_transform: Callable | None = None, augment: bool = True, seed: int = 0,
                 model: Any = "toy", **settings: Any) -> None:
        super().__init__(root=None)
        if not (hasattr(images, "__len__") and hasattr(images, "__getitem__")) or isinstance(images, (str, bytes)):
            raise TypeError(f"images must be a map-style dataset or a sequence of images, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError("images is empty: give at least one image to label")
        if labeler is not None and not isinstance(labeler, DiffuMaskLabeler):
            raise TypeError(f"labeler must be a DiffuMaskLabeler, got {type(labeler).__name__}")
        self.seed = check_int("seed", seed, minimum=0)
        check_bool("augment", augment)
        self.images = images
        source = ""
        if isinstance(tags, (str, os.PathLike)):
            source = f" in {tags}"
            tags = read_tags(tags, len(images))
        elif tags is not None and not callable(tags) and len(tags) != len(images):
            raise ValueError(f"tags has {len(tags)} entries for {len(images)} images")
        self.labeler = labeler if labeler is not None else DiffuMaskLabeler(model, seed=seed, **settings)
        if tags is not None and not callable(tags):
            tags = [check_tags(tags[i], f"tags[{i}]{source}", self.labeler.label_space) for i in range(len(images))]
        self.tags = tags
        self.transforms = joint_transforms(transforms, transform, target_transform,
                                           SegmentationTransform(self.labeler.image_size, train=augment))
        self._masks: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.images)

    def _image(self, index: int) -> torch.Tensor:
        item = self.images[index]
        if isinstance(item, tuple):
            item = item[0]
        return to_rgb_tensor(item, f"images[{index}]")

    def _tags(self, index: int) -> Sequence[str] | None:
        if self.tags is None:
            return None
        return self.tags(index) if callable(self.tags) else self.tags[index]

    def label_all(self, batch_size: int = 64) -> dict[str, int]:
        """Label every image not yet labelled, ``batch_size`` at a time; the labeller's counts."""
        todo = [i for i in range(len(self)) if i not in self._masks]
        for start in range(0, len(todo), batch_size):
            self._label(todo[start:start + batch_size])
        return self.labeler.counts()

    def _label(self, indices: Sequence[int]) -> None:
        # Under the labeller's lock: threads asking for the same item label it once.
        with self.labeler.generator.lock:
            indices = [i for i in indices if i not in self._masks]
            if not indices:
                return
            images = [self._image(i) for i in indices]
            tags = None if self.tags is None else [self._tags(i) for i in indices]
            for i, image, label in zip(indices, images, self.labeler.label(images, tags, ids=indices)):
                mask = label.mask if label.mask is not None else np.full(image.shape[1:], IGNORE_INDEX, np.uint8)
                self._masks[i] = mask

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, Any]]:
        indices = [self._check_index(i) for i in indices]
        todo = list(dict.fromkeys(i for i in indices if i not in self._masks))
        if todo:
            self._label(todo)
        out = []
        for i in indices:
            image = PIL.Image.fromarray((self._image(i) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
            mask = PIL.Image.fromarray(self._masks[i])
            mask.putpalette(_PALETTE)
            out.append(apply_transforms(self.transforms, [(image, mask)], augment_seed(self.seed, i, 0, 0)))
        return out

    def _check_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {index!r}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images")
        return int(index) % len(self)
