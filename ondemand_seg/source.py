"""The sample source shared by the stream and the map-style dataset: resolved settings, a
pipeline loaded lazily in whichever process draws, and sample ``i`` drawn from ``(seed, i)``."""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import random
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch

from .config import DiffuMaskConfig, check_classes, check_int, resolve_config
from .generation import DiffuMaskSampler, GeneratedBatch
from .label_spaces import class_ids, voc_palette
from .loading import ModelSource, check_device, load_pipeline, pick_device
from .prompts import PromptSpec
from .quality import GateStats, RejectCounter, gate
from .seeding import SubStream, augment_seed, sample_seed, shard

_PALETTE = voc_palette()

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class RawSample:
    """A generated sample before any transform.

    image: ``[H, W, 3]`` uint8 RGB; mask: ``[H, W]`` uint8 label ids (255 ignore).
    """

    image: np.ndarray
    mask: np.ndarray
    prompt: str
    index: int
    attempt: int

    def augment_seed(self, base_seed: int, use: int = 0) -> int:
        """Seed of the ``use``-th augmentation of this sample."""
        return augment_seed(base_seed, self.index, self.attempt, use)

    def pil(self) -> tuple[PIL.Image.Image, PIL.Image.Image]:
        """The pair as ``VOCSegmentation`` yields one: a PIL RGB image and a mode-"P" mask whose
        palette is VOC's (ids are the label space's; 255 ignore)."""
        mask = PIL.Image.fromarray(self.mask)
        mask.putpalette(_PALETTE)  # an "L" image with a palette becomes "P", ids unchanged
        return PIL.Image.fromarray(self.image), mask


class SharedCount:
    """One count shared by every DataLoader worker (a spawn-context ``multiprocessing.Value``, as
    :class:`~ondemand_seg.quality.GateStats` is), so the main process reads what workers add."""

    def __init__(self) -> None:
        self._value = multiprocessing.get_context("spawn").Value("q", 0)

    def add(self, n: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self) -> int:
        return self._value.value


def concat_batches(parts: Sequence[GeneratedBatch]) -> GeneratedBatch:
    """One :class:`GeneratedBatch` of ``parts`` in order (a field ``None`` in any part is ``None``)."""
    if len(parts) == 1:
        return parts[0]
    fields = {}
    for field in dataclasses.fields(GeneratedBatch):
        values = [getattr(part, field.name) for part in parts]
        fields[field.name] = None if any(v is None for v in values) else torch.cat(values)
    return GeneratedBatch(**fields)


