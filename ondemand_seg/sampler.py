"""The sampler: a Stable Diffusion pipeline with cross-attention capture, turning prompts into
images and label masks in one call."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .capture import CrossAttentionStore, install_capture
from .config import MaskConfig, SamplerConfig
from .masks import (
    fuse_resolutions, labels_from_maps, normalize_maps, otsu_thresholds, propagate_self_attention, refine_with_affinity,
)
from .prompts import PromptSpec, class_token_weights

ModelSource = Union[str, os.PathLike, Callable[[], object]]

TINY_MODEL = "tiny-random"
TOY_MODEL = "toy"
TOY_MODEL_DIR = Path(__file__).parent / "models" / "toy"
PRESET_FILE = "ondemand_seg.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(model: ModelSource) -> ModelSource:
    """The folder behind a built-in name (``"toy"``), else ``model`` unchanged."""
    if isinstance(model, str) and model == TOY_MODEL:
        if not (TOY_MODEL_DIR / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the embedded toy model is missing from this install ({TOY_MODEL_DIR}); train it with "
                "python benchmarks/toy/train_toy_model.py and copy the result there"
            )
        return TOY_MODEL_DIR
    return model


def read_preset(model: ModelSource) -> dict:
    """Recommended settings a model folder ships in ``ondemand_seg.json`` (label space, image size,
    mask and sampler options); empty when there are none."""
    if model == TINY_MODEL:
        return {"image_size": 64}
    if callable(model) or not isinstance(model, (str, os.PathLike)):
        return {}
    path = Path(resolve_model(model)).expanduser() / PRESET_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def check_model_source(model: ModelSource) -> int:
    """Validate ``model`` without loading weights; return the VAE's downsampling factor.

    A local folder must be a diffusers pipeline folder (``model_index.json``); a string that
    looks like a path but does not exist is an error rather than a hub request.
    """
    if callable(model) or model == TINY_MODEL:
        return 8
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a hub id, a local diffusers folder or a callable, got {type(model).__name__}")
    path = Path(resolve_model(model)).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model folder {str(path)!r} is not a diffusers pipeline folder: it has no model_index.json")
        vae_config = path / "vae" / "config.json"
        if vae_config.is_file():
            return 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)
        return 8
    if path.exists():
        raise ValueError(f"model {str(path)!r} is a file; give a diffusers pipeline folder or a hub id")
    if not _HUB_ID.match(str(model)):
        raise FileNotFoundError(f"model folder {str(model)!r} does not exist (and it is not a hub id like 'org/name')")
    return 8


def check_image_size(image_size: int | Sequence[int], multiple: int = 8) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair, each a positive multiple of the VAE factor."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(not isinstance(s, int) or s <= 0 for s in size):
        raise ValueError(f"image_size must be an int or (height, width) of positive ints, got {image_size!r}")
    if any(s % multiple for s in size):
        raise ValueError(
            f"image_size {image_size!r} is not a multiple of {multiple} on each side (this model's VAE downsamples by {multiple})"
        )
    return size


def pick_device(device: str | torch.device | None, slot: int = 0) -> torch.device:
    """The device for generation: as given, else CUDA (GPU ``slot`` modulo the visible count) or CPU."""
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", slot % torch.cuda.device_count())


def load_pipeline(model: ModelSource, device: torch.device, scheduler: str | None = None):
    """Load a Stable Diffusion pipeline on ``device``: fp16 on CUDA, fp32 elsewhere.

    The safety checker is dropped: it replaces flagged images with black ones, which would only
    become rejected samples.
    """
    from diffusers import StableDiffusionPipeline

    if device.type == "cuda" and torch.cuda._is_in_bad_fork():
        raise RuntimeError(
            "CUDA cannot be initialised in a forked DataLoader worker; create the DataLoader with "
            "multiprocessing_context='spawn' (or 'forkserver') when generating on the GPU"
        )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if callable(model):
        pipeline = model()
    elif model == TINY_MODEL:
        from .tiny import build_tiny_pipeline

        pipeline = build_tiny_pipeline()
    else:
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(
                str(resolve_model(model)), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, use_safetensors=True
            )
        except (OSError, ValueError) as error:
            raise RuntimeError(f"could not load a Stable Diffusion pipeline from {str(model)!r}: {error}") from error
    if getattr(pipeline, "safety_checker", None) is not None:
        pipeline.safety_checker = None
    if scheduler is not None:
        import diffusers

        scheduler_class = getattr(diffusers, scheduler, None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            raise ValueError(f"unknown diffusers scheduler {scheduler!r}")
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(device)
    return pipeline if pipeline.unet.dtype == dtype else pipeline.to(dtype=dtype)


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
        pipe, cfg, mcfg = self.pipeline, self.sampler_config, self.mask_config
        weights, ids = class_token_weights(pipe.tokenizer, prompts)
        factor = pipe.vae_scale_factor
        self.store.begin(weights.to(self.device), (size[0] // factor, size[1] // factor),
                         cfg.num_inference_steps, mcfg.timestep_window)
        # One generator per image, so an image does not depend on the batch it was drawn in.
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
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
            fused = fuse_resolutions(self.store.maps(), mcfg.resolution_weights, size, mcfg.normalization)
            if mcfg.self_attention_factor is not None:
                fused = self._propagate(fused, size)
            if mcfg.refine == "affinity":
                fused = refine_with_affinity(fused, images.float(), mcfg.refine_iterations)
            if mcfg.threshold_mode == "otsu":
                thresholds = otsu_thresholds(fused)
            else:
                thresholds = torch.tensor(
                    [[mcfg.class_thresholds.get(n, mcfg.threshold) for n in p.class_names]
                     + [mcfg.threshold] * (ids.shape[1] - len(p.class_names)) for p in prompts]
                )
            masks = labels_from_maps(fused, ids.to(fused.device), thresholds, mcfg.ignore_band)
        self.store.reset()
        if keep_maps:
            return GeneratedBatch(images.float().cpu(), masks.cpu(), fused.cpu(), ids)
        return GeneratedBatch(images.float().cpu(), masks.cpu())

    def _propagate(self, fused: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Self-attention refinement of ``[B, K, H, W]`` fused maps at the recorded resolution."""
        attention = self.store.self_attention()
        factor = self.mask_config.self_attention_factor
        if attention is None:
            raise ValueError(f"no self-attention was recorded at latent factor {factor}; "
                             f"this model's self-attention layers run at factors {sorted(self.store.self_attention_factors_seen)}")
        h, w = (math.ceil(s / factor) for s in self.store.latent_size)
        small = F.interpolate(fused, size=(h, w), mode="area").flatten(2)
        spread = propagate_self_attention(small, attention, self.mask_config.self_attention_power)
        # Only the change the propagation makes is upsampled and added: the self-attention is
        # coarser than the fused map (the toy model's finest is 8x8 for a 32 px image), and
        # replacing the map by its propagated self would throw away the fine detail
        # (measured on the toy model: mask IoU 0.906 -> 0.864 replacing, see RESULTS.md).
        change = F.interpolate((spread - small).view(*fused.shape[:2], h, w), size=size, mode="bilinear", align_corners=False)
        return normalize_maps(fused + change, self.mask_config.normalization)
