import numpy as np
import pytest
import torch

from ondemand_seg.pipelines.tiny import TINY_IMAGE_SIZES, build_tiny_pipeline
from ondemand_seg.real import DiffuMaskLabeler, LabelConfig
from ondemand_seg.real.inversion import inverted_start
from ondemand_seg.toyworld import ToyWorld

SUPPORTED = ("sd1", "sd2", "sdxl", "sd3", "flux")  # sd2: v prediction; sdxl: Euler's scaled input


def tiny_labeler(flavor, **labelling):
    return DiffuMaskLabeler(lambda: build_tiny_pipeline(flavor), vocabulary="voc", image_size=TINY_IMAGE_SIZES[flavor],
                            generator={"num_inference_steps": 4},
                            labelling={"num_inference_steps": 8, "recorded_steps": 2, **labelling})


def noise_image(height, width, seed=0):
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def run_counted(labeler, images, tags):
    """Labels, denoiser calls and capture records of one call."""
    denoiser = getattr(labeler.generator.pipeline, labeler.generator.capturing.family.denoiser)
    store = labeler.generator.capturing.store
    calls, records, add = [], [], store.add
    handle = denoiser.register_forward_hook(lambda *args: calls.append(1))
    store.add = lambda *args, **kwargs: (records.append(1), add(*args, **kwargs))[1]
    try:
        return labeler.label(images, tags), len(calls), len(records)
    finally:
        handle.remove()
        store.add = add


@pytest.mark.parametrize("flavor", SUPPORTED)
def test_inversion_labels_every_family_deterministically_and_records_only_the_denoising_steps(flavor):
    image = noise_image(40, 50)
    inverted = tiny_labeler(flavor, strength=0.5, noise="inversion")
    labels, calls, records = run_counted(inverted, [image, image], [["dog"], ["dog"]])
    for label in labels:
        assert label.reason is None and label.mask.shape == (40, 50)
    # Positions 0 and 1 draw different noise seeds; inverted, the image alone decides its mask.
    assert np.array_equal(labels[0].mask, labels[1].mask)
    assert np.array_equal(inverted(image, ["dog"]).mask, labels[0].mask)
    # Strength 0.5 of 8 steps: 3 inversion calls below the start and 1 at it, then 2 recorded steps.
    assert calls == 6
    _, random_calls, random_records = run_counted(tiny_labeler(flavor, strength=0.5), [image, image], [["dog"], ["dog"]])
    assert random_calls == 2
    assert records == random_records, "the inversion's denoiser calls are not recorded"
    scheduler = inverted.img2img.scheduler
    assert not {"add_noise", "scale_noise", "step"} & set(vars(scheduler)), "the scheduler is restored"


def test_random_noise_gives_the_same_image_a_mask_that_depends_on_its_position():
    image = noise_image(40, 50)
    labels = tiny_labeler("sd1", strength=0.5).label([image, image], [["dog"], ["dog"]])
    assert not np.array_equal(labels[0].mask, labels[1].mask)


@pytest.mark.parametrize("model", ["toy", "toy-mmdit"])
def test_inverted_latent_denoises_back_to_the_image(model):
    """DDIM (toy) and flow-matching (toy-mmdit) inversion: denoising the inverted latent over the
    rest of the schedule lands far closer to the image's clean latent than from random noise."""
    torch.manual_seed(0)
    labeler = DiffuMaskLabeler(model)
    pipeline, family = labeler.img2img, labeler.generator.capturing.family
    image = torch.from_numpy(ToyWorld(labeler.image_size, seed=5).sample(0).image).permute(2, 0, 1)[None].float() / 255
    errors = {}
    with torch.inference_mode():
        vae = pipeline.vae
        clean = (vae.encode(image * 2 - 1).latent_dist.mode() - (getattr(vae.config, "shift_factor", None) or 0)) \
            * vae.config.scaling_factor
        for noise in ("random", "inversion"):
            context = (inverted_start(pipeline, getattr(pipeline, family.denoiser), family.name,
                                      labeler.generator.capturing.store) if noise == "inversion" else torch.no_grad())
            with context:
                out = pipeline(prompt=["a photo"], image=image, strength=0.3, num_inference_steps=20, guidance_scale=1.0,
                               generator=torch.Generator().manual_seed(0), output_type="latent",
                               **labeler._call_options).images
            errors[noise] = float((out - clean).pow(2).mean() / clean.pow(2).mean())
    assert errors["inversion"] < errors["random"] / 4, errors


def test_noise_setting_is_checked():
    assert LabelConfig().noise == "random"
    assert LabelConfig(noise="inversion").noise == "inversion"
    with pytest.raises(ValueError, match=r"noise must be one of \('random', 'inversion'\), got 'ddim'"):
        LabelConfig(noise="ddim")
