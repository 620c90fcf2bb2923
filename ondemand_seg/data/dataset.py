"""DiffuMaskDataset: the map-style twin of the stream, for ``ConcatDataset`` with real data."""
from __future__ import annotations

import operator
import os
import warnings
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

import torch
from torchvision.datasets import VisionDataset

from ..generation.generator import DiffuMaskGenerator, RawSample
from ..pipelines.builtin import ModelSource
from ..settings.config import GeneratorConfig, MaskConfig, QualityConfig
from ..settings.validation import check_bool, check_int
from .stream import splice_partners
from .transforms import (
    JointTransform,
    PairAugmentation,
    SegmentationTransform,
    apply_transforms,
    joint_transforms,
)


class DiffuMaskDataset(VisionDataset):
    """``length`` generated samples; item ``i`` is drawn from ``(seed, i)`` alone, augmentation included.

    Takes the stream's arguments (``model``, ``classes``, ``seed``, ``device``, ``vocabulary``,
    ``label_space``, ``image_size``, ``mask``, ``generator``, ``quality``; see
    :class:`~ondemand_seg.DiffuMaskStream`) plus ``length`` and ``cache_size``, and torchvision's
    ``transforms`` / ``transform`` / ``target_transform`` with ``VisionDataset``'s meaning. Before
    any transform an item is what ``VOCSegmentation`` yields (a PIL RGB image and a PIL mode-"P"
    mask), so one transform serves both inside a ``ConcatDataset``.

    A DataLoader with ``batch_size`` > 1 fetches through :meth:`__getitems__`, which generates
    the whole batch in one pipeline call. ``cache_size`` > 0 keeps that many generated samples
    (per process) so later epochs do not regenerate them; with ``cache_size >= length``, a single
    index (as ``ConcatDataset`` fetches) generates its whole aligned block of
    ``generator.batch_size`` indices in one call and keeps them.

    Splicing (a :class:`PairAugmentation` whose ``splices`` is true, such as
    :class:`~ondemand_seg.DiffuMaskAugment`) tiles item ``i`` with other items of its generation
    block, picked from ``(seed, i)``: the block is generated with it, and kept when
    ``cache_size >= length``.

    :meth:`from_export` reads an export's samples instead of generating them.
    """

    def __init__(self, model: ModelSource, classes: Sequence[str], length: int, augment: bool = True,
                 transforms: JointTransform | None = None, transform: Callable | None = None,
                 target_transform: Callable | None = None, cache_size: int = 0, seed: int = 0,
                 device: str | torch.device | None = None, vocabulary: Any = None,
                 label_space: Sequence[str] | None = None, image_size: int | Sequence[int] | None = None,
                 mask: MaskConfig | Mapping[str, Any] | None = None,
                 generator: GeneratorConfig | Mapping[str, Any] | None = None,
                 quality: QualityConfig | Mapping[str, Any] | None = None) -> None:
        length = check_int("length", length, minimum=1)
        cache_size = check_int("cache_size", cache_size, minimum=0)
        check_bool("augment", augment)
        super().__init__(root=None)
        source = DiffuMaskGenerator(model, classes, seed, device, vocabulary=vocabulary, label_space=label_space,
                                    image_size=image_size, mask=mask, generator=generator, quality=quality)
        self._serve(source, 0, length, augment, transforms, transform, target_transform, cache_size)

    @classmethod
    def from_export(cls, export: str | os.PathLike, length: int | None = None, augment: bool = True,
                    transforms: JointTransform | None = None, transform: Callable | None = None,
                    target_transform: Callable | None = None, cache_size: int = 0,
                    seed: int | None = None) -> "DiffuMaskDataset":
        """The items of an export folder (``ondemand_seg.export``, any format) instead of generated
        ones: no model is loaded, and ``dataset.source`` is an :class:`~ondemand_seg.exports.ExportSource`.

        Item ``i`` is the export's sample ``start + i`` (``start``: the export's first index), with
        the augmentation the live dataset gives it: with ``seed=None`` (the export's seed) and the
        same transforms, an export from index 0 gives what the live dataset of the export's settings
        gives, exactly with PNG images, up to JPEG's loss otherwise.

        Args:
            length: items, at most the export's size (default: all of it).
            seed: base seed of the augmentation (``None``: the export's).

        Raises:
            ExportError: ``export`` holds no complete export. ValueError: ``length`` is more than
                the export holds, naming its size; a bad argument, named.
        """
        from ..exports.reader import ExportSource

        source = ExportSource(export, seed)
        length = len(source) if length is None else check_int("length", length, minimum=1)
        if length > len(source):
            raise ValueError(f"length={length} is more than export {source.root} holds: {len(source)} samples "
                             f"({source.indices.start} to {source.indices.stop - 1})")
        cache_size = check_int("cache_size", cache_size, minimum=0)
        check_bool("augment", augment)
        dataset = cls.__new__(cls)
        VisionDataset.__init__(dataset, root=None)
        dataset._serve(source, source.indices.start, length, augment, transforms, transform, target_transform,
                       cache_size)
        return dataset

    def _serve(self, source: Any, first: int, length: int, augment: bool, transforms: JointTransform | None,
               transform: Callable | None, target_transform: Callable | None, cache_size: int) -> None:
        """Serve ``length`` items of ``source``, item ``i`` its sample ``first + i``."""
        self.source = source
        self._first = first
        self.length = length
        self.transforms = joint_transforms(transforms, transform, target_transform,
                                           SegmentationTransform(self.source.image_size, train=augment))
        self.splicing = isinstance(self.transforms, PairAugmentation) and self.transforms.splices
        if self.splicing and cache_size < length:
            warnings.warn(
                f"splicing tiles each item with items of its generation block; with cache_size={cache_size} < "
                f"length={length} a block may be generated again for each of its items (cache_size={length} keeps all)",
                stacklevel=3,  # the caller of __init__ or from_export
            )
        # Items are a pure function of their index, so keeping generated ones changes nothing but
        # speed: later epochs (in persistent workers) reuse them instead of regenerating.
        self.cache_size = cache_size
        self._cache: OrderedDict[int, RawSample] = OrderedDict()

    def extra_repr(self) -> str:
        return (f"Model: {self.source.model!r}\nClasses: {list(self.source.classes)}\nLength: {self.length}\n"
                f"Seed: {self.source.seed}")

    @property
    def config(self):
        """The resolved settings (:class:`~ondemand_seg.settings.config.DiffuMaskConfig`)."""
        return self.source.config

    def __len__(self) -> int:
        return self.length

    def raw(self, indices: Sequence[int]) -> list[RawSample]:
        """The generated samples before any transform, with their prompts."""
        indices = self._indices(indices)
        samples = self._fetch(indices)
        return [samples[i] for i in indices]

    def _indices(self, indices: Sequence[Any]) -> list[int]:
        """``indices`` as ints: anything with ``__index__`` (numpy ints, one-element integer tensors)."""
        if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
            raise TypeError(f"indices must be a sequence of ints, got {indices!r} ({type(indices).__name__})")
        out = []
        for i in indices:
            if isinstance(i, bool):  # an int to Python, but never a sample's position
                raise TypeError(f"DiffuMaskDataset indices must be integers, got {i!r} (bool)")
            try:
                i = operator.index(i)
            except TypeError:
                raise TypeError(f"DiffuMaskDataset indices must be integers, got {i!r} ({type(i).__name__})") from None
            if not 0 <= i < self.length:
                raise IndexError(f"index {i} out of range for DiffuMaskDataset of length {self.length}")
            out.append(i)
        return out

    def _fetch(self, indices: Sequence[int], with_blocks: bool = False) -> dict[int, RawSample]:
        """Samples of ``indices`` (and, with ``with_blocks``, of their generation blocks) by index."""
        with self.source.lock:  # the cache is read and evicted as one step, whatever other threads do
            return self._fetch_locked(indices, with_blocks)

    def _fetch_locked(self, indices: Sequence[int], with_blocks: bool) -> dict[int, RawSample]:
        wanted = self._blocks(indices) if with_blocks else list(dict.fromkeys(indices))
        missing = [i for i in wanted if i not in self._cache]
        if missing and self.cache_size >= self.length:
            missing = [i for i in self._blocks(missing) if i not in self._cache]
        drawn = dict(zip(missing, self.source.samples([self._first + i for i in missing]))) if missing else {}
        found = {i: self._cache[i] for i in wanted if i in self._cache}
        if self.cache_size:
            self._cache.update(drawn)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return {**found, **drawn}

    def _blocks(self, indices: Sequence[int]) -> list[int]:
        """``indices`` widened to the aligned blocks of one pipeline batch that hold them.

        Through ``ConcatDataset`` items arrive one index at a time, and a pipeline call of one image
        costs nearly what a full batch does. Items are a pure function of their index, so
        generating a block's neighbours early yields exactly what their own fetch would; done when
        the cache keeps everything (nothing drawn is wasted) or when splicing needs the block.
        """
        block = self.source.generator_config.batch_size
        wanted = (j for i in indices for j in range(i - i % block, min(i - i % block + block, self.length)))
        return list(dict.fromkeys(wanted))

    def stats(self) -> dict[str, int]:
        """Generated, accepted and rejected-by-reason counts, ``oom_retries`` (generation calls
        retried with a smaller batch after running out of memory) and ``neglected_classes`` (named
        classes labelled as not drawn), over all workers so far."""
        return self.source.counts()

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, Any]]:
        indices = self._indices(indices)
        samples = self._fetch(indices, with_blocks=self.splicing)
        out = []
        for i in indices:
            sample = samples[i]
            seed = sample.augment_seed(self.source.seed)
            pairs = [sample]
            if self.splicing:
                block = [samples[j] for j in self._blocks([i]) if j != i]
                pairs += splice_partners(sample, block, seed)
            out.append(apply_transforms(self.transforms, [s.pil() for s in pairs], seed))
        return out
