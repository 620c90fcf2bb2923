"""Per-class γ from a small labelled set: the paper's finding that the best threshold differs by class.

The labels come from whoever can give them: a person marking a few generated images, or, on
ToyWorld, the colour oracle. The result goes into ``MaskConfig.class_thresholds`` (or the trainer's
``--class-thresholds``).
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch

from ..masks.maps import calibrate_threshold
from .generator import DiffuMaskGenerator
from .seeding import SubStream, calibration_seed

# label_fn(image [H, W, 3] uint8 RGB, class name) -> [H, W] bool truth of that class in the image
LabelFn = Callable[[np.ndarray, str], np.ndarray]


def calibrate_class_thresholds(source: DiffuMaskGenerator, label_fn: LabelFn, n_per_class: int = 20,
                               candidates: torch.Tensor | None = None, batch_size: int = 20) -> dict[str, float]:
    """γ per class of ``source``: the threshold that maximises IoU on ``n_per_class`` labelled samples.

    Each sample is generated from a one-class prompt drawn from the source's vocabulary, with the
    source's mask settings, so refinements the config turns on are calibrated through. Its seeds
    come from the calibration sub-stream (:func:`~ondemand_seg.generation.seeding.calibration_seed`), so no
    calibration image is one the training stream draws. Samples whose truth is empty (the model
    did not draw the object) are skipped.

    Args:
        source: the classes, model and mask settings to calibrate for.
        label_fn: truth of one class in one generated image, ``[H, W]`` bool.
        n_per_class: labelled samples per class.
        candidates: thresholds to try (default :func:`~ondemand_seg.masks.maps.calibrate_threshold`'s).
    Returns:
        ``{class name: γ}`` for every class of ``source`` that had a drawn sample.
    Raises:
        ValueError: ``n_per_class < 1``, or no class had a sample with a non-empty truth.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    jobs = [(name, class_id, k) for name, class_id in zip(source.classes, source.class_ids)
            for k in range(n_per_class)]
    maps: dict[str, list[torch.Tensor]] = {name: [] for name in source.classes}
    truths: dict[str, list[torch.Tensor]] = {name: [] for name in source.classes}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        prompts = [source.class_prompt(random.Random(calibration_seed(source.seed, c, k, SubStream.PROMPT)), [n])
                   for n, c, k in chunk]
        seeds = [calibration_seed(source.seed, c, k, SubStream.IMAGE) for _, c, k in chunk]
        batch = source.generate(prompts, seeds, keep_maps=True)
        images = batch.uint8_images()
        for j, (name, _, _) in enumerate(chunk):
            truth = torch.from_numpy(np.asarray(label_fn(images[j], name), dtype=bool))
            if truth.shape != batch.fused.shape[-2:]:
                raise ValueError(f"label_fn gave a {tuple(truth.shape)} mask for a {tuple(batch.fused.shape[-2:])} image")
            if truth.any():
                maps[name].append(batch.fused[j, 0].float().cpu())
                truths[name].append(truth)
    thresholds = {name: calibrate_threshold(maps[name], truths[name], candidates) for name in source.classes if maps[name]}
    if not thresholds:
        raise ValueError(f"no calibration sample of {list(source.classes)} had a non-empty truth; check label_fn")
    return thresholds
