"""Test scaffolding: tiny random-weight Stable Diffusion pipelines in the real SD 1.x / 2.x layouts.

They make noise, not pictures: they exist so that the whole data path (tokenizer, text encoder,
UNet with cross-attention at three resolutions, VAE, scheduler, ``from_pretrained``) runs offline
in seconds, for tests and smoke runs (``model="random-weights"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


TINY_IMAGE_SIZE = 64
BASE_WORDS = ("a", "photograph", "photo", "of", "and", "the")


def build_clip_tokenizer(words: Iterable[str], max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary spells each of ``words`` as one token.

    Any other word still tokenizes, letter by letter, so multi-token class names occur naturally.
    Written by hand because no small CLIP tokenizer ships inside a package we can install.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    targets = sorted({w.lower() for phrase in words for w in phrase.split()})
    pieces = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in targets}
    # BPE applies merges by global rank, so one word's merges can split another's ("an" from "and"
    # inside "plant"); re-tokenize and merge the pieces that came out until every word is one token.
    while pieces:
        for word_pieces in pieces.values():
            merged = word_pieces[0]
            for piece in word_pieces[1:]:
                merges.append((merged, piece))
                merged = merged + piece
                vocab.setdefault(merged, len(vocab))
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
        pieces = {w: p for w in targets if len(p := tokenizer.tokenize(w)) > 1}
    return tokenizer


def build_tiny_pipeline(flavor: str = "sd1", words: Sequence[str] | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight SD pipeline at 64 px: ``flavor`` ``"sd1"`` (epsilon, per-head attention dims)
    or ``"sd2"`` (v-prediction, linear projections, per-block head counts)."""
    if flavor not in ("sd1", "sd2"):
        raise ValueError(f"flavor must be 'sd1' or 'sd2', got {flavor!r}")
    if words is None:
        from .vocabulary import default_vocabulary

        vocabulary = default_vocabulary()
        words = BASE_WORDS + tuple(vocabulary.prompt_names.get(c, c) for c in vocabulary.classes)
    tokenizer = build_clip_tokenizer(words)
    # Seeded weights without touching the caller's global RNG (a training loop's dropout, say).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _assemble(tokenizer, flavor == "sd2")


def _assemble(tokenizer: CLIPTokenizer, sd2: bool) -> StableDiffusionPipeline:
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 8,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 4) if sd2 else 8,
        use_linear_projection=sd2,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu" if sd2 else "quick_gelu",
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(path: str | Path, flavor: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny pipeline as a diffusers folder (safetensors) and return its path."""
    path = Path(path)
    build_tiny_pipeline(flavor, seed=seed).save_pretrained(path, safe_serialization=True)
    return path
