"""Generation: a loaded diffusers pipeline with attention capture turns prompts into images and,
through :func:`~ondemand_seg.labelling.masks_from_attention`, label masks, in one call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .capture import CrossAttentionStore, install_capture
from .config import MaskConfig, SamplerConfig
from .labelling import masks_from_attention
from .prompts import PromptSpec, class_token_weights


@dataclass
class GeneratedBatch:
    """Images and masks of one generation call, on the CPU.

    images: ``[B, 3, H, W]`` float in [0, 1]; masks: ``[B, H, W]`` long label ids (255 ignore);
    with ``keep_maps``, fused: ``[B, K, H, W]`` the fused attention the masks came from and
    class_ids: ``[B, K]`` the label of each map (0 = unused slot).
    """

    images: torch.Tensor
    masks: torch.Tensor
    fused: torch.Tensor | None = None
    class_ids: torch.Tensor | None = None

    def uint8_images(self) -> np.ndarray:
        """The images as ``[B, H, W, 3]`` uint8 RGB (what samples, oracles and labellers take)."""
        return (self.images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class DiffuMaskSampler:
    """Generates images with a pipeline and reads a label mask out of its cross-attention."""

    def __init__(self, pipeline, mask_config: MaskConfig, sampler_config: SamplerConfig) -> None:
        self.pipeline = pipeline
        self.mask_config = mask_config
        self.sampler_config = sampler_config
        self.store = CrossAttentionStore()
        self.store.self_attention_factor = mask_config.self_attention_factor
        self.capturing_layers = install_capture(pipeline.unet, self.store, mask_config.self_attention_factor is not None)

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    def generate(
        self, prompts: Sequence[PromptSpec], seeds: Sequence[int], size: tuple[int, int], keep_maps: bool = False
    ) -> GeneratedBatch:
        """One image and mask per prompt; image ``i`` depends on ``prompts[i]`` and ``seeds[i]`` only."""
        pipe, cfg = self.pipeline, self.sampler_config
        weights, ids = class_token_weights(pipe.tokenizer, prompts)
        factor = pipe.vae_scale_factor
        self.store.begin(weights.to(self.device), (size[0] // factor, size[1] // factor),
                         cfg.num_inference_steps, self.mask_config.timestep_window)
        # One generator per image, so an image does not depend on the batch it was drawn in.
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        try:
            with torch.inference_mode():
                images = pipe(
                    prompt=[p.text for p in prompts],
                    height=size[0],
                    width=size[1],
                    num_inference_steps=cfg.num_inference_steps,
                    guidance_scale=cfg.guidance_scale,
                    generator=generators,
                    output_type="pt",
                    callback_on_step_end=self.store.on_step_end,
                ).images
                fused, masks = masks_from_attention(self.store.captured(), images, ids,
                                                    [p.class_names for p in prompts], self.mask_config)
        finally:
            self.store.reset()
        if keep_maps:
            return GeneratedBatch(images.float().cpu(), masks.cpu(), fused.cpu(), ids)
        return GeneratedBatch(images.float().cpu(), masks.cpu())
