"""The sample source shared by the stream and the map-style dataset: validated settings, a
pipeline loaded lazily in whichever process draws, and sample ``i`` drawn from ``(seed, i)``."""
from __future__ import annotations

import os
import random
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .config import MaskConfig, QualityConfig, SamplerConfig, from_dict
from .label_spaces import VOC_CLASSES, VOC_PROMPT_NAMES, class_ids, validate_label_space
from .prompts import PromptSpec, compose_prompt
from .quality import GateStats, RejectCounter, gate
from .sampler import (
    DiffuMaskSampler, ModelSource, check_image_size, check_model_source, load_pipeline, pick_device, read_preset,
)
from .seeding import derive_seed, shard
from .vocabulary import Vocabulary, load_vocabulary

# Sub-streams of a sample's seed: which one feeds what.
_IMAGE, _PROMPT, _AUGMENT = 0, 1, 2


@dataclass(eq=False)
class RawSample:
    """A generated sample before augmentation.

    image: ``[H, W, 3]`` uint8 RGB; mask: ``[H, W]`` uint8 label ids (255 ignore).
    """

    image: np.ndarray
    mask: np.ndarray
    prompt: str
    index: int
    attempt: int

    def augment_seed(self, base_seed: int, use: int = 0) -> int:
        """Seed of the ``use``-th augmentation of this sample."""
        return derive_seed(base_seed, self.index, self.attempt, _AUGMENT, use)


class SampleSource:
    """Draws accepted samples by index; everything is checked before any model loads."""

    def __init__(
        self,
        model: ModelSource,
        classes: Sequence[str],
        label_space: Sequence[str] | None = None,
        image_size: int | Sequence[int] | None = None,
        seed: int = 0,
        mask: MaskConfig | None = None,
        sampler: SamplerConfig | None = None,
        quality: QualityConfig | None = None,
        device: str | torch.device | None = None,
        prompt_names: dict[str, str] | None = None,
        vocabulary: str | os.PathLike | Vocabulary | None = None,
    ) -> None:
        # A model folder may ship recommended settings; explicit arguments win over them.
        preset = read_preset(model)
        classes = (classes,) if isinstance(classes, str) else tuple(classes)
        if vocabulary is not None:
            # Prompts then come from the vocabulary's synonyms, sub-classes and templates, and any
            # class it lacks is added as free text (zero-shot) after its own classes.
            vocabulary = vocabulary if isinstance(vocabulary, Vocabulary) else load_vocabulary(vocabulary)
            vocabulary = vocabulary.with_classes([c for c in classes if c != "background"])
            label_space = label_space or vocabulary.label_space
        self.vocabulary = vocabulary
        self.label_space = validate_label_space(label_space or preset.get("label_space", VOC_CLASSES))
        self.classes = classes
        self.class_ids = class_ids(self.classes, self.label_space)
        self.mask_config = mask or from_dict(MaskConfig, preset.get("mask", {}))
        unknown = sorted(set(self.mask_config.class_thresholds) - set(self.label_space))
        if unknown:
            raise ValueError(f"class_thresholds names classes outside the label space: {unknown}")
        self.sampler_config = sampler or from_dict(SamplerConfig, preset.get("sampler", {}))
        self.quality_config = quality or from_dict(QualityConfig, preset.get("quality", {}))
        self.image_size = check_image_size(image_size or preset.get("image_size", 512), check_model_source(model))
        self.model = model
        self.seed = int(seed)
        self.device = device
        self.prompt_names = dict(VOC_PROMPT_NAMES if prompt_names is None else prompt_names)
        self.stats = GateStats()
        self._sampler: DiffuMaskSampler | None = None
        self._rejects: RejectCounter | None = None

    def __getstate__(self) -> dict:
        # A worker loads its own pipeline; never ship weights through pickling.
        return {**self.__dict__, "_sampler": None, "_rejects": None}

    @property
    def sampler(self) -> DiffuMaskSampler:
        if self._sampler is None:
            pipeline = load_pipeline(self.model, pick_device(self.device, shard()[0]), self.sampler_config.scheduler)
            self._sampler = DiffuMaskSampler(pipeline, self.mask_config, self.sampler_config)
        return self._sampler

    def prompt(self, index: int, attempt: int = 0) -> PromptSpec:
        """The prompt of sample ``index`` at retry ``attempt``."""
        cfg = self.sampler_config
        rng = random.Random(derive_seed(self.seed, index, attempt, _PROMPT))
        if self.vocabulary is not None:
            picks = rng.sample(range(len(self.classes)), min(cfg.classes_per_prompt, len(self.classes)))
            return self.vocabulary.sample_multi(rng, [self.classes[i] for i in picks], [self.class_ids[i] for i in picks])
        return compose_prompt(rng, self.classes, self.class_ids, cfg.templates, cfg.classes_per_prompt, self.prompt_names)

    def draw(self, indices: Sequence[int]) -> list[RawSample]:
        """Accepted samples for ``indices``, in order, generated in batches.

        A sample the quality gate rejects is redrawn with the next attempt seed; too many
        rejects in a row raise :class:`~ondemand_seg.quality.TooManyRejects`.
        """
        if self._rejects is None:
            self._rejects = RejectCounter(self.quality_config.max_consecutive_rejects)
        pending = deque((int(i), 0) for i in indices)
        done: dict[int, RawSample] = {}
        while pending:
            keys = [pending.popleft() for _ in range(min(self.sampler_config.batch_size, len(pending)))]
            prompts = [self.prompt(i, a) for i, a in keys]
            batch = self.sampler.generate(prompts, [derive_seed(self.seed, i, a, _IMAGE) for i, a in keys], self.image_size)
            reasons = gate(batch.images, batch.masks, self.quality_config)
            self.stats.add(reasons)
            self._rejects.update(reasons)
            images = batch.uint8_images()
            masks = batch.masks.to(torch.uint8).numpy()
            for j, ((index, attempt), reason) in enumerate(zip(keys, reasons)):
                if reason is None:
                    done[index] = RawSample(images[j], masks[j], prompts[j].text, index, attempt)
                else:
                    pending.append((index, attempt + 1))
        return [done[int(i)] for i in indices]
