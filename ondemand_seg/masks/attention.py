"""What the capture hands to the mask math: one generation batch's recorded attention, as plain
tensors (no model, no diffusers), and the check that it is finite."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CapturedAttention:
    """What one generation batch recorded, for :func:`~ondemand_seg.masks.labelling.masks_from_attention`.

    maps: ``{latent factor: [B, K, h_f, w_f]}`` mean class-token attention per resolution;
    self_attention: ``[B, N, N]`` mean self-attention at ``self_attention_factor`` (rows sum to 1),
    or ``None``; self_attention_factors_seen: the factors at which self-attention layers ran;
    latent_size: ``(h, w)`` of the denoised latent; head_maps: with per-head recording,
    ``{latent factor: [B, K, M, h_f, w_f]}`` the mean map of each of the ``M`` layer-heads at that
    factor (layers in the order they run, each layer's heads in order), else ``None``.
    """

    maps: dict[int, torch.Tensor]
    self_attention: torch.Tensor | None
    self_attention_factor: int | None
    self_attention_factors_seen: set[int]
    latent_size: tuple[int, int]
    head_maps: dict[int, torch.Tensor] | None = None
