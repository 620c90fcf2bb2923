import inspect
import math

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

from ondemand_seg.pipelines.tiny import (
    FLAVORS,
    TEXT_ATTENTION_FACTORS,
    TINY_IMAGE_SIZES,
    TINY_MAX_SEQUENCE_LENGTH,
    build_tiny_pipeline,
    default_words,
    sentencepiece_pieces,
)

PROMPTS = ["a photo of a potted plant and a dog", "a photograph of a motorbike"]
# The class names cut into several pieces by the default T5 and Gemma vocabularies.
MULTI_PIECE = {"potted plant": ["▁pot", "ted", "▁plant"], "motorbike": ["▁motor", "bike"],
               "aeroplane": ["▁aero", "plane"]}


def call_kwargs(pipe, flavor, seed=0):
    """A two-step run at the flavor's size, with each family's knobs for a tiny model."""
    size = TINY_IMAGE_SIZES[flavor]
    kwargs = dict(prompt=PROMPTS, height=size, width=size, num_inference_steps=2, guidance_scale=4.0,
                  output_type="pt", generator=torch.Generator().manual_seed(seed))
    params = inspect.signature(pipe.__call__).parameters
    optional = {"max_sequence_length": TINY_MAX_SEQUENCE_LENGTH, "use_resolution_binning": False,
                "clean_caption": False}  # clean_caption needs bs4 and ftfy
    kwargs.update({k: v for k, v in optional.items() if k in params})
    return kwargs


def sentencepiece_tokenizers(pipe):
    return [t for t in (getattr(pipe, n, None) for n in ("tokenizer", "tokenizer_2", "tokenizer_3"))
            if t is not None and type(t).__name__ in ("T5Tokenizer", "GemmaTokenizer")]


