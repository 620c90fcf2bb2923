"""Tiny random-weight pipelines in the real layouts of every text-to-image family: the
``model="random-weights"`` model, and what the tests build their folders from.

They make noise, not pictures: they exist so that the whole data path (tokenizers, text encoders,
denoiser with its text attention, VAE, scheduler, ``from_pretrained``) runs offline in about a
second, for tests and smoke runs (``model="random-weights"``). Each flavor is the family's real
diffusers pipeline class with its real component classes, shrunk:

- ``"sd1"`` / ``"sd2"``: SD 1.x (epsilon, per-head attention dims) and SD 2.x (v-prediction,
  linear projections, per-block head counts); one CLIP, cross-attention at three UNet levels.
- ``"sdxl"``: two CLIP encoders (the second with a projection for the pooled vector), a
  ``text_time`` UNet whose first level has no attention, like real SDXL.
- ``"sd3"``: MM-DiT joint attention over CLIP-L + CLIP-G (77 tokens, features side by side)
  followed by T5 tokens.
- ``"flux"`` (dev: guidance-distilled, ``guidance_embeds=True``) and ``"flux-schnell"`` (no
  guidance embedding): double- and single-stream MM-DiT blocks over T5 tokens, a pooled CLIP vector.
- ``"pixart"``: PixArt-Σ, a DiT with cross-attention to T5 tokens.
- ``"sana"``: linear-attention DiT with cross-attention to a Gemma-2 encoder, and a deep-compression
  autoencoder (32x, as the real DC-AE f32).

Every tokenizer spells the words it is given (by default the default vocabulary's prompt words)
as whole tokens, except that the SentencePiece-style ones (T5, Gemma) cut the words of
:data:`SENTENCEPIECE_SPLITS` into several pieces, the way real SentencePiece vocabularies cut
rarer words; any other word still tokenizes, character by character.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

FLAVORS: tuple[str, ...] = ("sd1", "sd2", "sdxl", "sd3", "flux", "flux-schnell", "pixart", "sana")
TINY_IMAGE_SIZE = 64
# Each flavor's image side. sd1/sd2 keep their 64 px (text-attention grids 8, 4 and 2 wide); the
# others take the smallest side at which every text-attention grid is at least 4x4 under the
# family's real VAE compression (8x; 32x for Sana's DC-AE).
TINY_IMAGE_SIZES: dict[str, int] = {
    "sd1": 64, "sd2": 64, "sdxl": 128, "sd3": 64, "flux": 64, "flux-schnell": 64, "pixart": 64, "sana": 128,
}
# Downsampling factors, relative to the latent, of the image grids on which the denoiser's text
# attention runs (measured by tests/test_testing.py). The UNets' mid-block sits at their deepest
# factor; SD3, PixArt and Flux see the latent in 2x2 patches (Flux packs them in the pipeline).
TEXT_ATTENTION_FACTORS: dict[str, tuple[int, ...]] = {
    "sd1": (1, 2, 4), "sd2": (1, 2, 4), "sdxl": (2, 4), "sd3": (2,), "flux": (2,), "flux-schnell": (2,),
    "pixart": (2,), "sana": (1,),
}
# A T5 or Gemma prompt length that keeps a smoke run cheap; pass it as ``max_sequence_length``.
TINY_MAX_SEQUENCE_LENGTH = 32
BASE_WORDS = ("a", "photograph", "photo", "of", "and", "the")
# How the SentencePiece-style tokenizers cut these words, as real SentencePiece vocabularies cut
# rarer words, so that class names of several pieces occur in the default vocabulary.
SENTENCEPIECE_SPLITS: dict[str, tuple[str, ...]] = {
    "potted": ("pot", "ted"),
    "motorbike": ("motor", "bike"),
    "aeroplane": ("aero", "plane"),
}
_SPACE = "\u2581"  # SentencePiece's word-start mark "▁"


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


def sentencepiece_pieces(word: str) -> list[str]:
    """The pieces the T5 and Gemma tokenizers of this module cut ``word`` into, after a space:
    ``"potted"`` -> ``["▁pot", "ted"]``, ``"dog"`` -> ``["▁dog"]``."""
    first, *rest = SENTENCEPIECE_SPLITS.get(word, (word,))
    return [_SPACE + first, *rest]


def build_t5_tokenizer(words: Iterable[str], max_length: int = 512) -> T5Tokenizer:
    """A T5 (SentencePiece Unigram) tokenizer spelling ``words`` as :func:`sentencepiece_pieces`.

    Unigram picks the segmentation with the highest total score, so scoring each piece far above
    single characters makes the pieces win and leaves characters as the fallback for other words.
    Built from a piece list because real T5 vocabularies ship as ``spiece.model`` files, which need
    sentencepiece and protobuf, and no small one ships inside a package we can install.
    """
    targets = _targets(words)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(char, -10.0) for char in _characters(targets)]
    vocab += [(piece, -1.0) for piece in dict.fromkeys(p for w in targets for p in sentencepiece_pieces(w))]
    vocab = list({piece: score for piece, score in vocab}.items())
    # No sentinel <extra_id_*> tokens: they only matter for T5's span-corruption pre-training.
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
    _check_pieces(tokenizer, targets)
    return tokenizer


def build_gemma_tokenizer(words: Iterable[str]) -> GemmaTokenizer:
    """A Gemma (byte-fallback BPE) tokenizer spelling ``words`` as
    :func:`sentencepiece_pieces` when they follow a space; it adds ``<bos>`` like real Gemma.

    As in real Gemma, spaces become "▁" and BPE runs over the whole text, so a word at the very
    start (no space before it) has no "▁" piece and falls back to characters; characters outside
    the vocabulary fall back to byte tokens. Built by hand for the same reason as the T5 one.
    """
    targets = _targets(words)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{byte:02X}>": 5 + byte for byte in range(256)})
    for char in _characters(targets):
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    # As in build_clip_tokenizer: merge the sub-tokens of each piece that does not come out whole
    # until every piece does. A merge's right side never starts with "▁", so none joins two words.
    pending = {piece: list(piece) for w in targets for piece in sentencepiece_pieces(w)}
    while pending:
        for parts in pending.values():
            merged = parts[0]
            for part in parts[1:]:
                merges.append((merged, part))
                merged += part
                vocab.setdefault(merged, len(vocab))
        tokenizer = GemmaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True)
        pending = {}
        for word in targets:
            pieces, tokens = sentencepiece_pieces(word), tokenizer.tokenize(" " + word)
            for piece, parts in zip(pieces, _split_at(tokens, [len(p) for p in pieces], word)):
                if len(parts) > 1:
                    pending[piece] = parts
    return tokenizer


def _targets(words: Iterable[str]) -> list[str]:
    return sorted({w.lower() for phrase in words for w in phrase.split()})


def _characters(targets: Sequence[str]) -> list[str]:
    """The fallback pieces: "▁", printable ASCII and any other character of the words."""
    chars = _SPACE + string.ascii_letters + string.digits + string.punctuation + "".join(targets)
    return list(dict.fromkeys(chars))


def _split_at(tokens: list[str], lengths: list[int], word: str) -> list[list[str]]:
    """Group ``tokens`` by pieces of the given character ``lengths``."""
    groups: list[list[str]] = []
    for length in lengths:
        group: list[str] = []
        while sum(map(len, group)) < length:
            group.append(tokens.pop(0))
        if sum(map(len, group)) != length:
            raise RuntimeError(f"a merge crosses a piece boundary of {word!r}: {group}")
        groups.append(group)
    return groups


def _check_pieces(tokenizer, targets: Sequence[str]) -> None:
    for word in targets:
        if (tokens := tokenizer.tokenize(" " + word)) != sentencepiece_pieces(word):
            raise RuntimeError(f"{word!r} tokenizes as {tokens}, not {sentencepiece_pieces(word)}")


def default_words() -> tuple[str, ...]:
    """:data:`BASE_WORDS` and the prompt names of the default vocabulary's classes."""
    from ..settings.vocabulary import default_vocabulary

    vocabulary = default_vocabulary()
    return BASE_WORDS + tuple(vocabulary.prompt_names.get(c, c) for c in vocabulary.classes)


