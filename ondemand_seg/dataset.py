"""DiffuMaskDataset: the map-style twin of the stream, for ``ConcatDataset`` with real data."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .source import RawSample, SampleSource
from .stream import Transform
from .transforms import SegmentationTransform


class DiffuMaskDataset(Dataset):
    """``length`` generated samples; item ``i`` is drawn from ``(seed, i)`` alone, augmentation included.

    Takes the same arguments as :class:`~ondemand_seg.DiffuMaskStream` (``model``, ``classes``,
    ``label_space``, ``image_size``, ``seed``, ``mask``, ``sampler``, ``quality``, ``device``,
    ``prompt_names``) plus ``length``, ``augment`` and ``transform``. Pass the same
    ``SegmentationTransform`` to ``torchvision.datasets.VOCSegmentation(transforms=...)`` and the two
    datasets yield the same format: ``(float [3, H, W], long [H, W])``.

    A DataLoader with ``batch_size`` > 1 fetches through :meth:`__getitems__`, which generates
    the whole batch in one pipeline call. ``cache_size`` > 0 keeps that many generated samples
    (per process) so later epochs do not regenerate them; with ``cache_size >= length``, a single
    index (as ``ConcatDataset`` fetches) generates its whole aligned block of
    ``sampler.batch_size`` indices in one call and keeps them.
    """

    def __init__(self, model, classes: Sequence[str], length: int, augment: bool = True,
                 transform: Transform | None = None, cache_size: int = 0, **options) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.source = SampleSource(model, classes, **options)
        self.length = length
        self.transform = transform or SegmentationTransform(self.source.image_size, train=augment)
        # Items are a pure function of their index, so keeping generated ones changes nothing but
        # speed: later epochs (in persistent workers) reuse them instead of regenerating.
        self.cache_size = cache_size
        self._cache: OrderedDict[int, RawSample] = OrderedDict()

    def __len__(self) -> int:
        return self.length

    def raw(self, indices: Sequence[int]) -> list[RawSample]:
        """The generated samples before transform, with their prompts."""
        for i in indices:
            if not 0 <= i < self.length:
                raise IndexError(f"index {i} out of range for DiffuMaskDataset of length {self.length}")
        missing = [i for i in dict.fromkeys(indices) if i not in self._cache]
        if missing and self.cache_size >= self.length:
            missing = self._with_block_neighbours(missing)
        drawn = dict(zip(missing, self.source.draw(missing))) if missing else {}
        if self.cache_size:
            self._cache.update(drawn)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return [self._cache[i] if i in self._cache else drawn[i] for i in indices]

    def _with_block_neighbours(self, missing: list[int]) -> list[int]:
        """``missing`` widened to the aligned blocks of one pipeline batch that hold them.

        Through ``ConcatDataset`` items arrive one index at a time, and a pipeline call of one image
        costs nearly what a full batch does (2x per image on CPU, far more on a GPU). Items are a
        pure function of their index, so generating a block's neighbours early yields exactly what
        their own fetch would; done only when the cache keeps everything (nothing drawn is wasted).
        """
        block = self.source.sampler_config.batch_size
        wanted = (j for i in missing for j in range(i - i % block, min(i - i % block + block, self.length)))
        return [j for j in dict.fromkeys(wanted) if j not in self._cache]

    def stats(self) -> dict[str, int]:
        """Generated, accepted and rejected-by-reason counts over all workers so far."""
        return self.source.stats.as_dict()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for sample in self.raw(indices):
            if hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(sample.augment_seed(self.source.seed))
            out.append(self.transform(sample.image, sample.mask))
        return out
