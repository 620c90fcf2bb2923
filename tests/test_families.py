"""Every supported family end to end on tiny random pipelines: loading, capture, token positions,
model-aware defaults and the errors for what a family cannot do."""
import inspect
import re

import pytest
import torch

from ondemand_seg import DiffuMaskStream, GeneratorConfig, MaskConfig, resolve_config
from ondemand_seg.generation.capture import AttentionStore, record_joint
from ondemand_seg.generation.generator import CapturingPipeline
from ondemand_seg.generation.tokens import class_token_weights
from ondemand_seg.pipelines.families import FAMILIES, describe_pipeline, family_of
from ondemand_seg.pipelines.loading import check_model_source, load_pipeline
from ondemand_seg.pipelines.tiny import (
    FLAVORS,
    TEXT_ATTENTION_FACTORS,
    TINY_IMAGE_SIZES,
    build_tiny_pipeline,
    save_tiny_pipeline,
    sentencepiece_pieces,
)
from ondemand_seg.settings.vocabulary import PromptSpec

PROMPTS = [
    PromptSpec("a photo of a potted plant and a dog", ("pottedplant", "dog"), (16, 12), ("potted plant", "dog")),
    PromptSpec("a photo of a motorbike", ("motorbike",), (14,), ("motorbike",)),
]
JOINT = ("sd3", "flux", "flux-schnell")
FAMILY_OF_FLAVOR = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "flux-schnell": "flux",
                    "pixart": "pixart", "sana": "sana"}


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(flavor):
        if flavor not in cache:
            cache[flavor] = build_tiny_pipeline(flavor)
            cache[flavor].set_progress_bar_config(disable=True)
        return cache[flavor]

    return get


def sampler_for(pipe, **mask):
    return CapturingPipeline(pipe, MaskConfig(**mask), GeneratorConfig(num_inference_steps=2))


def size_of(flavor):
    return TINY_IMAGE_SIZES[flavor], TINY_IMAGE_SIZES[flavor]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_family_labels_its_images_with_default_settings(pipes, flavor):
    pipe = pipes(flavor)
    sampler = sampler_for(pipe)
    assert sampler.family.name == FAMILY_OF_FLAVOR[flavor]
    assert sampler.spec.text_factors == TEXT_ATTENTION_FACTORS[flavor]
    counts = {}
    original_add = sampler.store.add

    def add(maps):
        counts[sampler.store.factor_of(maps.shape[-1])] = counts.get(sampler.store.factor_of(maps.shape[-1]), 0) + 1
        assert torch.isfinite(maps).all() and maps.shape[:2] == (2, 2)
        original_add(maps)

    sampler.store.add = add
    batch = sampler.generate(PROMPTS, [0, 1], size_of(flavor), keep_maps=True)
    h, w = size_of(flavor)
    assert batch.images.shape == (2, 3, h, w) and batch.masks.shape == (2, h, w)
    assert batch.fused.shape == (2, 2, h, w) and torch.isfinite(batch.fused).all()
    assert set(batch.masks[0].unique().tolist()) <= {0, 12, 16, 255}
    assert set(batch.masks[1].unique().tolist()) <= {0, 14, 255}
    assert batch.class_ids.tolist() == [[16, 12], [14, 0]]
    # Recorded at exactly the factors the model's spec says its text attention runs at, every step.
    assert set(counts) == set(TEXT_ATTENTION_FACTORS[flavor])
    assert sum(counts.values()) == 2 * len(sampler.capturing_layers)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_capture_does_not_change_the_images(pipes, flavor):
    pipe = build_tiny_pipeline(flavor)  # stock processors
    pipe.set_progress_bar_config(disable=True)
    sampler = sampler_for(pipe)
    h, w = size_of(flavor)
    bare = pipe(prompt=[p.text for p in PROMPTS], height=h, width=w, num_inference_steps=2,
                guidance_scale=sampler.generator_config.guidance_scale, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **sampler.call_options).images
    captured = sampler.generate(PROMPTS, [0, 1], (h, w)).images
    assert torch.allclose(bare, captured, atol=1e-5)


