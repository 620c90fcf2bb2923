import numpy as np
import pytest
import torch

from ondemand_seg import DiffuMaskGenerator
from ondemand_seg.pipelines.tiny import TINY_IMAGE_SIZES, build_tiny_pipeline, save_tiny_pipeline
from ondemand_seg.real import DiffuMaskLabeler, LabelConfig
from ondemand_seg.toyworld import TOY_CLASSES, ToyWorld

SUPPORTED = ("sd1", "sdxl", "sd3", "flux")
DOG, CAT = 12, 8  # VOC ids


def tiny_labeler(flavor, **labelling):
    return DiffuMaskLabeler(lambda: build_tiny_pipeline(flavor), vocabulary="voc", image_size=TINY_IMAGE_SIZES[flavor],
                            generator={"num_inference_steps": 4}, labelling=labelling)


def noise_image(height, width, seed=0):
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("flavor", SUPPORTED)
def test_every_supported_family_labels_a_real_image_at_its_own_size(flavor):
    labeler = tiny_labeler(flavor, strength=(0.5, 1.0), recorded_steps=2)
    denoiser = getattr(labeler.generator.pipeline, labeler.generator.capturing.family.denoiser)
    calls = []
    handle = denoiser.register_forward_hook(lambda *args: calls.append(1))
    try:
        labels = labeler.label([noise_image(40, 50), noise_image(40, 50, 1)], [["dog"], ["dog", "cat"]])
    finally:
        handle.remove()
    # Two passes (one per strength) of two recorded steps each; the rest of each schedule is skipped.
    assert len(calls) == 4
    assert [label.index for label in labels] == [0, 1]
    for label, allowed in zip(labels, ({0, DOG, 255}, {0, DOG, CAT, 255})):
        assert label.mask.shape == (40, 50) and label.mask.dtype == np.uint8
        assert set(np.unique(label.mask).tolist()) <= allowed
    assert labels[1].classes == ("dog", "cat") and labels[1].absent == ()
    assert labeler.counts()["generated"] == 2


def test_families_without_an_image_to_image_pipeline_are_refused_by_name(tmp_path):
    labeler = tiny_labeler("pixart")  # a callable's family is known once it loads
    with pytest.raises(ValueError, match="PixArt.*supported: Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 and Flux"):
        labeler.label([noise_image(64, 64)], [["dog"]])
    folder = save_tiny_pipeline(tmp_path / "pixart", "pixart")  # a folder's is known from its configs
    with pytest.raises(ValueError, match="PixArt.*supported: Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 and Flux"):
        DiffuMaskLabeler(str(folder), vocabulary="voc")


@pytest.fixture(scope="module")
def toy():
    return DiffuMaskLabeler("toy", labelling={"strength": 0.04, "num_inference_steps": 50})


@pytest.fixture(scope="module")
def world():
    return ToyWorld(32, seed=5)


def test_toy_pseudo_masks_find_the_tagged_objects(toy, world):
    samples = [world.sample(i) for i in range(8)]
    labels = toy.label([s.image for s in samples], [s.class_names for s in samples])
    inter = union = 0
    for sample, label in zip(samples, labels):
        assert label.reason is None
        assert set(np.unique(label.mask).tolist()) <= {0, 255} | {TOY_CLASSES.index(n) for n in sample.class_names}
        valid = label.mask != 255
        inter += ((label.mask == sample.mask) & (sample.mask > 0) & valid).sum()
        union += (((label.mask > 0) | (sample.mask > 0)) & valid).sum()
    assert inter / union > 0.6


def test_labelling_is_deterministic_and_leaves_generation_unchanged(toy, world):
    sample = world.sample(0)
    generator = DiffuMaskGenerator("toy", ["circle"], seed=0)
    before = generator.samples([0])[0].mask
    shared = DiffuMaskLabeler.from_generator(generator, {"strength": 0.04, "num_inference_steps": 50})
    first = shared(sample.image, sample.class_names).mask
    assert shared.img2img.unet is generator.pipeline.unet, "the generator's loaded model is reused"
    assert np.array_equal(first, toy(sample.image, sample.class_names).mask)
    assert np.array_equal(generator.samples([0])[0].mask, before)


def test_other_sizes_and_modes_are_converted(toy, world):
    import PIL.Image

    sample = ToyWorld((48, 40), seed=5).sample(1)
    rgba = PIL.Image.fromarray(sample.image).convert("RGBA")
    label = toy(rgba, sample.class_names)
    assert label.mask.shape == (48, 40)
    gray = toy(PIL.Image.fromarray(sample.image).convert("L"), sample.class_names)
    assert gray.mask is None or gray.mask.shape == (48, 40)


