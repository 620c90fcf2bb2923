import numpy as np
import pytest
import torch

from ondemand_seg import MaskConfig
from ondemand_seg.calibration import calibrate_class_thresholds
from ondemand_seg.sampler import GeneratedBatch
from ondemand_seg.source import SampleSource
from ondemand_seg.toyworld import TOY_CLASSES


class RampSampler:
    """Stands in for the pipeline: each map is a left-to-right ramp, and the image shows it."""

    def __init__(self):
        self.seeds = []

    def generate(self, prompts, seeds, size, keep_maps=False):
        self.seeds += list(seeds)
        ramp = torch.linspace(0, 1, size[1]).expand(*size)
        fused = ramp.expand(len(prompts), 1, *size).clone()
        images = ramp.expand(len(prompts), 3, *size).clone()
        ids = torch.tensor([[p.class_ids[0]] for p in prompts])
        return GeneratedBatch(images, torch.zeros(len(prompts), *size, dtype=torch.long), fused, ids)


def ramp_source(tiny_sd1, classes):
    source = SampleSource(tiny_sd1, classes, label_space=TOY_CLASSES, image_size=32)
    source._sampler = RampSampler()
    return source


def test_each_class_gets_the_threshold_its_labels_imply(tiny_sd1):
    cut = {"circle": 0.6, "ring": 0.3}
    source = ramp_source(tiny_sd1, list(cut))
    labels = lambda image, name: image[..., 0] / 255.0 >= cut[name]  # noqa: E731
    gammas = calibrate_class_thresholds(source, labels, n_per_class=3)
    assert set(gammas) == set(cut)
    for name, want in cut.items():
        assert gammas[name] == pytest.approx(want, abs=0.03)
    assert len(set(source.sampler.seeds)) == 6, "every calibration image has its own seed"
    MaskConfig(class_thresholds=gammas)  # the result is a valid config


def test_classes_never_drawn_are_left_out_and_none_drawn_is_an_error(tiny_sd1):
    source = ramp_source(tiny_sd1, ["circle", "ring"])
    only_circles = lambda image, name: np.full(image.shape[:2], name == "circle")  # noqa: E731
    assert set(calibrate_class_thresholds(source, only_circles, n_per_class=2)) == {"circle"}
    with pytest.raises(ValueError, match="non-empty truth"):
        calibrate_class_thresholds(source, lambda image, name: np.zeros(image.shape[:2], bool), n_per_class=2)


def test_bad_calibration_input_is_named(tiny_sd1):
    source = ramp_source(tiny_sd1, ["circle"])
    with pytest.raises(ValueError, match="n_per_class must be >= 1, got 0"):
        calibrate_class_thresholds(source, lambda image, name: image[..., 0] > 0, n_per_class=0)
    with pytest.raises(ValueError, match=r"gave a \(4, 4\) mask for a \(32, 32\) image"):
        calibrate_class_thresholds(source, lambda image, name: np.ones((4, 4), bool), n_per_class=1)


def test_calibrates_through_a_real_pipeline(tiny_sd1, fast):
    source = SampleSource(tiny_sd1, ["circle", "square"], label_space=TOY_CLASSES, **fast)
    gammas = calibrate_class_thresholds(source, lambda image, name: image.mean(-1) > 127, n_per_class=2)
    assert set(gammas) <= {"circle", "square"} and gammas
    assert all(0.0 < g < 1.0 for g in gammas.values())