@pytest.mark.parametrize("flavor", ["sd3", "flux", "pixart", "sana", "sdxl"])
def test_multi_piece_class_names_are_found_in_every_text_part(pipes, flavor):
    sampler = sampler_for(pipes(flavor))
    weights, _ = class_token_weights(sampler.text, PROMPTS)
    assert weights.shape[-1] == sum(s.length for s in sampler.text)
    offset = 0
    for segment in sampler.text:
        part = weights[:, :, offset: offset + segment.length]
        offset += segment.length
        if segment.tokenizer is None:
            assert part.sum() == 0
            continue
        spm = "Gemma" in type(segment.tokenizer).__name__ or "T5" in type(segment.tokenizer).__name__
        if spm:
            # "potted plant" is "▁pot", "ted", "▁plant" in these vocabularies; "motorbike" two pieces.
            assert part[0, 0].sum() == len(sentencepiece_pieces("potted")) + len(sentencepiece_pieces("plant")) == 3
            assert part[1, 0].sum() == len(sentencepiece_pieces("motorbike")) == 2
        else:
            assert part[0, 0].sum() == 2 and part[1, 0].sum() == 1  # CLIP: one token per word here
        assert part[0, 1].sum() == 1 and part[1, 1].sum() == 0  # "dog"; slot 2 of prompt 2 unused
        if segment.prefix:
            continue  # Sana's instruction prefix: positions are checked below
        ids = segment.tokenizer(PROMPTS[0].text.lower() if segment.lower else PROMPTS[0].text,
                                max_length=segment.length, truncation=True)["input_ids"]
        marked = part[0, 0].nonzero().flatten().tolist()
        text = segment.tokenizer.decode([ids[i] for i in marked]).replace(" ", "")
        assert text == "pottedplant"
    if flavor == "sd3":  # the class appears in the CLIP part and again in the T5 part
        assert [s.tokenizer is not None for s in sampler.text] == [True, True]


def test_sana_positions_follow_the_instruction_prefix(pipes):
    sampler = sampler_for(pipes("sana"))
    (segment,) = sampler.text
    assert segment.prefix and segment.encoded_length > segment.length
    weights, _ = class_token_weights(sampler.text, PROMPTS[:1])
    # What the pipeline keeps: token 0 and the last length-1 tokens of prefix + lower-cased prompt,
    # padded on the right. The pipeline sets the tokenizer's padding side only when it first encodes
    # a prompt (this tiny one loads with "left"), so the side is given here, not read from it.
    ids = segment.tokenizer(segment.prefix + PROMPTS[0].text.lower(), padding="max_length", padding_side="right",
                            max_length=segment.encoded_length, truncation=True)["input_ids"]
    kept = [ids[0]] + ids[-segment.length + 1:]
    marked = weights[0, 0].nonzero().flatten().tolist()
    assert segment.tokenizer.decode([kept[i] for i in marked]).strip() == "potted plant"


def test_flux_has_no_unconditional_half(pipes):
    pipe = pipes("flux")
    sampler = sampler_for(pipe)
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: batches.append(k["hidden_states"].shape[0]),
                                                      with_kwargs=True)
    try:
        sampler.generate(PROMPTS, [0, 1], size_of("flux"))
    finally:
        hook.remove()
    assert batches == [2, 2]  # one row per image at every step: guidance is embedded, not batched
    sd3 = pipes("sd3")
    without_cfg = CapturingPipeline(sd3, MaskConfig(), GeneratorConfig(num_inference_steps=2, guidance_scale=1.0))
    assert without_cfg.generate(PROMPTS, [0, 1], size_of("sd3")).masks.shape == (2, 64, 64)