class TextAttentionRecorder:
    """Records, for every attention call in a denoiser, how many image tokens attend to text."""

    def __init__(self, denoiser, text_in_sequence=0):
        self.image_tokens = []
        self.text_in_sequence = text_in_sequence
        self.handles = [m.register_forward_pre_hook(self.hook(name), with_kwargs=True)
                        for name, m in denoiser.named_modules() if isinstance(m, (Attention, AttentionModuleMixin))]

    def hook(self, name):
        def record(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if text is not None:  # cross-attention, or joint attention with the text passed apart
                self.image_tokens.append(hidden.shape[1])
            elif name.startswith("single_transformer_blocks"):  # Flux: text first in one sequence
                self.image_tokens.append(hidden.shape[1] - self.text_in_sequence)
        return record

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture(scope="module")
def runs():
    """flavor -> (pipeline, images of a 2-step run, image-token counts of its text attention)."""
    cache = {}

    def run(flavor):
        if flavor not in cache:
            pipe = build_tiny_pipeline(flavor)
            pipe.set_progress_bar_config(disable=True)
            denoiser = getattr(pipe, "unet", None) or pipe.transformer
            recorder = TextAttentionRecorder(denoiser, text_in_sequence=TINY_MAX_SEQUENCE_LENGTH)
            images = pipe(**call_kwargs(pipe, flavor)).images
            recorder.remove()
            cache[flavor] = pipe, images, recorder.image_tokens
        return cache[flavor]

    return run


@pytest.mark.parametrize("flavor", FLAVORS)
def test_flavor_generates_finite_images_at_its_size(runs, flavor):
    _, images, _ = runs(flavor)
    size = TINY_IMAGE_SIZES[flavor]
    assert images.shape == (2, 3, size, size)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_text_attention_runs_at_the_stated_factors(runs, flavor):
    pipe, _, image_tokens = runs(flavor)
    latent_side = TINY_IMAGE_SIZES[flavor] // pipe.vae_scale_factor
    factors = set()
    for tokens in image_tokens:
        side = math.isqrt(tokens)
        assert side * side == tokens and latent_side % side == 0, (tokens, latent_side)
        factors.add(latent_side // side)
    assert sorted(factors) == list(TEXT_ATTENTION_FACTORS[flavor])
    assert latent_side // max(factors) >= (2 if flavor in ("sd1", "sd2") else 4)  # sd1/sd2 keep 64 px


@pytest.mark.parametrize("flavor", FLAVORS)
def test_save_and_from_pretrained_round_trip(runs, tmp_path, flavor):
    pipe, images, _ = runs(flavor)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, use_safetensors=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    for name, component in pipe.components.items():
        if hasattr(component, "get_vocab"):
            reloaded = getattr(loaded, name)
            assert type(reloaded) is type(component)
            for prompt in PROMPTS + ["an unknown zebra"]:
                ours, theirs = (t(prompt, return_offsets_mapping=True) for t in (component, reloaded))
                assert theirs.input_ids == ours.input_ids and theirs.offset_mapping == ours.offset_mapping
    torch.testing.assert_close(loaded(**call_kwargs(loaded, flavor)).images, images)


@pytest.mark.parametrize("flavor", ["sd3", "flux", "pixart", "sana"])
def test_sentencepiece_class_names_are_several_pieces_found_by_offsets(runs, flavor):
    pipe, _, _ = runs(flavor)
    (tokenizer,) = sentencepiece_tokenizers(pipe)
    for name, pieces in MULTI_PIECE.items():
        text = f"a photo of a {name} and a dog"
        start, end = text.index(name), text.index(name) + len(name)
        encoding = tokenizer(text, return_offsets_mapping=True)
        tokens = tokenizer.convert_ids_to_tokens(encoding.input_ids)
        inside = [i for i, (a, b) in enumerate(encoding.offset_mapping) if a < end and b > start and b > a]
        assert [tokens[i] for i in inside] == pieces
        # Gemma's offsets take in the space its "▁" stands for, T5's do not.
        assert text[encoding.offset_mapping[inside[0]][0]:encoding.offset_mapping[inside[-1]][1]].strip() == name


@pytest.mark.parametrize("flavor", ["sd3", "sana"])
def test_every_default_word_is_its_pieces_and_unknown_words_fall_back_to_characters(runs, flavor):
    pipe, _, _ = runs(flavor)
    (tokenizer,) = sentencepiece_tokenizers(pipe)
    for phrase in default_words():
        pieces = [p for word in phrase.split() for p in sentencepiece_pieces(word)]
        assert tokenizer.tokenize(" " + phrase) == pieces
    encoding = tokenizer("a zebra", return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(encoding.input_ids)
    assert tokenizer.unk_token not in tokens
    word = tokens[-5:] if flavor == "sana" else tokens[-6:-1]  # T5 ends with </s>, Gemma does not
    assert word == list("zebra")


def test_sana_runs_with_its_default_instruction_prefix(runs):
    pipe, _, _ = runs("sana")
    kwargs = call_kwargs(pipe, "sana")
    assert "complex_human_instruction" not in kwargs  # the default one is prepended
    embeds, mask, _, _ = pipe.encode_prompt(PROMPTS[:1], max_sequence_length=TINY_MAX_SEQUENCE_LENGTH)
    # <bos> then the prompt's 10 tokens: the instruction is cut off, as in real Sana.
    assert embeds.shape[1] == TINY_MAX_SEQUENCE_LENGTH and mask.sum() == 11


def test_same_seed_same_weights_and_the_global_rng_is_left_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_tiny_pipeline("flux", seed=1), build_tiny_pipeline("flux", seed=1)
    assert torch.equal(torch.rand(1), expected)
    for x, y in zip(a.transformer.parameters(), b.transformer.parameters()):
        assert torch.equal(x, y)


def test_unknown_flavor_names_the_flavors():
    with pytest.raises(ValueError, match="'sdxl'.*'sana'"):
        build_tiny_pipeline("sd4")
