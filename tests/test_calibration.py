import numpy as np
import pytest
import torch

import ondemand_seg.generation.calibration as calibration
import ondemand_seg.generation.generator as source_module
from ondemand_seg import MaskConfig
from ondemand_seg.generation.calibration import calibrate_class_thresholds
from ondemand_seg.generation.generator import DiffuMaskGenerator, GeneratedBatch
from ondemand_seg.generation.seeding import SubStream, derive_seed, sample_seed
from ondemand_seg.pipelines.builtin import RANDOM_WEIGHTS_MODEL
from ondemand_seg.settings.vocabulary import Vocabulary
from ondemand_seg.toyworld import TOY_CLASSES


class RampSampler:
    """Stands in for the pipeline: each map is a left-to-right ramp, and the image shows it."""

    def __init__(self):
        self.seeds = []
        self.prompts = []

    def generate(self, prompts, seeds, size, keep_maps=False):
        self.seeds += list(seeds)
        self.prompts += list(prompts)
        ramp = torch.linspace(0, 1, size[1]).expand(*size)
        fused = ramp.expand(len(prompts), 1, *size).clone()
        images = ramp.expand(len(prompts), 3, *size).clone()
        ids = torch.tensor([[p.class_ids[0]] for p in prompts])
        return GeneratedBatch(images, torch.zeros(len(prompts), *size, dtype=torch.long), fused, ids)


