"""Unlabelled images with tags as a segmentation dataset: ``(image, pseudo-mask)`` pairs under the
same transform contract as the stream, so they mix with real and generated data in a ``ConcatDataset``."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence, Union

import numpy as np
import PIL.Image
import torch
from torchvision.datasets import VisionDataset
from tqdm.auto import tqdm

from ..data.transforms import JointTransform, SegmentationTransform, apply_transforms, joint_transforms
from ..generation.seeding import augment_seed
from ..masks.quality import GateStats
from ..settings.files import read_json
from ..settings.label_spaces import IGNORE_INDEX, voc_palette
from ..settings.validation import check_bool, check_int
from .images import to_rgb_tensor
from .labeler import DiffuMaskLabeler, PseudoLabel, check_tags

Tags = Union[Sequence[Sequence[str]], Callable[[int], Sequence[str]], str, os.PathLike, None]
_PALETTE = voc_palette()


def read_tags(path: str | os.PathLike, length: int, names: Sequence[str] | None = None,
              label_space: Sequence[str] | None = None, classes: Sequence[str] | None = None) -> list[list[str]]:
    """A tags file: UTF-8 JSON, either a list with one list of class names per image (dataset order) or an
    object mapping each image to its list, by its index (as a string) or, when ``names`` gives the
    images' names (an image folder's file names), by its name; every image must have an entry.

    Args:
        length: the number of images. names: their names, in order, for an object keyed by name.
        label_space: when given, every class named must be one of its classes (not its background).
        classes: when given (a command's ``--classes``), every class named must be one of them: a
            tag outside them would be labelled while the export or run says it holds only these.

    Raises:
        FileNotFoundError, ValueError: naming the file and, for a bad entry, the image and the value
            (a file that is not UTF-8 JSON, or not a regular file such as a FIFO, is named too).
    """
    length = check_int("length", length, minimum=0)
    data = read_json(path)
    if isinstance(data, dict):
        keys = [str(i) for i in range(length)] if names is None else [str(i) if str(i) in data else name
                                                                       for i, name in enumerate(names)]
        missing = [key for key in keys if key not in data]
        if missing:
            raise ValueError(f"{path}: no tags for image(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        unknown = sorted(set(data) - set(keys))
        if unknown:
            raise ValueError(f"{path} has tags for {unknown[:10]}{' ...' if len(unknown) > 10 else ''}, not among the "
                             f"{length} images")
        data = [data[key] for key in keys]
    if not isinstance(data, list) or len(data) != length:
        found = f"a list of {len(data)}" if isinstance(data, list) else type(data).__name__
        raise ValueError(f"{path} must hold one list of class names per image ({length}), as a JSON list or an "
                         f"object of index{' or file name' if names is not None else ''}: list; got {found}")
    for i, tags in enumerate(data):
        image = f"image {i}" + (f" ({names[i]})" if names is not None else "")
        if not isinstance(tags, list) or not tags or not all(isinstance(tag, str) for tag in tags):
            raise ValueError(f"{path}: {image} has tags {tags!r}; give a non-empty list of class names")
        bad = [tag for tag in tags if label_space is not None and tag not in label_space[1:]]
        if bad:
            raise ValueError(f"{path}: {image} names {bad[0]!r}, not in the label space; known classes: "
                             f"{', '.join(label_space[1:])}")
        outside = [tag for tag in tags if classes is not None and tag not in classes]
        if outside:
            raise ValueError(f"{path}: {image} names {outside[0]!r}, not among the classes labelled "
                             f"({', '.join(classes)}); add it to the classes or drop the tag")
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
        images: the unlabelled images (a folder of files: :class:`~ondemand_seg.real.images.ImageFolderImages`).
        tags: per image, the classes it contains: a sequence of lists, a function of the index, or
            the path of a JSON tags file (:func:`read_tags`; keyed by index or, for images with
            ``names`` such as a folder's, by file name); ``None`` reads every candidate class
            (the labeller's presence test decides). A sequence or file is checked at construction
            (every entry a non-empty list of label-space names); a function's answers when drawn.
        labeler: the labeller (default: ``DiffuMaskLabeler(model, seed=seed, **settings)``).
        transforms, transform, target_transform: torchvision's meaning; default the stream's
            :class:`~ondemand_seg.data.transforms.SegmentationTransform` at the labeller's image size
            (``augment`` says whether it augments).
        seed: seeds the augmentation of item ``i`` (with ``i``).
    Pseudo-masks are kept once made (per process: each DataLoader worker keeps those it made);
    :meth:`label_all` labels every image in batches up front, :meth:`export` writes them to disk.
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
        # What the tags were, for an export's metadata: a file's path, else how they were given.
        self.tags_source = (str(tags) if isinstance(tags, (str, os.PathLike)) else None if tags is None
                            else "function" if callable(tags) else "list")
        source = ""
        if isinstance(tags, (str, os.PathLike)):
            source = f" in {tags}"
            tags = read_tags(tags, len(images), getattr(images, "names", None))
        elif tags is not None and not callable(tags) and len(tags) != len(images):
            raise ValueError(f"tags has {len(tags)} entries for {len(images)} images")
        self.labeler = labeler if labeler is not None else DiffuMaskLabeler(model, seed=seed, **settings)
        if tags is not None and not callable(tags):
            tags = [check_tags(tags[i], f"tags[{i}]{source}", self.labeler.label_space) for i in range(len(images))]
        self.tags = tags
        self.transforms = joint_transforms(transforms, transform, target_transform,
                                           SegmentationTransform(self.labeler.image_size, train=augment))
        self._labels: dict[int, PseudoLabel] = {}

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

    def label_all(self, batch_size: int = 64, progress: bool = False) -> dict[str, int]:
        """Label every image not yet labelled, ``batch_size`` at a time (``progress``: with a progress
        bar); the labeller's counts."""
        todo = [i for i in range(len(self)) if i not in self._labels]
        with tqdm(total=len(todo), desc="labelling", unit="img", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                self._label(todo[start:start + batch_size])
                bar.update(len(todo[start:start + batch_size]))
        return self.labeler.counts()

    def counts(self) -> dict[str, int]:
        """The quality gate's counts over this dataset's images labelled so far (in this process):
        :class:`~ondemand_seg.masks.quality.GateStats` fields, labelled, accepted and left out by reason."""
        counts = dict.fromkeys(GateStats.FIELDS, 0)
        counts["generated"] = len(self._labels)
        for label in self._labels.values():
            counts["accepted" if label.reason is None else label.reason] += 1
        return counts

    def pseudo_label(self, index: int) -> PseudoLabel:
        """Image ``index``'s :class:`~ondemand_seg.real.labeler.PseudoLabel` (labelled now if it is
        not yet): its mask at the image's own size (``None`` when the quality gate left it out),
        the classes it was labelled with, the absent ones and why it was left out; ``index`` is the
        dataset's."""
        index = self._check_index(index)
        if index not in self._labels:
            self._label([index])
        return self._labels[index]

    def export(self, out: str | os.PathLike, **options: Any) -> dict:
        """Write the pseudo-labelled images into the folder ``out`` in an export format, so that
        :class:`~ondemand_seg.exports.ExportSource` and the datasets' ``from_export`` read them back:
        :func:`~ondemand_seg.exports.pseudo.export_pseudo_labels` (its options; its metadata)."""
        from ..exports.pseudo import export_pseudo_labels

        return export_pseudo_labels(self, out, **options)

    def _label(self, indices: Sequence[int]) -> None:
        # Under the labeller's lock: threads asking for the same item label it once.
        with self.labeler.generator.lock:
            indices = [i for i in indices if i not in self._labels]
            if not indices:
                return
            images = [self._image(i) for i in indices]
            tags = None if self.tags is None else [self._tags(i) for i in indices]
            for i, label in zip(indices, self.labeler.label(images, tags, ids=indices)):
                self._labels[i] = dataclasses.replace(label, index=i)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, Any]]:
        indices = [self._check_index(i) for i in indices]
        todo = list(dict.fromkeys(i for i in indices if i not in self._labels))
        if todo:
            self._label(todo)
        out = []
        for i in indices:
            image = self._image(i)
            label = self._labels[i]
            ids = label.mask if label.mask is not None else np.full(image.shape[1:], IGNORE_INDEX, np.uint8)
            image = PIL.Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
            mask = PIL.Image.fromarray(ids)
            mask.putpalette(_PALETTE)
            out.append(apply_transforms(self.transforms, [(image, mask)], augment_seed(self.seed, i, 0, 0)))
        return out

    def _check_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {index!r}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images")
        return int(index) % len(self)
