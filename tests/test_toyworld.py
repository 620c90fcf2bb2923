"""ToyWorld: determinism, exact masks and captions, VOC round trip, and the colour oracle."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from ondemand_seg.settings.label_spaces import voc_palette
from ondemand_seg.toyworld import TOY_CLASSES, ToyWorld, color_oracle, write_voc
from ondemand_seg.toyworld.__main__ import main as cli_main


def _mean_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU over the classes present in either map: a spurious class scores 0."""
    classes = np.union1d(np.unique(pred), np.unique(truth))
    return float(np.mean([np.sum((pred == c) & (truth == c)) / np.sum((pred == c) | (truth == c))
                          for c in classes]))


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(image_size=64, seed=0)


@pytest.fixture(scope="module")
def samples(world):
    return [world.sample(i) for i in range(48)]


def test_sample_is_a_pure_function_of_seed_and_index(world):
    a, b = world.sample(7), ToyWorld(image_size=64, seed=0).sample(7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.caption == b.caption and a.class_names == b.class_names
    assert not np.array_equal(a.image, world.sample(8).image)
    assert not np.array_equal(a.image, ToyWorld(image_size=64, seed=1).sample(7).image)


def test_arrays_have_documented_shapes_and_ids(samples):
    for s in samples:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (64, 64) and s.mask.dtype == np.uint8
        assert s.mask.max() < len(TOY_CLASSES)
        assert s.object_masks.shape == (len(s.class_names), 64, 64)


def test_caption_names_exactly_the_classes_in_the_mask(samples):
    for s in samples:
        assert 1 <= len(s.class_names) <= 3
        assert len(set(s.class_names)) == len(s.class_names)
        in_mask = set(np.unique(s.mask).tolist()) - {0}
        assert in_mask == {TOY_CLASSES.index(n) for n in s.class_names}
        assert s.caption.startswith("a photo of ")
        for name in s.class_names:
            assert f"a {name}" in s.caption
    assert any(" and " in s.caption for s in samples)


def test_mask_is_the_occlusion_of_the_object_footprints(samples):
    overlapping = 0
    for s in samples:
        expected = np.zeros_like(s.mask)
        for name, footprint in zip(s.class_names, s.object_masks):
            expected[footprint] = TOY_CLASSES.index(name)  # later objects are drawn on top
        assert np.array_equal(s.mask, expected)
        for name, footprint in zip(s.class_names, s.object_masks):
            visible = np.sum(footprint & (s.mask == TOY_CLASSES.index(name)))
            assert visible >= 0.5 * footprint.sum()
        overlapping += int(s.object_masks.sum(axis=0).max() > 1)
    assert overlapping > 0, "no sample has overlapping objects"


def test_non_square_image_size():
    s = ToyWorld(image_size=(40, 72), seed=3).sample(0)
    assert s.image.shape == (40, 72, 3) and s.mask.shape == (40, 72)
    assert s.class_names and s.mask.any()


@pytest.mark.parametrize("kwargs, named", [
    (dict(image_size=8), "8"),
    (dict(image_size=(64, 15)), "15"),
    (dict(image_size=(64, 64, 3)), "(64, 64, 3)"),
    (dict(image_size="64"), "'64'"),
    (dict(seed=-1), "-1"),
    (dict(min_objects=0), "min_objects"),
    (dict(max_objects=6), "max_objects=6"),
    (dict(min_objects=3, max_objects=2), "min_objects=3"),
])
def test_bad_arguments_raise_naming_the_value(kwargs, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        ToyWorld(**kwargs)


def test_bad_index_raises(world):
    with pytest.raises(ValueError, match="-3"):
        world.sample(-3)


def test_voc_round_trip(tmp_path):
    from torchvision.datasets import VOCSegmentation

    voc = write_voc(tmp_path, n_train=5, n_val=3, image_size=48, seed=2)
    assert voc == tmp_path / "VOCdevkit" / "VOC2012"
    world = ToyWorld(image_size=48, seed=2)
    ids = {}
    for split, size in (("train", 5), ("val", 3)):
        dataset = VOCSegmentation(tmp_path, year="2012", image_set=split)
        assert len(dataset) == size
        ids[split] = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        for image_id, (image, target) in zip(ids[split], dataset):
            truth = world.sample(int(image_id))
            assert image.mode == "RGB" and target.mode == "P"
            assert target.getpalette() == voc_palette(), "VOC's colours, as the DiffuMask datasets' raw masks"
            assert np.array_equal(np.array(target), truth.mask)
            diff = np.abs(np.asarray(image, np.int16) - truth.image.astype(np.int16))
            assert diff.mean() < 3.0  # JPEG quality 95
    assert not set(ids["train"]) & set(ids["val"])


def test_cli_writes_voc(tmp_path, capsys):
    cli_main(["--out", str(tmp_path), "--n-train", "2", "--n-val", "1", "--image-size", "32x48"])
    assert "VOC2012" in capsys.readouterr().out
    with Image.open(tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "0000000000.jpg") as image:
        assert image.size == (48, 32)


def test_color_oracle_recovers_true_masks(samples):
    ious = [_mean_iou(color_oracle(s.image), s.mask) for s in samples[:32]]
    assert np.mean(ious) > 0.85


def test_color_oracle_survives_jpeg(tmp_path, samples):
    ious = []
    for s in samples[:16]:
        Image.fromarray(s.image).save(tmp_path / "x.jpg", quality=95, subsampling=0)
        ious.append(_mean_iou(color_oracle(np.array(Image.open(tmp_path / "x.jpg"))), s.mask))
    assert np.mean(ious) > 0.85


def test_color_oracle_is_colour_only():
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, :3] = (230, 20, 20)  # saturated red: circle
    image[:, 3:] = (128, 120, 125)  # grey: background
    assert color_oracle(image).tolist() == [[1, 1, 1, 0, 0, 0]] * 4
    # a label space without circle cannot call red anything but background
    assert not color_oracle(image, classes=("background", "ring")).any()


@pytest.mark.parametrize("image, named", [
    (np.zeros((4, 4), np.uint8), "(4, 4)"),
    (np.zeros((4, 4, 3), np.float32), "float32"),
])
def test_color_oracle_rejects_bad_images(image, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        color_oracle(image)


def test_color_oracle_rejects_unknown_classes():
    with pytest.raises(ValueError, match="dog"):
        color_oracle(np.zeros((4, 4, 3), np.uint8), classes=("background", "dog"))
