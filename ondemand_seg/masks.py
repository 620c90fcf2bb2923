"""Mask math: pure functions from class-token attention maps to label masks.

Shapes: ``B`` images, ``K`` class slots per image (several classes can share a prompt),
``h×w`` an attention grid, ``H×W`` the image.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from .label_spaces import IGNORE_INDEX


def normalize_maps(maps: torch.Tensor, mode: str = "max", eps: float = 1e-8) -> torch.Tensor:
    """Scale each map to [0, 1] over its spatial dims.

    Args:
        maps: ``[..., h, w]`` non-negative attention.
        mode: ``"max"`` divides by the peak (the DiffuMask authors' choice, keeps the zero point);
            ``"minmax"`` also subtracts the minimum.
    Returns:
        ``[..., h, w]`` in [0, 1]; an all-constant map becomes all zeros under ``"minmax"``.
    """
    if mode not in ("max", "minmax"):
        raise ValueError(f"normalization must be 'max' or 'minmax', got {mode!r}")
    flat = maps.flatten(-2)
    low = flat.amin(-1, keepdim=True) if mode == "minmax" else torch.zeros_like(flat[..., :1])
    high = flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(eps)).view_as(maps)


def fuse_resolutions(
    maps_by_factor: Mapping[int, torch.Tensor],
    weights: Mapping[int, float],
    size: tuple[int, int],
    normalization: str = "minmax",
) -> torch.Tensor:
    """Weighted multi-resolution fusion of attention maps at image size.

    Args:
        maps_by_factor: latent downsampling factor -> ``[B, K, h_f, w_f]`` attention.
        weights: factor -> weight; factors with no captured map are an error, so a
            misconfigured resolution never silently drops out.
        size: ``(H, W)`` of the output.
    Returns:
        ``[B, K, H, W]`` fused maps, normalized again so the threshold is relative to the peak.
    """
    missing = sorted(f for f, w in weights.items() if w > 0 and f not in maps_by_factor)
    if missing:
        raise ValueError(
            f"no cross-attention was captured at latent factor(s) {missing}; "
            f"captured factors: {sorted(maps_by_factor)}. Adjust MaskConfig.resolution_weights."
        )
    total = sum(w for w in weights.values() if w > 0)
    fused = None
    for factor, weight in weights.items():
        if weight <= 0:
            continue
        level = normalize_maps(maps_by_factor[factor].float(), normalization)
        level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        fused = level * (weight / total) if fused is None else fused + level * (weight / total)
    return normalize_maps(fused, normalization)


def labels_from_maps(
    fused: torch.Tensor,
    class_ids: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_band: float,
) -> torch.Tensor:
    """Binarize fused maps into one label mask per image.

    A pixel goes to the class whose normalised attention is highest among the classes that reach
    ``threshold - ignore_band``; it is labelled with that class at or above ``threshold +
    ignore_band``, ignore (255) inside the band, and background (0) when no class reaches the band.

    Args:
        fused: ``[B, K, H, W]`` maps in [0, 1].
        class_ids: ``[B, K]`` long label ids; 0 marks an unused slot.
        thresholds: ``[B, K]`` per-slot threshold γ.
        ignore_band: half-width of the uncertain band around γ.
    Returns:
        ``[B, H, W]`` long mask of label ids, 0 background, 255 ignore.
    """
    thresholds = thresholds.to(fused)[..., None, None]
    used = (class_ids > 0)[..., None, None]
    candidate = used & (fused >= thresholds - ignore_band)
    score = torch.where(candidate, fused, torch.full_like(fused, -1.0))
    best, slot = score.max(dim=1)
    best_threshold = thresholds.squeeze(-1).squeeze(-1).gather(1, slot.flatten(1)).view_as(best)
    best_class = class_ids.gather(1, slot.flatten(1)).view_as(best)
    labels = torch.where(best >= best_threshold + ignore_band, best_class, torch.full_like(best_class, IGNORE_INDEX))
    return torch.where(best < 0, torch.zeros_like(labels), labels)