def test_record_joint_matches_explicit_softmax():
    torch.manual_seed(0)
    batch, heads, images, texts, dim = 2, 3, 16, 5, 8
    query, key, output = (torch.randn(2 * batch, heads, texts + images, dim) for _ in range(3))  # [uncond; cond]
    weights = torch.zeros(batch, 2, texts)
    weights[0, 0, [1, 2]] = 1
    weights[1, 0, 3] = weights[1, 1, 4] = 1
    text, image = slice(0, texts), slice(texts, texts + images)  # Flux's order: text first
    cond_q, cond_k, cond_o = query[batch:], key[batch:], output[batch:]
    scale = dim**-0.5

    def recorded(**store_settings):
        store = AttentionStore(**store_settings)
        store.begin(weights, (4, 4), num_steps=1)
        record_joint(store, scale, query, key, output, text, image)
        return store.maps()[1].flatten(2)

    probs = (cond_q[:, :, image] @ cond_k.transpose(-1, -2) * scale).softmax(-1)[..., text]  # over all keys
    want = torch.einsum("bhnt,bkt->bkn", probs, weights) / heads
    assert torch.allclose(recorded(joint_softmax="all"), want, atol=1e-5)
    probs = (cond_q[:, :, image] @ cond_k[:, :, text].transpose(-1, -2) * scale).softmax(-1)
    assert torch.allclose(recorded(joint_softmax="text"), torch.einsum("bhnt,bkt->bkn", probs, weights) / heads, atol=1e-5)
    probs = (cond_o[:, :, image] @ cond_o[:, :, text].transpose(-1, -2) * scale).softmax(-1)
    assert torch.allclose(recorded(map_source="output"), torch.einsum("bhnt,bkt->bkn", probs, weights) / heads,
                          atol=1e-5)
    # Under the model's softmax most mass goes to the image keys; renormalising over text raises it.
    assert recorded(joint_softmax="all").sum() < recorded(joint_softmax="text").sum()


@pytest.mark.parametrize("flavor", ["sd1", "sdxl", "pixart", "sana"])
def test_output_space_maps_need_joint_attention(pipes, flavor):
    with pytest.raises(ValueError, match=r"map_source='output' needs joint attention .*Stable Diffusion 3"):
        sampler_for(pipes(flavor), map_source="output")


@pytest.mark.parametrize("flavor", JOINT)
def test_output_space_maps_differ_from_softmax_maps(pipes, flavor):
    pipe = pipes(flavor)
    a = sampler_for(pipe).generate(PROMPTS, [0, 1], size_of(flavor), keep_maps=True)
    b = sampler_for(pipe, map_source="output").generate(PROMPTS, [0, 1], size_of(flavor), keep_maps=True)
    assert torch.equal(a.images, b.images) and not torch.allclose(a.fused, b.fused)


def test_model_aware_defaults_come_from_each_pipeline(pipes):
    for flavor in FLAVORS:
        pipe = pipes(flavor)
        spec = describe_pipeline(pipe)
        params = inspect.signature(type(pipe).__call__).parameters
        if flavor == "flux-schnell":
            assert (spec.num_inference_steps, spec.guidance_scale) == (4, 0.0)
        else:
            assert spec.num_inference_steps == params["num_inference_steps"].default
            assert spec.guidance_scale == params["guidance_scale"].default
        sampler = sampler_for(pipe)
        assert sampler.generator_config.guidance_scale == spec.guidance_scale
    # SDXL has no text attention at factor 1: the SD default (1, 2, 4) is never imposed on it.
    assert describe_pipeline(pipes("sdxl")).default_resolution_weights((1024, 1024)) == {2: 1.0, 4: 1.0}
    assert describe_pipeline(pipes("sd1")).default_resolution_weights((512, 512)) == {1: 1.0, 2: 1.0, 4: 1.0}