class GatedSampler:
    """Stands in for the pipeline in training draws: the first ``reject_rounds`` calls give empty
    masks, which the quality gate rejects, so every sample is redrawn with its next attempt."""

    def __init__(self, reject_rounds):
        self.reject_rounds = reject_rounds
        self.calls = 0
        self.seeds = []

    def generate(self, prompts, seeds, size, keep_maps=False):
        self.calls += 1
        self.seeds += list(seeds)
        masks = torch.zeros(len(prompts), *size, dtype=torch.long)
        if self.calls > self.reject_rounds:
            for j, prompt in enumerate(prompts):
                masks[j, : size[0] // 2, : size[1] // 2] = prompt.class_ids[0]
        images = torch.linspace(0, 1, size[1]).expand(len(prompts), 3, *size).clone()  # a gradient, not one colour
        return GeneratedBatch(images, masks)


def ramp_source(classes, seed=0, vocabulary="toy"):
    source = DiffuMaskGenerator(RANDOM_WEIGHTS_MODEL, classes, seed=seed, vocabulary=vocabulary, image_size=32)
    source._capturing = RampSampler()
    return source


def test_each_class_gets_the_threshold_its_labels_imply():
    cut = {"circle": 0.6, "ring": 0.3}
    drawings = Vocabulary.plain(TOY_CLASSES, templates=["a drawing of a {class}"])
    source = ramp_source(list(cut), vocabulary=drawings)
    labels = lambda image, name: image[..., 0] / 255.0 >= cut[name]  # noqa: E731
    gammas = calibrate_class_thresholds(source, labels, n_per_class=3)
    assert set(gammas) == set(cut)
    for name, want in cut.items():
        assert gammas[name] == pytest.approx(want, abs=0.03)
    assert len(set(source.capturing.seeds)) == 6, "every calibration image has its own seed"
    # One-class prompts drawn from the source's vocabulary, three per class.
    assert sorted(p.class_names for p in source.capturing.prompts) == [("circle",)] * 3 + [("ring",)] * 3
    assert all(p.text == f"a drawing of a {p.class_names[0]}" for p in source.capturing.prompts)
    assert {p.class_ids for p in source.capturing.prompts} == {(source.label_space.index(n),) for n in cut}
    MaskConfig(class_thresholds=gammas)  # the result is a valid config


def test_batches_do_not_change_the_result_or_the_seeds():
    labels = lambda image, name: image[..., 0] >= 100  # noqa: E731
    one = ramp_source(["circle", "square"])
    small = ramp_source(["circle", "square"])
    assert calibrate_class_thresholds(one, labels, n_per_class=3) == calibrate_class_thresholds(
        small, labels, n_per_class=3, batch_size=2)
    assert one.capturing.seeds == small.capturing.seeds
    other_base = ramp_source(["circle", "square"], seed=1)
    calibrate_class_thresholds(other_base, labels, n_per_class=3)
    assert not set(other_base.capturing.seeds) & set(one.capturing.seeds), "calibration seeds follow the base seed"


def test_classes_never_drawn_are_left_out_and_none_drawn_is_an_error():
    source = ramp_source(["circle", "ring"])
    only_circles = lambda image, name: np.full(image.shape[:2], name == "circle")  # noqa: E731
    assert set(calibrate_class_thresholds(source, only_circles, n_per_class=2)) == {"circle"}
    with pytest.raises(ValueError, match="non-empty truth"):
        calibrate_class_thresholds(source, lambda image, name: np.zeros(image.shape[:2], bool), n_per_class=2)


def test_bad_calibration_input_is_named():
    source = ramp_source(["circle"])
    with pytest.raises(ValueError, match="n_per_class must be >= 1, got 0"):
        calibrate_class_thresholds(source, lambda image, name: image[..., 0] > 0, n_per_class=0)
    with pytest.raises(ValueError, match=r"gave a \(4, 4\) mask for a \(32, 32\) image"):
        calibrate_class_thresholds(source, lambda image, name: np.ones((4, 4), bool), n_per_class=1)


def spy(monkeypatch, module, name, record):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        seed = real(*args, **kwargs)
        record.append(seed)
        return seed

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("base", [0, 3, 2024])
def test_calibration_draws_no_training_sample(base, monkeypatch):
    classes, n_per_class, indices, attempts = ["circle", "square"], 4, range(10), 3
    calibration_seeds, training_seeds = [], []
    spy(monkeypatch, calibration, "calibration_seed", calibration_seeds)
    spy(monkeypatch, source_module, "sample_seed", training_seeds)

    calibrating = ramp_source(classes, seed=base)
    calibrate_class_thresholds(calibrating, lambda image, name: image[..., 0] >= 128, n_per_class=n_per_class)
    calibration_images = set(calibrating.capturing.seeds)

    training = DiffuMaskGenerator(RANDOM_WEIGHTS_MODEL, classes, seed=base, vocabulary="toy", image_size=32,
                            generator={"batch_size": len(indices)})
    gated = GatedSampler(reject_rounds=attempts - 1)
    training._capturing = gated
    drawn = training.samples(list(indices))
    assert [s.attempt for s in drawn] == [attempts - 1] * len(indices), "each sample was drawn at attempts 0..2"
    training_images = set(gated.seeds)
    assert training_images == {sample_seed(base, i, a, SubStream.IMAGE) for i in indices for a in range(attempts)}

    assert len(calibration_images) == len(classes) * n_per_class
    assert calibration_images <= set(calibration_seeds)
    assert not calibration_images & training_images, "a calibration image is a training image"
    assert not set(calibration_seeds) & set(training_seeds), "calibration shares a prompt or noise seed with training"
    # The old calibration seeds, derive_seed(base, 3, class id, k), were training sample 3's
    # (attempt = class id, stream = k): this range of samples and attempts would have caught them.
    old = {derive_seed(base, 3, c, k) for c in training.class_ids for k in range(n_per_class)}
    assert old & training_images and old & set(training_seeds)


def test_calibrates_through_a_real_pipeline(fast):
    source = DiffuMaskGenerator(RANDOM_WEIGHTS_MODEL, ["circle", "square"], vocabulary="toy", **fast)
    gammas = calibrate_class_thresholds(source, lambda image, name: image.mean(-1) > 127, n_per_class=2)
    assert set(gammas) <= {"circle", "square"} and gammas
    assert all(0.0 < g < 1.0 for g in gammas.values())
