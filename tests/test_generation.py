import pytest
import torch

from ondemand_seg import GeneratorConfig, MaskConfig
from ondemand_seg.generation.generator import CapturingPipeline, GeneratedBatch
from ondemand_seg.pipelines.loading import load_pipeline
from ondemand_seg.pipelines.tiny import build_tiny_pipeline
from ondemand_seg.settings.vocabulary import PromptSpec

DOG = PromptSpec("a photograph of a dog", ("dog",), (12,), ("dog",))
BIRD_DOG = PromptSpec("a photograph of a bird and a dog", ("bird", "dog"), (3, 12), ("bird", "dog"))


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("flavor", ["tiny_sd1", "tiny_sd2"])
def test_folder_pipelines_generate_images_and_masks(flavor, request):
    folder = request.getfixturevalue(flavor)
    sampler = CapturingPipeline(load_pipeline(folder, torch.device("cpu")), MaskConfig(), GeneratorConfig(num_inference_steps=3))
    batch = sampler.generate([DOG, BIRD_DOG], [1, 2], (64, 96))
    assert batch.images.shape == (2, 3, 64, 96) and batch.images.dtype == torch.float32
    assert 0 <= batch.images.min() and batch.images.max() <= 1
    assert batch.masks.shape == (2, 64, 96) and batch.masks.dtype == torch.long
    assert set(batch.masks[0].unique().tolist()) <= {0, 12, 255}
    assert set(batch.masks[1].unique().tolist()) <= {0, 3, 12, 255}
    assert (batch.masks[1] == 3).any() and (batch.masks[1] == 12).any(), "both classes of a shared prompt get pixels"
    assert batch.fused is None and batch.class_ids is None, "maps are kept only when asked"


def test_keep_maps_returns_the_maps_the_masks_came_from(tiny_pipe):
    sampler = CapturingPipeline(tiny_pipe, MaskConfig(), GeneratorConfig(num_inference_steps=2))
    batch = sampler.generate([DOG, BIRD_DOG], [1, 2], (64, 64), keep_maps=True)
    assert batch.fused.shape == (2, 2, 64, 64) and batch.fused.device.type == "cpu"
    assert 0 <= batch.fused.min() and batch.fused.max() <= 1
    assert batch.class_ids.tolist() == [[12, 0], [3, 12]]
    assert batch.finite_maps.tolist() == [True, True]
    # Where a class's map clears γ + band and beats the other slot, the mask carries that class.
    band = MaskConfig().threshold + MaskConfig().ignore_band
    sure_dog = (batch.fused[0, 0] >= band)
    assert sure_dog.any() and (batch.masks[0][sure_dog] == 12).all()
    assert ((batch.masks[0] == 12) <= sure_dog).all()


def test_non_finite_attention_is_flagged_and_kept_out_of_the_mask(tiny_pipe, monkeypatch):
    sampler = CapturingPipeline(tiny_pipe, MaskConfig(), GeneratorConfig(num_inference_steps=2))
    clean = sampler.generate([DOG, DOG], [1, 2], (64, 64), keep_maps=True)
    assert (clean.masks[1] == 12).any(), "premise: the clean dog map labels pixels"
    real_add = sampler.store.add

    def add_with_nan(class_maps):
        # One latent pixel of image 1's dog map at factor 1 (8x8 queries), in every layer there.
        if class_maps.shape[-1] == 64:
            class_maps = class_maps.clone()
            class_maps[1, 0, 0] = float("nan")
        real_add(class_maps)

    monkeypatch.setattr(sampler.store, "add", add_with_nan)
    batch = sampler.generate([DOG, DOG], [1, 2], (64, 64), keep_maps=True)
    assert batch.finite_maps.tolist() == [True, False] and batch.finite_maps.device.type == "cpu"
    assert torch.equal(batch.images, clean.images), "the NaN is in the recording, not the image"
    assert torch.equal(batch.masks[0], clean.masks[0])
    unknown = ~torch.isfinite(batch.fused[1, 0])
    assert unknown[0, 0] and not unknown[16:, :].any() and not unknown[:, 16:].any(), "the NaN stays local"
    assert (batch.masks[1][unknown] == 255).all(), "unknown pixels are ignore, never background"
    assert (batch.masks[1] == 12).any(), "the rest of the dog map still labels the dog"
    plain = sampler.generate([DOG, DOG], [1, 2], (64, 64))
    assert plain.finite_maps.tolist() == [True, False], "flagged without keep_maps too"