def test_saved_folders_resolve_and_fail_in_the_main_process(tmp_path):
    sdxl = save_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    config = resolve_config(sdxl)
    unet = build_tiny_pipeline("sdxl").unet.config
    assert config.image_size == (unet.sample_size * 8,) * 2
    assert (config.generator.num_inference_steps, config.generator.guidance_scale) == (50, 5.0)
    with pytest.raises(ValueError, match=r"factor\(s\) \[1\], but this Stable Diffusion XL model's text attention "
                                         r"runs at factor\(s\) \[2, 4\] only"):
        resolve_config(sdxl, mask={"resolution_weights": {1: 1.0, 2: 1.0}})
    # A preset still overrides the model, and explicit arguments override both.
    (sdxl / "ondemand_seg.json").write_text('{"generator": {"num_inference_steps": 7}}')
    assert resolve_config(sdxl).generator.num_inference_steps == 7
    assert resolve_config(sdxl, generator={"num_inference_steps": 3}).generator.num_inference_steps == 3
    sd3 = save_tiny_pipeline(tmp_path / "sd3", "sd3")
    with pytest.raises(ValueError, match=r"image_size \(72, 72\) is not a multiple of 16"):
        resolve_config(sd3, image_size=72)
    with pytest.raises(ValueError, match="self_attention_factor=4: .*runs at factor"):
        resolve_config(sd3, mask={"self_attention_factor": 4})