class SampleSource:
    """Draws accepted samples by index; every setting is resolved and checked before any model loads.

    Args:
        model: hub id, local diffusers folder, ``"toy"``, ``"random-weights"``, or a callable.
        classes: classes to generate, each in the label space (with ``vocabulary`` given and no
            ``label_space``, a class the vocabulary lacks is added to it as free text).
        seed: base seed; sample ``i`` depends on ``(seed, i)`` only.
        device: generation device; default CUDA (round-robin over workers) when available, else CPU.
        settings: ``vocabulary``, ``label_space``, ``image_size``, ``mask``, ``sampler``,
            ``quality``: merged over the model's preset by :func:`~ondemand_seg.config.resolve_config`.
    """

    def __init__(self, model: ModelSource, classes: Sequence[str], seed: int = 0,
                 device: str | torch.device | None = None, **settings: Any) -> None:
        seed = check_int("seed", seed, minimum=0)
        check_device(device)
        # resolve_config checks the model before anything else, then the classes.
        self.config: DiffuMaskConfig = resolve_config(model, classes, **settings)
        classes = check_classes(classes)
        if not classes:
            raise ValueError("classes is empty: name at least one class to generate")
        self.classes = classes
        self.class_ids = class_ids(self.classes, self.label_space)
        self.image_size = self.config.image_size
        self.model = model
        self.seed = int(seed)
        self.device = device
        self.stats = GateStats()
        self.oom_retries = SharedCount()
        self.neglected_classes = SharedCount()
        self._generation_batch = self.config.sampler.batch_size
        self._sampler: DiffuMaskSampler | None = None
        self._rejects: RejectCounter | None = None
        # One pipeline and one attention store serve every draw of this object: draws from several
        # threads (two loops over one dataset) take turns, or their captured maps would mix.
        self.lock = threading.RLock()

    @property
    def vocabulary(self):
        return self.config.vocabulary

    @property
    def label_space(self) -> tuple[str, ...]:
        return self.config.label_space

    @property
    def mask_config(self):
        return self.config.mask

    @property
    def sampler_config(self):
        return self.config.sampler

    @property
    def quality_config(self):
        return self.config.quality

    def __getstate__(self) -> dict:
        # A worker loads its own pipeline; never ship weights through pickling.
        state = {**self.__dict__, "_sampler": None, "_rejects": None}
        del state["lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.RLock())

    @property
    def sampler(self) -> DiffuMaskSampler:
        if self._sampler is None:
            pipeline = load_pipeline(self.model, pick_device(self.device, shard()[0]), self.sampler_config.scheduler)
            sampler = DiffuMaskSampler(pipeline, self.mask_config, self.sampler_config)
            # Folders and cached hub ids were checked in resolve_config; a callable's or an uncached
            # hub id's model is known only now.
            sampler.spec.check_sampler(self.sampler_config)
            self._sampler = sampler
        return self._sampler

    def prompt(self, index: int, attempt: int = 0) -> PromptSpec:
        """The prompt of sample ``index`` at retry ``attempt``."""
        rng = random.Random(sample_seed(self.seed, index, attempt, SubStream.PROMPT))
        count = self.sampler_config.classes_per_prompt
        if isinstance(count, tuple):
            count = rng.randint(*count)
        count = min(count, len(self.classes))
        picks = rng.sample(range(len(self.classes)), count)
        return self.class_prompt(rng, [self.classes[i] for i in picks])

    def class_prompt(self, rng: random.Random, names: Sequence[str]) -> PromptSpec:
        """A prompt naming ``names`` in order, drawn from the vocabulary with ``rng``."""
        return self.vocabulary.sample_multi(rng, names, [self.label_space.index(n) for n in names])

    def counts(self) -> dict[str, int]:
        """Generated, accepted and rejected-by-reason counts, ``oom_retries`` (generation calls
        retried with a smaller batch) and ``neglected_classes`` (named classes of generated samples
        labelled as not drawn, ``MaskConfig.neglect_ratio``), over all workers so far."""
        return {**self.stats.as_dict(), "oom_retries": self.oom_retries.value,
                "neglected_classes": self.neglected_classes.value}

    def draw(self, indices: Sequence[int]) -> list[RawSample]:
        """Accepted samples for ``indices``, in order, generated in batches.

        A sample the quality gate rejects is redrawn with the next attempt seed; too many
        rejects in a row raise :class:`~ondemand_seg.quality.TooManyRejects`. Running out of memory
        retries with a smaller batch (see :meth:`_generate`). Nothing is kept from a draw that
        raises, so drawing the same indices again gives the same samples.
        """
        with self.lock:
            return self._draw(indices)

    def _draw(self, indices: Sequence[int]) -> list[RawSample]:
        if self._rejects is None:
            self._rejects = RejectCounter(self.quality_config.max_consecutive_rejects)
        pending = deque((int(i), 0) for i in indices)
        done: dict[int, RawSample] = {}
        while pending:
            keys = [pending.popleft() for _ in range(min(self.sampler_config.batch_size, len(pending)))]
            prompts = [self.prompt(i, a) for i, a in keys]
            seeds = [sample_seed(self.seed, i, a, SubStream.IMAGE) for i, a in keys]
            batch = self._generate(prompts, seeds)
            reasons = gate(batch.images, batch.masks, self.quality_config, finite_maps=batch.finite_maps)
            self.stats.add(reasons)
            if batch.neglected is not None:
                self.neglected_classes.add(int(batch.neglected.sum()))
            self._rejects.update(reasons)
            images = batch.uint8_images()
            masks = batch.masks.to(torch.uint8).numpy()
            for j, ((index, attempt), reason) in enumerate(zip(keys, reasons)):
                if reason is None:
                    done[index] = RawSample(images[j], masks[j], prompts[j].text, index, attempt)
                else:
                    pending.append((index, attempt + 1))
        return [done[int(i)] for i in indices]

    def _generate(self, prompts: Sequence[PromptSpec], seeds: Sequence[int]) -> GeneratedBatch:
        """``sampler.generate`` in calls of at most ``_generation_batch`` images.

        Out of memory, the generation batch is halved for the rest of this process and the call
        retried, down to one image, then the error names the sizes tried. Each image depends on
        its prompt and seed alone (one generator per image), so the samples are those a run that
        never ran out of memory draws.
        """
        parts: list[GeneratedBatch] = []
        tried: list[int] = []
        start = 0
        while start < len(prompts):
            size = self._generation_batch
            try:
                parts.append(self.sampler.generate(prompts[start:start + size], seeds[start:start + size],
                                                   self.image_size))
            except torch.OutOfMemoryError as error:
                tried.append(size)
                if size == 1:
                    raise torch.OutOfMemoryError(
                        f"generation ran out of memory on {self.sampler.device} at every generation batch size "
                        f"tried ({', '.join(map(str, tried))}; configured sampler.batch_size="
                        f"{self.sampler_config.batch_size}), down to one {self.image_size[0]}x{self.image_size[1]} "
                        "image: free memory on that device (other processes or models on it, fewer DataLoader "
                        "workers per GPU) or lower image_size"
                    ) from error
                self._generation_batch = size // 2
                self.oom_retries.add()
                logger.warning("generation ran out of memory at batch size %d on %s; retrying with %d for the "
                               "rest of this process (%s)", size, self.sampler.device, self._generation_batch, error)
                torch.cuda.empty_cache()  # hand the failed call's cached blocks back before the retry
                continue
            start += size
        return concat_batches(parts)
