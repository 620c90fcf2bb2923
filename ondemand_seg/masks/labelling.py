"""From captured attention to label masks: the order in which the mask math runs.

Weigh each resolution's layer-heads (optionally from the maps themselves), fuse resolutions,
optionally remove the attention's background floor, propagate through self-attention and refine
along image colour, pick γ per map (fixed, per class, or Otsu), then label. Pure tensor code, testable without a model; the functions it chains live in
:mod:`ondemand_seg.masks`. :func:`finite_samples` says which samples' recordings were corrupt (the
math keeps their non-finite pixels out of the labels; the quality gate drops the samples).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..settings.config import MaskConfig
from .attention import CapturedAttention
from .maps import (
    aggregate_heads,
    fuse_resolutions,
    labels_from_maps,
    normalize_maps,
    otsu_thresholds,
    propagate_self_attention,
    refine_with_affinity,
)


def finite_samples(captured: CapturedAttention) -> torch.Tensor:
    """``[B]`` bool: True where every recorded map of the sample (each resolution's ``[K, h_f, w_f]``
    and, when recorded, its ``[N, N]`` self-attention) is finite.

    Checked on the raw recording, before any normalisation or resizing can hide or spread a value.
    """
    if not captured.maps:
        raise ValueError("no attention was captured for this batch, so there is nothing to check")
    recorded = list(captured.maps.values())
    if captured.self_attention is not None:
        recorded.append(captured.self_attention)
    finite = [torch.isfinite(r).flatten(1).all(1) for r in recorded]
    return torch.stack(finite).all(0)


def masks_from_attention(
    captured: CapturedAttention,
    images: torch.Tensor,
    class_ids: torch.Tensor,
    class_names: Sequence[Sequence[str]],
    config: MaskConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label masks of one generated batch.

    Args:
        captured: the batch's recorded attention.
        images: ``[B, 3, H, W]`` generated images in [0, 1] (used by ``refine="affinity"``).
        class_ids: ``[B, K]`` long label id of each class slot (0 = unused slot).
        class_names: per image, the class names of its used slots, in slot order (for
            ``config.class_thresholds``).
        config: how maps become labels.
    Returns:
        fused: ``[B, K, H, W]`` the final maps in [0, 1]; masks: ``[B, H, W]`` long ids, 255 ignore.
    """
    size = tuple(images.shape[-2:])
    # Unset weights are normally the model's own (the generator fills them in); without a model
    # to ask, every captured grid counts equally.
    weights = config.resolution_weights or {factor: 1.0 for factor in captured.maps}
    fused = fuse_resolutions(resolution_maps(captured, config), weights, size, config.normalization)
    if config.background_floor == "median":
        fused = normalize_maps(fused, "median")
    if config.self_attention_factor is not None:
        fused = _propagate(fused, captured, config)
    if config.refine == "affinity":
        fused = refine_with_affinity(fused, images.float(), config.refine_iterations)
    if config.threshold_mode == "otsu":
        thresholds = otsu_thresholds(fused)
    else:
        slots = class_ids.shape[1]
        thresholds = torch.tensor(
            [[config.class_thresholds.get(n, config.threshold) for n in names] + [config.threshold] * (slots - len(names))
             for names in class_names]
        )
    masks = labels_from_maps(fused, class_ids.to(fused.device), thresholds, config.ignore_band)
    return fused, masks


def resolution_maps(captured: CapturedAttention, config: MaskConfig) -> dict[int, torch.Tensor]:
    """``{factor: [B, K, h_f, w_f]}``: each resolution's map, its layer-heads weighed as
    ``config.aggregation`` says (``"mean"``: the capture's running mean)."""
    if config.aggregation == "mean":
        return captured.maps
    if captured.head_maps is None:
        raise ValueError(f"aggregation={config.aggregation!r} weighs layer-heads, but this capture kept only their "
                         "mean; record with an AttentionStore(per_head=True) (the generator does so for this setting)")
    return {factor: aggregate_heads(maps, config.aggregation) for factor, maps in captured.head_maps.items()}


def _propagate(fused: torch.Tensor, captured: CapturedAttention, config: MaskConfig) -> torch.Tensor:
    """Self-attention refinement of ``[B, K, H, W]`` fused maps at the recorded resolution."""
    factor = config.self_attention_factor
    if captured.self_attention is None:
        raise ValueError(f"no self-attention was recorded at latent factor {factor}; "
                         f"this model's self-attention layers run at factors {sorted(captured.self_attention_factors_seen)}")
    h, w = (math.ceil(s / factor) for s in captured.latent_size)
    small = F.interpolate(fused, size=(h, w), mode="area").flatten(2)
    spread = propagate_self_attention(small, captured.self_attention, config.self_attention_power,
                                      config.self_attention_sharpness, config.self_attention_stop)
    if config.self_attention_mode == "replace":
        spread = F.interpolate(spread.view(*fused.shape[:2], h, w), size=fused.shape[-2:], mode="bilinear",
                               align_corners=False)
        return normalize_maps(spread, config.normalization)
    # "add": only the change the propagation makes is upsampled and added, which keeps the fused
    # map's detail finer than the self-attention's grid.
    change = F.interpolate((spread - small).view(*fused.shape[:2], h, w), size=fused.shape[-2:], mode="bilinear",
                           align_corners=False)
    return normalize_maps(fused + change, config.normalization)
