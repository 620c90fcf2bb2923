"""Mask recipes scored on attention recorded once: generate ToyWorld samples with every layer-head's
map and the self-attention kept, then run the library's mask math (``masks_from_attention``) on the
kept recordings under any number of :class:`MaskConfig` variants, scored against the colour oracle.

A recipe's figure is the one ``measure_mask_quality`` gives for it (same prompts, seeds, images and
IoU counts: ``diffumask`` excludes the ignore band, ``band_as_miss`` counts it as missed object),
without generating the images again for each recipe. Only settings read at capture time
(``token_rescaling``, ``timestep_window``, ``map_source``, ``joint_softmax``) need a recording of
their own. A module, not a script: ``benchmarks/mask_recipes.py --repairs`` and
``benchmarks/multi_class_prompts.py --repairs`` import it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Recording:
    """One generation's kept attention, per pipeline call: ``(captured, images [B, 3, H, W],
    class_ids [B, K], class names)``; ``truths`` ``[B, K, H, W]`` bool, the oracle's mask of each slot's
    class; ``config``: the resolved mask settings the recording was made with."""

    calls: list
    truths: list
    config: object
    classes: tuple


@contextlib.contextmanager
def kept_attention():
    """Inside, every generator call also appends its captured attention, images, class ids and names
    to the yielded list (the generator hands them to ``masks_from_attention``; wrapping that one
    function keeps the generator's own code path untouched)."""
    from ondemand_seg.generation import generator as module

    kept: list = []
    original = module.masks_from_attention

    def keep(captured, images, class_ids, class_names, config):
        kept.append((captured, images.float().cpu(), class_ids.cpu(), [list(n) for n in class_names]))
        return original(captured, images, class_ids, class_names, config)

    module.masks_from_attention = keep
    try:
        yield kept
    finally:
        module.masks_from_attention = original


def record(model, n: int, seed: int, capture: dict, prompt_classes: int = 1, generator: dict | None = None) -> Recording:
    """Generate ``n`` samples as ``measure_mask_quality`` does (sample ``i``: class ``i mod C``, seed
    ``evaluation_seed(seed, i)``; with ``prompt_classes`` 2, classes ``i mod C`` and the next one after
    a random offset, as ``multi_class_prompts.py`` does) with per-layer-head sums and
    self-attention recorded; ``capture`` are MaskConfig fields set at capture."""
    from ondemand_seg.generation.generator import DiffuMaskGenerator
    from ondemand_seg.generation.seeding import evaluation_seed
    from ondemand_seg.settings.resolve import resolve_config
    from ondemand_seg.toyworld import TOY_CLASSES, color_oracle

    classes = TOY_CLASSES[1:]
    # aggregation other than "mean" makes the generator keep one sum per layer-head.
    mask = {"aggregation": "agreement", **capture}
    source = DiffuMaskGenerator(model, classes, label_space=TOY_CLASSES, seed=seed, mask=mask,
                                generator=generator or {})
    if source.mask_config.self_attention_factor is None and source.spec.self_factors:
        source = DiffuMaskGenerator(model, classes, label_space=TOY_CLASSES, seed=seed, generator=generator or {},
                                    mask={**mask, "self_attention_factor": min(source.spec.self_factors)})
    batch_size = source.generator_config.batch_size
    rng = random.Random(seed)
    names = []
    for i in range(n):
        first = classes[i % len(classes)]
        names.append([first] if prompt_classes == 1 else [first, classes[(i + rng.randrange(1, len(classes))) % len(classes)]])
    calls, truths = [], []
    with kept_attention() as kept:
        for start in range(0, n, batch_size):
            indices = range(start, min(start + batch_size, n))
            prompts = [source.class_prompt(random.Random(0), names[i]) for i in indices]
            batch = source.generate(prompts, [evaluation_seed(seed, i) for i in indices])
            oracle = torch.from_numpy(np.stack([color_oracle(image) for image in batch.uint8_images()]))
            captured, images, ids, slot_names = kept[-1]
            truths.append(oracle[:, None] == ids[:, :, None, None])
            calls.append(kept[-1])
            kept.clear()
    # The aggregation and self-attention were set only to keep what the recipes need: recipes start
    # from the settings asked for (the model preset's unless ``capture`` names them).
    asked = resolve_config(model, mask=capture).mask
    config = dataclasses.replace(source.capturing.mask_config_for(source.image_size), aggregation=asked.aggregation,
                                 self_attention_factor=asked.self_attention_factor)
    return Recording(calls, truths, config, tuple(classes))


def score(recording: Recording, overrides: dict) -> dict:
    """Mean and per-class IoU of the recording's samples relabelled with the recording's mask settings
    and ``overrides``: ``{"mean", "band_as_miss", "per_class"}``."""
    from ondemand_seg.masks.labelling import masks_from_attention

    config = dataclasses.replace(recording.config, **overrides)
    sums = {c: np.zeros(4) for c in recording.classes}  # inter, union, inter band-as-miss, union band-as-miss
    for (captured, images, ids, names), truth in zip(recording.calls, recording.truths):
        _, masks = masks_from_attention(captured, images, ids, names, config)
        valid = masks != 255
        for j in range(ids.shape[0]):
            for k, name in enumerate(names[j]):
                ours, true = masks[j] == ids[j, k], truth[j, k]
                counts = ((ours & true & valid[j]).sum(), ((ours | true) & valid[j]).sum(), (ours & true).sum(),
                          (ours | true).sum())
                sums[name] += np.array([int(c) for c in counts], dtype=float)
    per_class = {c: (s[0] / s[1] if s[1] else float("nan")) for c, s in sums.items()}
    band = {c: (s[2] / s[3] if s[3] else float("nan")) for c, s in sums.items()}
    return {"mean": float(np.nanmean(list(per_class.values()))), "band_as_miss": float(np.nanmean(list(band.values()))),
            "per_class": per_class}


def grid_ceiling(recording: Recording, factor: int) -> float:
    """Mean IoU over classes of the oracle's own masks brought to the latent grid of ``factor`` (area
    average) and back (bilinear, cut at 0.5): what a perfect map at that grid can score."""
    import torch.nn.functional as F

    sums = {c: np.zeros(2) for c in recording.classes}
    for (captured, images, ids, names), truth in zip(recording.calls, recording.truths):
        h, w = (-(-s // factor) for s in captured.latent_size)
        small = F.interpolate(truth.float(), size=(h, w), mode="area")
        back = F.interpolate(small, size=truth.shape[-2:], mode="bilinear", align_corners=False) > 0.5
        for j in range(ids.shape[0]):
            for k, name in enumerate(names[j]):
                sums[name] += [int((back[j, k] & truth[j, k]).sum()), int((back[j, k] | truth[j, k]).sum())]
    return float(np.nanmean([s[0] / s[1] if s[1] else float("nan") for s in sums.values()]))


def self_attention_locality(recording: Recording) -> dict:
    """How much the recorded self-attention knows where the object is: the mean share of a row's
    mass on the first class's object (oracle mask at the self-attention's grid, area > 0.5), for
    rows inside the object and rows outside it, and the object's share of the grid."""
    import torch.nn.functional as F

    inside, outside, area = [], [], []
    for (captured, images, ids, names), truth in zip(recording.calls, recording.truths):
        if captured.self_attention is None:
            return {}
        h, w = _grid(captured.latent_size, captured.self_attention.shape[-1])
        on = F.interpolate(truth[:, :1].float(), size=(h, w), mode="area").flatten(1) > 0.5  # [B, N]
        mass = torch.einsum("bij,bj->bi", captured.self_attention.float(), on.float())
        for j in range(on.shape[0]):
            if on[j].any() and not on[j].all():
                inside.append(mass[j][on[j]].mean().item())
                outside.append(mass[j][~on[j]].mean().item())
                area.append(on[j].float().mean().item())
    return {"object_rows_mass_on_object": float(np.mean(inside)), "background_rows_mass_on_object": float(np.mean(outside)),
            "object_area": float(np.mean(area))}


def _grid(latent_size: tuple[int, int], positions: int) -> tuple[int, int]:
    """``(h, w)`` of the downsampled latent grid with ``positions`` cells."""
    for factor in (1, 2, 4, 8, 16):
        h, w = (-(-s // factor) for s in latent_size)
        if h * w == positions:
            return h, w
    raise ValueError(f"{positions} positions match no downsampling of the {latent_size} latent")