def test_a_transformer_folder_streams_through_from_pretrained(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "flux", "flux")
    stream = DiffuMaskStream(folder, ["dog", "pottedplant"], num_samples=2, augment=False, seed=3,
                             image_size=64, generator={"num_inference_steps": 2, "batch_size": 2},
                             quality={"min_foreground": 0.0, "max_foreground": 1.0})
    samples = list(stream)
    assert len(samples) == 2
    image, mask = samples[0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
    assert set(mask.unique().tolist()) <= {0, 12, 16, 255}
    assert type(stream.source.pipeline).__name__ == "FluxPipeline"


def test_a_pipeline_of_another_kind_is_named_early():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unconditional = DDPMPipeline(UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                             down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                                 DDPMScheduler())
    with pytest.raises(ValueError, match="cannot capture text attention from a DDPMPipeline; supported pipelines: "
                                         r"Stable Diffusion 1.x/2.x \(StableDiffusionPipeline\), Stable Diffusion XL"):
        load_pipeline(lambda: unconditional, torch.device("cpu"))
    assert {f.name for f in FAMILIES} == set(FAMILY_OF_FLAVOR.values())
    assert family_of("PixArtAlphaPipeline").name == "pixart"


@pytest.mark.parametrize("flavor", ["sd3", "flux", "pixart"])
def test_self_attention_refinement_reads_the_image_part(pipes, flavor):
    pipe = pipes(flavor)
    plain = sampler_for(pipe).generate(PROMPTS, [0, 1], size_of(flavor), keep_maps=True)
    sampler = sampler_for(pipe, self_attention_factor=2)
    refined = sampler.generate(PROMPTS, [0, 1], size_of(flavor), keep_maps=True)
    assert torch.equal(plain.images, refined.images) and not torch.allclose(plain.fused, refined.fused)
    assert sampler.store.self_attention_factors_seen == {2}


def test_unknown_map_settings_are_named():
    with pytest.raises(ValueError, match="map_source must be 'attention' or 'output', got 'concept'"):
        MaskConfig(map_source="concept")
    with pytest.raises(ValueError, match="joint_softmax must be 'all' or 'text', got 'image'"):
        MaskConfig(joint_softmax="image")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_size_multiple_covers_what_the_pipeline_itself_checks(pipes, flavor):
    # Read from the installed diffusers: each pipeline's check_inputs tests ``height % <expr> != 0``.
    pipe = pipes(flavor)
    required = re.findall(r"height % (.+?) != 0", inspect.getsource(type(pipe).check_inputs))
    assert required, f"{type(pipe).__name__}.check_inputs no longer checks the height"
    spec = describe_pipeline(pipe)
    for expression in required:
        multiple = eval(expression, {}, {"self": pipe})
        assert spec.size_multiple % multiple == 0, (expression, multiple, spec.size_multiple)
    assert spec.size_multiple % (spec.vae_factor * spec.patch) == 0, "and whole attention tokens"
    side = TINY_IMAGE_SIZES[flavor]
    spec.check_image_size((side, side))
    with pytest.raises(ValueError, match=f"is not a multiple of {spec.size_multiple}"):
        spec.check_image_size((side, side + spec.size_multiple // 2))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_saved_folders_of_every_family_pass_the_folder_check(pipes, flavor, tmp_path):
    pipes(flavor).save_pretrained(tmp_path, safe_serialization=True)
    assert check_model_source(tmp_path).family.name == FAMILY_OF_FLAVOR[flavor]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_guidance_at_or_below_one_is_refused_only_where_it_turns_guidance_off(pipes, flavor):
    spec = describe_pipeline(pipes(flavor))
    spec.check_generator(GeneratorConfig(guidance_scale=spec.guidance_scale))
    if FAMILY_OF_FLAVOR[flavor] == "flux":  # guidance-distilled: the scale is a model input, not CFG
        assert not spec.classifier_free
        spec.check_generator(GeneratorConfig(guidance_scale=0.0))
        spec.check_generator(GeneratorConfig(guidance_scale=1.0))
    else:
        assert spec.classifier_free
        with pytest.raises(ValueError, match=f"guidance_scale=1.0 turns classifier-free guidance off in a "
                                             f"{type(pipes(flavor)).__name__}"):
            spec.check_generator(GeneratorConfig(guidance_scale=1.0))


def test_a_unet_with_a_guidance_embedding_takes_guidance_as_an_input():
    from ondemand_seg.pipelines.builtin import TOY_MODEL_DIR
    from ondemand_seg.pipelines.families import describe, folder_reader

    toy = folder_reader(TOY_MODEL_DIR)
    lcm = {**toy("unet/config.json"), "time_cond_proj_dim": 256}  # LCM-distilled: no CFG in the pipeline
    spec = describe(lambda name: lcm if name == "unet/config.json" else toy(name))
    assert not spec.classifier_free
    spec.check_generator(GeneratorConfig(guidance_scale=1.0))
    assert describe(toy).classifier_free


@pytest.mark.parametrize("flavor", FLAVORS)
def test_label_free_repairs_run_on_every_family_in_constant_memory(pipes, flavor):
    pipe = pipes(flavor)
    h, w = size_of(flavor)
    spec = describe_pipeline(pipe)
    repairs = dict(aggregation="agreement", token_rescaling="tokens", threshold_mode="otsu")
    if spec.self_factors:
        repairs.update(self_attention_factor=min(spec.self_factors), self_attention_sharpness=4.0,
                       self_attention_mode="replace", self_attention_power=4, self_attention_stop="separation")
    held = {}
    for steps in (2, 3):
        sampler = CapturingPipeline(pipe, MaskConfig(**repairs), GeneratorConfig(num_inference_steps=steps))
        captured = sampler.store.captured
        # The running sums' size when the masks are read from them: the same after 2 and 3 steps.
        sampler.store.captured = lambda captured=captured, store=sampler.store: (
            held.setdefault(steps, store.memory_bytes()), captured())[1]
        batch = sampler.generate(PROMPTS, [0, 1], (h, w), keep_maps=True)
        assert batch.fused.shape == (2, 2, h, w) and torch.isfinite(batch.fused).all()
        assert set(batch.masks[1].unique().tolist()) <= {0, 14, 255}
    layer_heads = sum(sampler.denoiser.get_submodule(name[: -len(".processor")]).heads
                      for name in sampler.capturing_layers)
    assert held[2] == held[3] >= layer_heads * 2 * 2 * 4  # B x K x (one map of >= 4 pixels per layer-head) floats