def test_a_neglected_class_is_labelled_as_not_named_and_counted(tiny_pipe, monkeypatch):
    config = MaskConfig(neglect_ratio=0.5)
    sampler = CapturingPipeline(tiny_pipe, config, GeneratorConfig(num_inference_steps=2))
    clean = sampler.generate([BIRD_DOG, BIRD_DOG], [1, 2], (64, 64), keep_maps=True)
    assert clean.neglected.tolist() == [0, 0] and clean.class_ids.tolist() == [[3, 12], [3, 12]]
    assert (clean.masks[0] == 3).any(), "premise: the bird labels pixels when its attention is not faint"
    real_add = sampler.store.add

    def faint_bird(class_maps):
        # Image 0's bird token gets 1% of its attention in every layer: the model "did not draw" it.
        class_maps = class_maps.clone()
        class_maps[0, 0] *= 0.01
        real_add(class_maps)

    monkeypatch.setattr(sampler.store, "add", faint_bird)
    batch = sampler.generate([BIRD_DOG, BIRD_DOG], [1, 2], (64, 64), keep_maps=True)
    assert batch.neglected.tolist() == [1, 0]
    assert batch.class_ids.tolist() == [[0, 12], [3, 12]]
    assert not (batch.masks[0] == 3).any() and (batch.masks[0] == 12).any()
    assert torch.equal(batch.masks[1], clean.masks[1])
    # Without the rule the faint bird's map, stretched to [0, 1], still claims pixels.
    sampler.mask_config = MaskConfig()
    kept = sampler.generate([BIRD_DOG, BIRD_DOG], [1, 2], (64, 64))
    assert kept.neglected.tolist() == [0, 0] and (kept.masks[0] == 3).any()


def test_image_depends_on_its_seed_not_its_batch(tiny_sd1):
    sampler = CapturingPipeline(load_pipeline(tiny_sd1, torch.device("cpu")), MaskConfig(), GeneratorConfig(num_inference_steps=3))
    alone = sampler.generate([DOG], [7], (64, 64))
    batched = sampler.generate([BIRD_DOG, DOG, DOG], [1, 7, 8], (64, 64))
    # Batched BLAS kernels may round differently from single ones; anything beyond that is a bug.
    assert torch.allclose(alone.images[0], batched.images[1], atol=1e-4)
    assert torch.equal(alone.masks[0], batched.masks[1])
    assert not torch.allclose(batched.images[1], batched.images[2], atol=1e-2)


def test_swapped_scheduler_generates(tiny_sd1):
    pipeline = load_pipeline(tiny_sd1, torch.device("cpu"), scheduler="DPMSolverMultistepScheduler")
    batch = CapturingPipeline(pipeline, MaskConfig(), GeneratorConfig(num_inference_steps=3)).generate([DOG], [0], (64, 64))
    assert torch.isfinite(batch.images).all() and batch.masks.shape == (1, 64, 64)


def test_callable_model_and_window_with_no_guidance(tiny_sd1):
    pipeline = load_pipeline(lambda: load_pipeline(tiny_sd1, torch.device("cpu")), torch.device("cpu"))
    sampler = CapturingPipeline(pipeline, MaskConfig(timestep_window=(0.5, 1.0)), GeneratorConfig(num_inference_steps=4, guidance_scale=1.0))
    batch = sampler.generate([DOG, DOG], [0, 1], (64, 64))
    assert batch.masks.shape == (2, 64, 64)


def test_refinements_change_the_maps_not_the_images(tiny_pipe):
    plain = CapturingPipeline(tiny_pipe, MaskConfig(), GeneratorConfig(num_inference_steps=2)).generate([DOG], [0], (64, 64), keep_maps=True)
    for config in (MaskConfig(threshold_mode="otsu"), MaskConfig(refine="affinity"), MaskConfig(self_attention_factor=1)):
        batch = CapturingPipeline(tiny_pipe, config, GeneratorConfig(num_inference_steps=2)).generate([DOG], [0], (64, 64), keep_maps=True)
        assert torch.allclose(batch.images, plain.images, atol=1e-5), "refinement must not change the image"
        assert set(batch.masks.unique().tolist()) <= {0, 12, 255}
        if config.threshold_mode == "fixed":
            assert not torch.allclose(batch.fused, plain.fused), config
        else:
            assert torch.equal(batch.fused, plain.fused), "Otsu changes γ, not the maps"
    with pytest.raises(ValueError, match=r"self_attention_factor=8: .* self-attention runs at factor\(s\) \[1, 2, 4\]"):
        CapturingPipeline(tiny_pipe, MaskConfig(self_attention_factor=8), GeneratorConfig(num_inference_steps=2))