def build_tiny_pipeline(flavor: str = "sd1", words: Sequence[str] | None = None, seed: int = 0) -> DiffusionPipeline:
    """A random-weight pipeline of ``flavor`` (one of :data:`FLAVORS`, see the module docstring)
    for images of ``TINY_IMAGE_SIZES[flavor]`` pixels; its tokenizers spell ``words`` (default:
    :func:`default_words`). The same ``seed`` gives the same weights."""
    if flavor not in _BUILDERS:
        raise ValueError(f"flavor must be one of {', '.join(map(repr, FLAVORS))}, got {flavor!r}")
    words = default_words() if words is None else tuple(words)
    # Seeded weights without touching the caller's global RNG (a training loop's dropout, say).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline = _BUILDERS[flavor](words)
    # Inference mode, as from_pretrained leaves it: T5's dropout would otherwise make runs differ.
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline


def save_tiny_pipeline(path: str | Path, flavor: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny pipeline as a diffusers folder (safetensors) and return its path."""
    path = Path(path)
    build_tiny_pipeline(flavor, seed=seed).save_pretrained(path, safe_serialization=True)
    return path


def _sd(words: Sequence[str], sd2: bool) -> StableDiffusionPipeline:
    tokenizer = build_clip_tokenizer(words)
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
    vae = _kl_vae(TINY_IMAGE_SIZE)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 32, act="gelu" if sd2 else "quick_gelu"))
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


def _sdxl(words: Sequence[str]) -> StableDiffusionXLPipeline:
    size = TINY_IMAGE_SIZES["sdxl"]
    tokenizer = build_clip_tokenizer(words)
    unet = UNet2DConditionModel(
        sample_size=size // 8,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),  # deeper levels have more layers, as SDXL's (1, 2, 10)
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=64,  # both encoders' features side by side
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # Six size/crop numbers, each embedded in addition_time_embed_dim, plus the pooled vector.
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    vae = _kl_vae(size)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, 32, projection_dim=32, act="gelu"))
    scheduler = _sd_euler_scheduler()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False,
    )


def _sd3(words: Sequence[str]) -> StableDiffusion3Pipeline:
    tokenizer, t5_tokenizer = build_clip_tokenizer(words), build_t5_tokenizer(words)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_IMAGE_SIZES["sd3"] // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,  # T5's width; the CLIP features (8 + 16) are zero-padded to it
        caption_projection_dim=32,
        pooled_projection_dim=24,  # both CLIPs' projections side by side
        pos_embed_max_size=16,
    )
    vae = _kl_vae(TINY_IMAGE_SIZES["sd3"], latent_channels=16, shift_factor=0.0609, scaling_factor=1.5035)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, 8, projection_dim=8))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, 16, projection_dim=16, act="gelu"))
    text_encoder_3 = T5EncoderModel(_t5_config(t5_tokenizer))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
    )


def _flux(words: Sequence[str], guidance_embeds: bool) -> FluxPipeline:
    tokenizer, t5_tokenizer = build_clip_tokenizer(words), build_t5_tokenizer(words)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 16,  # the pipeline packs 2x2 latent pixels of 16 channels into one token
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) sums to 128
    )
    vae = _kl_vae(TINY_IMAGE_SIZES["flux"], latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 32))
    text_encoder_2 = T5EncoderModel(_t5_config(t5_tokenizer))
    if guidance_embeds:  # FLUX.1-dev's scheduler: the shift grows with the image's token count
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer,
    )


def _pixart(words: Sequence[str]) -> PixArtSigmaPipeline:
    tokenizer = build_t5_tokenizer(words)
    transformer = PixArtTransformer2DModel(
        sample_size=TINY_IMAGE_SIZES["pixart"] // 8,
        patch_size=2,
        in_channels=4,
        out_channels=8,  # noise and learned variance; the pipeline keeps the first half
        num_layers=2,
        num_attention_heads=3,
        attention_head_dim=8,
        cross_attention_dim=24,
        caption_channels=32,
    )
    vae = _kl_vae(TINY_IMAGE_SIZES["pixart"])
    text_encoder = T5EncoderModel(_t5_config(tokenizer))
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _sana(words: Sequence[str]) -> SanaPipeline:
    size = TINY_IMAGE_SIZES["sana"]
    tokenizer = build_gemma_tokenizer(words)
    transformer = SanaTransformer2DModel(
        sample_size=size // 32,
        patch_size=1,
        in_channels=8,
        out_channels=8,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
    )
    # DC-AE f32's layout: three residual stages, then three with multi-scale linear attention.
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    vae = AutoencoderDC(
        latent_channels=8,
        attention_head_dim=4,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=(8, 8, 8, 8, 16, 16),
        decoder_block_out_channels=(8, 8, 8, 8, 16, 16),
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        scaling_factor=0.41407,
    )
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            attn_implementation="eager",
        )
    )
    # Sana's own scheduler: DPM-Solver++ on flow-matching sigmas.
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)


def _kl_vae(size: int, latent_channels: int = 4, **kwargs) -> AutoencoderKL:
    """An 8x-compressing KL autoencoder; flow-matching families pass their 16 channels, shift and
    scale (without the quant convs, as their real VAEs)."""
    if latent_channels != 4:
        kwargs.update(use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=size,
        **kwargs,
    )


def _clip_config(tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int | None = None,
                 act: str = "quick_gelu") -> CLIPTextConfig:
    # Two layers at least: SDXL and SD3 read the penultimate hidden states.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act=act,
        **({} if projection_dim is None else {"projection_dim": projection_dim}),
    )


def _t5_config(tokenizer: T5Tokenizer) -> T5Config:
    """T5 v1.1 (gated GELU), the encoder the SD3, Flux and PixArt families use."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _sd_euler_scheduler() -> EulerDiscreteScheduler:
    # SDXL's scheduler: Euler on SD's scaled-linear betas, "leading" spacing.
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  timestep_spacing="leading", steps_offset=1)


_BUILDERS: dict[str, Callable[[Sequence[str]], DiffusionPipeline]] = {
    "sd1": lambda words: _sd(words, sd2=False),
    "sd2": lambda words: _sd(words, sd2=True),
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux": lambda words: _flux(words, guidance_embeds=True),
    "flux-schnell": lambda words: _flux(words, guidance_embeds=False),
    "pixart": _pixart,
    "sana": _sana,
}
