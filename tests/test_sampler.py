import json

import pytest
import torch

from ondemand_seg import MaskConfig, SamplerConfig
from ondemand_seg.prompts import PromptSpec
from ondemand_seg.sampler import DiffuMaskSampler, check_image_size, check_model_source, load_pipeline, pick_device

DOG = PromptSpec("a photograph of a dog", ("dog",), (12,), ("dog",))
BIRD_DOG = PromptSpec("a photograph of a bird and a dog", ("bird", "dog"), (3, 12), ("bird", "dog"))


@pytest.mark.parametrize("flavor", ["tiny_sd1", "tiny_sd2"])
def test_folder_pipelines_generate_images_and_masks(flavor, request):
    folder = request.getfixturevalue(flavor)
    pipeline = load_pipeline(folder, torch.device("cpu"))
    assert pipeline.unet.dtype == torch.float32 and pipeline.safety_checker is None
    sampler = DiffuMaskSampler(pipeline, MaskConfig(), SamplerConfig(num_inference_steps=3))
    batch = sampler.generate([DOG, BIRD_DOG], [1, 2], (64, 96))
    assert batch.images.shape == (2, 3, 64, 96) and batch.images.dtype == torch.float32
    assert 0 <= batch.images.min() and batch.images.max() <= 1
    assert batch.masks.shape == (2, 64, 96) and batch.masks.dtype == torch.long
    assert set(batch.masks[0].unique().tolist()) <= {0, 12, 255}
    assert set(batch.masks[1].unique().tolist()) <= {0, 3, 12, 255}
    assert (batch.masks[1] == 3).any() and (batch.masks[1] == 12).any(), "both classes of a shared prompt get pixels"


def test_image_depends_on_its_seed_not_its_batch(tiny_sd1):
    sampler = DiffuMaskSampler(load_pipeline(tiny_sd1, torch.device("cpu")), MaskConfig(), SamplerConfig(num_inference_steps=3))
    alone = sampler.generate([DOG], [7], (64, 64))
    batched = sampler.generate([BIRD_DOG, DOG, DOG], [1, 7, 8], (64, 64))
    # Batched BLAS kernels may round differently from single ones; anything beyond that is a bug.
    assert torch.allclose(alone.images[0], batched.images[1], atol=1e-4)
    assert torch.equal(alone.masks[0], batched.masks[1])
    assert not torch.allclose(batched.images[1], batched.images[2], atol=1e-2)


def test_scheduler_is_swappable(tiny_sd1):
    pipeline = load_pipeline(tiny_sd1, torch.device("cpu"), scheduler="DPMSolverMultistepScheduler")
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    batch = DiffuMaskSampler(pipeline, MaskConfig(), SamplerConfig(num_inference_steps=3)).generate([DOG], [0], (64, 64))
    assert torch.isfinite(batch.images).all()
    with pytest.raises(ValueError, match="unknown diffusers scheduler 'NoSuchScheduler'"):
        load_pipeline(tiny_sd1, torch.device("cpu"), scheduler="NoSuchScheduler")


def test_callable_model_and_window_with_no_guidance(tiny_sd1):
    calls = []

    def make():
        calls.append(1)
        return load_pipeline(tiny_sd1, torch.device("cpu"))

    pipeline = load_pipeline(make, torch.device("cpu"))
    assert calls == [1]
    sampler = DiffuMaskSampler(pipeline, MaskConfig(timestep_window=(0.5, 1.0)), SamplerConfig(num_inference_steps=4, guidance_scale=1.0))
    batch = sampler.generate([DOG, DOG], [0, 1], (64, 64))
    assert batch.masks.shape == (2, 64, 64)


def test_check_model_source(tmp_path, tiny_sd1):
    assert check_model_source(tiny_sd1) == 8
    assert check_model_source("runwayml/stable-diffusion-v1-5") == 8
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_source(str(tmp_path / "missing" / "model"))
    with pytest.raises(ValueError, match="no model_index.json"):
        check_model_source(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        check_model_source(tmp_path / "weights.bin")
    wide_vae = tmp_path / "wide"
    (wide_vae / "vae").mkdir(parents=True)
    (wide_vae / "model_index.json").write_text("{}")
    (wide_vae / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1, 1, 1, 1, 1]}))
    assert check_model_source(wide_vae) == 16


def test_check_image_size():
    assert check_image_size(512) == (512, 512)
    assert check_image_size((512, 768)) == (512, 768)
    with pytest.raises(ValueError, match=r"image_size \(512, 100\) is not a multiple of 8"):
        check_image_size((512, 100))
    with pytest.raises(ValueError, match="positive ints"):
        check_image_size(-8)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        check_image_size(72, 16)


def test_pick_device_round_robin_or_cpu():
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device(None, slot=3) == torch.device("cpu")
    else:
        assert pick_device(None, slot=3).index == 3 % torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_is_fp16(tiny_sd1):
    pipeline = load_pipeline(tiny_sd1, torch.device("cuda"))
    assert pipeline.unet.dtype == torch.float16
    batch = DiffuMaskSampler(pipeline, MaskConfig(), SamplerConfig(num_inference_steps=3)).generate([DOG], [0], (64, 64))
    assert batch.images.device.type == "cpu" and torch.isfinite(batch.images).all()


def test_model_folder_preset_supplies_defaults(tmp_path):
    import shutil

    from ondemand_seg.source import SampleSource
    from ondemand_seg.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "m")
    preset = {"label_space": ["background", "blob", "dog"], "image_size": 32,
              "mask": {"threshold": 0.3, "resolution_weights": {"1": 2.0}}, "sampler": {"templates": ["a {}"]}}
    (folder / "ondemand_seg.json").write_text(json.dumps(preset))
    source = SampleSource(folder, ["blob"])
    assert source.label_space == ("background", "blob", "dog") and source.class_ids == [1]
    assert source.image_size == (32, 32)
    assert source.mask_config.threshold == 0.3 and source.mask_config.resolution_weights == {1: 2.0}
    assert source.sampler_config.templates == ("a {}",)
    explicit = SampleSource(folder, ["dog"], image_size=64, mask=MaskConfig(threshold=0.5))
    assert explicit.image_size == (64, 64) and explicit.mask_config.threshold == 0.5
    shutil.rmtree(folder / "unet")
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        SampleSource(folder, ["cat"])
