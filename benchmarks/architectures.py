"""Full-size text-to-image architectures with random weights, for timing on a GPU without a download.

Each builder makes the published architecture of one model from its config (same layers, widths
and therefore FLOPs as the real model), with random weights and offline tokenizers whose ids only
index the random embeddings. ``device``/``dtype`` build the modules where they will run: Flux.1's
12B-parameter transformer and T5-XXL would take minutes and ~70 GB to initialise on a CPU in fp32.
On ``device="meta"`` nothing is allocated, which is how the tests check the architectures
(parameter counts) on a machine with neither the memory nor a GPU.

- ``sd15``: Stable Diffusion 1.5 (UNet 860M, CLIP ViT-L/14), 512 px.
- ``sdxl``: SDXL base 1.0 (UNet 2.6B, CLIP ViT-L + OpenCLIP ViT-bigG), 1024 px.
- ``sd3``: Stable Diffusion 3 Medium (MM-DiT 2B, 24 joint blocks, CLIP-L + CLIP-G), 1024 px,
  saved without T5 as Stability AI offers it: the pipeline then feeds zeros in T5's place, so the
  transformer sees the same 77 + 256 text tokens and does the same work.
- ``flux``: FLUX.1 [dev] (12B, 19 double- and 38 single-stream blocks, CLIP-L + T5-XXL), 1024 px.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

ARCHITECTURES = ("sd15", "sdxl", "sd3", "flux")
IMAGE_SIZES = {"sd15": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}
# The tiny test pipeline of each architecture's family (ondemand_seg.pipelines.tiny), which
# ``--tiny`` swaps in to try a GPU command on a CPU.
TINY_FLAVORS = {"sd15": "sd1", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
# Published parameter counts of the denoisers, in millions (what the meta-device test checks).
DENOISER_PARAMS_M = {"sd15": 859.5, "sdxl": 2567.5, "sd3": 2028.3, "flux": 11901.4}
_WORDS = ("dog", "bird", "cat")


@contextlib.contextmanager
def _building_on(device: str | torch.device | None, dtype: torch.dtype | None):
    """Modules created inside are allocated on ``device`` in ``dtype`` from the start."""
    previous = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            yield
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(arch: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """The random-weight pipeline of ``arch`` (one of :data:`ARCHITECTURES`)."""
    if arch not in _BUILDERS:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    return _BUILDERS[arch](lambda: _building_on(device, dtype))


def _clip_l(projection: bool):
    """CLIP ViT-L/14's text tower (SD 1.5, SDXL's first encoder, SD3, Flux)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=768)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _clip_bigg():
    """OpenCLIP ViT-bigG/14's text tower (SDXL's second encoder, SD3's CLIP-G)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))


def _kl_vae(latent_channels: int, sample_size: int, **kwargs):
    from diffusers import AutoencoderKL

    if latent_channels != 4:
        kwargs.update(use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=latent_channels,
                         sample_size=sample_size, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, **kwargs)


def _clip_tokenizer():
    from ondemand_seg.pipelines.tiny import BASE_WORDS, build_clip_tokenizer

    # A real CLIP vocabulary cannot be downloaded; token ids only index the random embeddings.
    return build_clip_tokenizer(BASE_WORDS + _WORDS)


def _sd15(modules):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    with modules():
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        vae, text_encoder = _kl_vae(4, 512), _clip_l(projection=False)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _sdxl(modules):
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    with modules():
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = _kl_vae(4, 1024, scaling_factor=0.13025, force_upcast=True)
        text_encoder, text_encoder_2 = _clip_l(projection=False), _clip_bigg()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    tokenizer = _clip_tokenizer()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)


def _sd3(modules):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    with modules():
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=192,
        )
        vae = _kl_vae(16, 1024, scaling_factor=1.5305, shift_factor=0.0609)
        text_encoder, text_encoder_2 = _clip_l(projection=True), _clip_bigg()
    tokenizer = _clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)


def _flux(modules):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    from ondemand_seg.pipelines.tiny import build_t5_tokenizer

    t5_tokenizer = build_t5_tokenizer(_WORDS)
    with modules():
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu",
                                     pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id))
        vae = _kl_vae(16, 1024, scaling_factor=0.3611, shift_factor=0.1159)
        text_encoder = _clip_l(projection=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)


# Each builder takes ``modules``: a context for creating the networks (schedulers and tokenizers
# stay outside it: schedulers keep their tables on the CPU in float32).
_BUILDERS: dict[str, Callable] = {"sd15": _sd15, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}
