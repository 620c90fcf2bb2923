"""Generation: a loaded diffusers pipeline of any supported family, with attention capture, turns
prompts into images and, through :func:`~ondemand_seg.labelling.masks_from_attention`, label
masks, in one call."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .capture import CrossAttentionStore, install_capture
from .config import MaskConfig, SamplerConfig
from .families import ModelSpec, call_options, describe_pipeline, latent_size, step_callback, text_segments
from .labelling import finite_samples, masks_from_attention
from .masks import neglected_classes
from .prompts import PromptSpec, class_token_weights

# torch.compile backend for ``SamplerConfig(compile=True)``; the tests trace with "eager" (the same
# graphs and guards, without inductor's code generation).
COMPILE_BACKEND = "inductor"
# Dynamo treats the Python ints a traced function reads as constants and guards on their values.
# The capture reads the store's step counters (``recording``) and per-factor layer counts, which
# change every step: as constants they would cost a graph per step, past dynamo's recompile limit
# (8) from step 8 on. Made dynamic, the step only decides a branch, so a batch size costs a graph
# per branch the capture takes: recording into empty sums (the first recorded step), recording,
# and, for a window narrower than (0, 1), not recording before and after it (2 to 4 graphs,
# whatever the number of steps). The pattern matches the capture processors' ``store`` attribute.
DYNAMIC_STORE_INTS = r".*\.store\.(step|_first_step|_end_step|counts\[\d+\])$"


@contextlib.contextmanager
def compile_settings():
    """Dynamo settings for a pipeline call whose denoiser is compiled with capture installed: the
    store's counters are dynamic ints (:data:`DYNAMIC_STORE_INTS`), reached through modules."""
    sources = ",".join(filter(None, [torch.compiler.config.dynamic_sources, DYNAMIC_STORE_INTS]))
    # Without allow_unspec_int_on_nn_module, ints reached through a module's attributes stay
    # constants whatever dynamic_sources says.
    with torch.compiler.config.patch(dynamic_sources=sources), \
            torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        yield


@dataclass
class GeneratedBatch:
    """Images and masks of one generation call, on the CPU.

    images: ``[B, 3, H, W]`` float in [0, 1]; masks: ``[B, H, W]`` long label ids (255 ignore);
    with ``keep_maps``, fused: ``[B, K, H, W]`` the fused attention the masks came from and
    class_ids: ``[B, K]`` the label of each map (0 = unused slot, or a class the model neglected);
    finite_maps: ``[B]`` bool, False where a sample's attention maps held a non-finite value
    (``None``: not checked); neglected: ``[B]`` long, classes of each prompt labelled as not drawn
    (``MaskConfig.neglect_ratio``).
    """

    images: torch.Tensor
    masks: torch.Tensor
    fused: torch.Tensor | None = None
    class_ids: torch.Tensor | None = None
    finite_maps: torch.Tensor | None = None
    neglected: torch.Tensor | None = None

    def uint8_images(self) -> np.ndarray:
        """The images as ``[B, H, W, 3]`` uint8 RGB (what samples, oracles and labellers take)."""
        return (self.images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class DiffuMaskSampler:
    """Generates images with a pipeline of any supported family and reads a label mask out of its
    text attention.

    Settings left ``None`` (resolution weights, steps, guidance) take the model's own values, and
    mask settings the model cannot serve (a resolution it lacks, output-space maps on cross-
    attention) are an error here, at first load, naming what the model has.

    ``sampler_config.channels_last`` converts the denoiser's weights to channels-last and
    ``sampler_config.compile`` compiles its forward in place (``nn.Module.compile``), after the
    capture processors are installed: dynamo traces them into the denoiser's graph with no graph
    break, recording steps included, and the pipeline keeps its own module. The first batch of
    each size compiles 2 to 4 graphs (:data:`DYNAMIC_STORE_INTS`); past dynamo's recompile limit
    (8 graphs, e.g. a third batch size) new variants run uncompiled, with the same results.
    """

    def __init__(self, pipeline, mask_config: MaskConfig, sampler_config: SamplerConfig) -> None:
        self.pipeline = pipeline
        self.spec: ModelSpec = describe_pipeline(pipeline)
        self.family = self.spec.family
        self.spec.check_mask(mask_config)
        self.mask_config = mask_config
        steps = sampler_config.num_inference_steps or self.spec.num_inference_steps
        guidance = sampler_config.guidance_scale
        self.sampler_config = dataclasses.replace(
            sampler_config, num_inference_steps=steps,
            guidance_scale=self.spec.guidance_scale if guidance is None else guidance)
        self.store = CrossAttentionStore(mask_config.map_source, mask_config.joint_softmax)
        self.store.self_attention_factor = mask_config.self_attention_factor
        self.call_options = call_options(pipeline, self.family)
        self.text = text_segments(pipeline, self.family, self.call_options)
        self.capturing_layers = install_capture(self.denoiser, self.store, self.family,
                                                mask_config.self_attention_factor is not None)
        if self.sampler_config.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        if self.sampler_config.compile:
            self.denoiser.compile(backend=COMPILE_BACKEND)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.family.denoiser)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def mask_config_for(self, size: tuple[int, int]) -> MaskConfig:
        """The mask settings used at ``size``, the model's resolution weights filled in."""
        if self.mask_config.resolution_weights is not None:
            return self.mask_config
        return dataclasses.replace(self.mask_config, resolution_weights=self.spec.default_resolution_weights(size))

    def generate(
        self, prompts: Sequence[PromptSpec], seeds: Sequence[int], size: tuple[int, int], keep_maps: bool = False
    ) -> GeneratedBatch:
        """One image and mask per prompt; image ``i`` depends on ``prompts[i]`` and ``seeds[i]`` only."""
        pipe, cfg = self.pipeline, self.sampler_config
        self.spec.check_image_size(size)
        mask_config = self.mask_config_for(size)
        weights, ids = class_token_weights(self.text, prompts)
        self.store.begin(weights.to(self.device), latent_size(self.spec, size),
                         cfg.num_inference_steps, mask_config.timestep_window)
        # One generator per image, so an image does not depend on the batch it was drawn in.
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        try:
            compiled = compile_settings() if cfg.compile else contextlib.nullcontext()
            with torch.inference_mode(), compiled:
                images = pipe(
                    prompt=[p.text for p in prompts],
                    height=size[0],
                    width=size[1],
                    num_inference_steps=cfg.num_inference_steps,
                    guidance_scale=cfg.guidance_scale,
                    generator=generators,
                    output_type="pt",
                    **self.call_options,
                    **step_callback(pipe, self.store.on_step),
                ).images
                captured = self.store.captured()
                finite = finite_samples(captured)
                neglected = neglected_classes(captured.maps, mask_config.resolution_weights, ids,
                                              mask_config.neglect_ratio)
                # A neglected class is labelled as if the prompt had not named it (slot id 0).
                ids = ids.masked_fill(neglected, 0)
                fused, masks = masks_from_attention(captured, images, ids, [p.class_names for p in prompts], mask_config)
        finally:
            self.store.reset()
        counts = neglected.sum(1).cpu()
        if keep_maps:
            return GeneratedBatch(images.float().cpu(), masks.cpu(), fused.cpu(), ids, finite.cpu(), counts)
        return GeneratedBatch(images.float().cpu(), masks.cpu(), finite_maps=finite.cpu(), neglected=counts)