def test_a_failed_batch_leaves_the_sampler_usable(tiny_pipe):
    # A resolution the model lacks is named at construction ...
    with pytest.raises(ValueError, match=r"factor\(s\) \[16\], but this Stable Diffusion 1.x/2.x model's text "
                                         r"attention runs at factor\(s\) \[1, 2, 4\] only"):
        CapturingPipeline(tiny_pipe, MaskConfig(resolution_weights={1: 1.0, 16: 1.0}), GeneratorConfig(num_inference_steps=2))
    # ... so a batch that fails after the denoising (here: the same setting slipped in later) is made.
    sampler = CapturingPipeline(tiny_pipe, MaskConfig(), GeneratorConfig(num_inference_steps=2))
    sampler.mask_config = MaskConfig(resolution_weights={1: 1.0, 16: 1.0})
    with pytest.raises(ValueError, match=r"no cross-attention was captured at latent factor\(s\) \[16\]"):
        sampler.generate([DOG], [0], (64, 64))
    assert sampler.store.memory_bytes() == 0 and not sampler.store.recording
    sampler.mask_config = MaskConfig()
    assert sampler.generate([DOG], [0], (64, 64)).masks.shape == (1, 64, 64)


def test_uint8_images_rounds_and_clamps():
    images = torch.tensor([0.0, 0.5, 1.0, 1.5, -0.2, 0.999]).view(1, 3, 1, 2)
    batch = GeneratedBatch(images, torch.zeros(1, 1, 2, dtype=torch.long))
    out = batch.uint8_images()
    assert out.shape == (1, 1, 2, 3) and out.dtype.name == "uint8"
    # channel-last: pixel (0, 0) is (R, G, B) = (0.0, 1.0, -0.2), pixel (0, 1) is (0.5, 1.5, 0.999)
    assert out[0, 0, 0].tolist() == [0, 255, 0] and out[0, 0, 1].tolist() == [128, 255, 255]


def test_channels_last_gives_the_same_masks():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plain = CapturingPipeline(pipe, MaskConfig(), GeneratorConfig(num_inference_steps=3))
    reference = plain.generate([DOG, BIRD_DOG], [1, 2], (64, 64), keep_maps=True)
    sampler = CapturingPipeline(pipe, MaskConfig(), GeneratorConfig(num_inference_steps=3, channels_last=True))
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not pipe.unet.conv_in.weight.is_contiguous(), "premise: the weights really changed layout"
    batch = sampler.generate([DOG, BIRD_DOG], [1, 2], (64, 64), keep_maps=True)
    # Channels-last convolutions sum in another order: float rounding, nothing more.
    assert torch.allclose(batch.images, reference.images, atol=1e-4)
    assert torch.allclose(batch.fused, reference.fused, atol=1e-4)
    assert torch.equal(batch.masks, reference.masks)


def generate_counting(sampler, seeds):
    """``sampler.generate`` with keep_maps, and the per-factor layer counts the store averaged over."""
    counts = {}
    captured = sampler.store.captured

    def spy():
        counts.update(sampler.store.counts)
        return captured()

    sampler.store.captured = spy
    try:
        return sampler.generate([DOG, BIRD_DOG], seeds, (64, 64), keep_maps=True), counts
    finally:
        del sampler.store.captured


@pytest.mark.slow  # compiling the toy UNet takes most of a minute on 2 cores
@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile does not run on this Python")
def test_compiled_capture_gives_the_same_masks_without_graph_breaks_or_per_step_graphs(monkeypatch):
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    from ondemand_seg.generation import generator as generation

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # A window inside (0, 1): steps before, inside and after it, and the first recorded step.
    mask_config, steps = MaskConfig(timestep_window=(0.25, 0.75)), 6
    reference, reference_counts = generate_counting(
        CapturingPipeline(pipe, mask_config, GeneratorConfig(num_inference_steps=steps)), [1, 2])
    # Dynamo traces as for inductor; the counter runs the graphs eagerly and counts them.
    graphs = CompileCounter()
    monkeypatch.setattr(generation, "COMPILE_BACKEND", graphs)
    torch._dynamo.reset()
    counters.clear()
    try:
        sampler = CapturingPipeline(pipe, mask_config, GeneratorConfig(num_inference_steps=steps, compile=True))
        first, first_counts = generate_counting(sampler, [1, 2])
        assert not counters["graph_break"], dict(counters["graph_break"])
        # Not recording before the window, recording into empty sums, recording, not recording after.
        assert graphs.frame_count == 4, "one graph per capture branch, not one per step"
        again, _ = generate_counting(sampler, [3, 4])
        assert graphs.frame_count == 4, "a second batch of the same size reuses the graphs"
    finally:
        torch._dynamo.reset()
    # Python state the compiled graphs update: 4 recorded steps x the tiny UNet's 3, 3 and 4 layers.
    assert first_counts == reference_counts == {1: 12, 2: 12, 4: 16}
    assert torch.equal(first.masks, reference.masks)
    assert torch.allclose(first.fused, reference.fused, atol=1e-6)
    assert torch.allclose(first.images, reference.images, atol=1e-6)
    assert not torch.equal(again.images, first.images), "other seeds, other images"