def test_untagged_images_keep_the_strongest_classes(world):
    labeler = DiffuMaskLabeler("toy", labelling={"strength": 0.04, "num_inference_steps": 50, "absent_ratio": 0.9})
    sample = world.sample(2)
    label = labeler(sample.image)
    assert set(label.classes) | set(label.absent) == set(TOY_CLASSES[1:])
    assert label.classes, "the strongest class is never called absent"
    assert labeler.counts()["absent_classes"] == len(label.absent)


def test_the_quality_gate_leaves_out_and_counts_bad_pseudo_masks(world):
    flat = np.full((32, 32, 3), 128, np.uint8)
    labeler = DiffuMaskLabeler("toy", labelling={"strength": 0.04, "num_inference_steps": 50},
                               quality={"min_foreground": 0.9})
    sample = world.sample(0)
    labels = labeler.label([flat, sample.image], [["circle"], sample.class_names])
    assert labels[0].mask is None and labels[0].reason == "constant image"
    assert labels[1].mask is None and labels[1].reason == "empty mask"
    counts = labeler.counts()
    assert counts["generated"] == 2 and counts["accepted"] == 0
    assert counts["constant image"] == 1 and counts["empty mask"] == 1

    store = labeler.generator.capturing.store
    add = store.add
    store.add = lambda maps: add(torch.full_like(maps, float("nan")))
    try:
        assert labeler(sample.image, sample.class_names).reason == "non-finite attention"
    finally:
        store.add = add
    assert labeler.counts()["non-finite attention"] == 1


def test_bad_tags_and_inputs_are_named(toy):
    image = noise_image(32, 32)
    with pytest.raises(ValueError, match=r"tags\[0\] names \['dragon'\].*circle"):
        toy.label([image], [["dragon"]])
    with pytest.raises(ValueError, match=r"tags\[0\] is empty"):
        toy.label([image], [[]])
    with pytest.raises(ValueError, match="one list of class names per image"):
        toy.label([image, image], [["circle"]])
    with pytest.raises(ValueError, match="background"):
        toy.label([image], [["background"]])
    with pytest.raises(ValueError, match="images is empty"):
        toy.label([])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        toy.label([image, np.full((8, 8, 3), 3.0)], [["circle"], ["circle"]])
    with pytest.raises(ValueError, match=r"strength \[0.01\] starts no step of a 50-step schedule"):
        DiffuMaskLabeler.from_generator(toy.generator, {"strength": 0.01, "num_inference_steps": 50})
    with pytest.raises(TypeError, match="generator must be a DiffuMaskGenerator, got str"):
        DiffuMaskLabeler.from_generator("toy")
    with pytest.raises(ValueError, match="repeats 'circle'"):
        DiffuMaskLabeler.from_generator(toy.generator, classes=["circle", "circle"])


def test_label_config_checks_its_fields():
    assert LabelConfig(strength=0.5).strength == (0.5,)
    for bad in (0, 1.5, (), (0.3, -1)):
        with pytest.raises(ValueError, match="strength"):
            LabelConfig(strength=bad)
    with pytest.raises(ValueError, match="absent_ratio"):
        LabelConfig(absent_ratio=1.0)
    with pytest.raises(ValueError, match="recorded_steps"):
        LabelConfig(recorded_steps=0)


def test_label_config_takes_numpy_numbers_and_refuses_what_no_call_could_use():
    config = LabelConfig(strength=np.float32(0.25), absent_ratio=np.float32(0.5), num_inference_steps=np.int64(20),
                         guidance_scale=np.float64(3.0))
    assert config.strength == (0.25,) and config.absent_ratio == 0.5 and type(config.num_inference_steps) is int
    assert LabelConfig(strength=[np.float32(0.25), 0.5]).strength == (0.25, 0.5)
    for bad in (float("nan"), "7", True):
        with pytest.raises((TypeError, ValueError), match="guidance_scale"):
            LabelConfig(guidance_scale=bad)
    with pytest.raises(ValueError, match="strength"):
        LabelConfig(strength=torch.tensor([0.1, 0.2]))
    # Refused at construction, not at the first call (in a DataLoader worker).
    with pytest.raises(ValueError, match=r"strength \[0.01\] starts no step of a 50-step schedule"):
        LabelConfig(strength=0.01)
