import json
import os
import threading

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader
from torchvision.datasets import VOCSegmentation

from ondemand_seg import SegmentationTransform
from ondemand_seg.real import DiffuMaskLabeler
from ondemand_seg.real.dataset import PseudoLabelledDataset, read_tags
from ondemand_seg.real.images import ImageFolderImages
from ondemand_seg.toyworld import TOY_CLASSES, ToyWorld, write_voc


@pytest.fixture(scope="module")
def labeler():
    return DiffuMaskLabeler("toy", labelling={"strength": 0.04, "num_inference_steps": 50})


@pytest.fixture(scope="module")
def samples():
    world = ToyWorld(32, seed=9)
    return [world.sample(i) for i in range(4)]


def test_items_are_voc_pairs_labelled_once_and_kept(labeler, samples):
    before = labeler.counts()["generated"]
    dataset = PseudoLabelledDataset([PIL.Image.fromarray(s.image) for s in samples], [s.class_names for s in samples],
                                    labeler, transforms=lambda image, mask: (image, mask))
    image, mask = dataset[1]
    assert image.mode == "RGB" and image.size == (32, 32) and mask.mode == "P"
    ids = set(np.unique(np.asarray(mask)).tolist())
    assert ids <= {0, 255} | {TOY_CLASSES.index(n) for n in samples[1].class_names} and len(ids - {0, 255}) >= 1
    dataset[1]
    dataset.label_all(batch_size=2)
    assert labeler.counts()["generated"] - before == 4, "each image is labelled once, then kept"
    with pytest.raises(IndexError, match="out of range"):
        dataset[4]


def test_mixes_with_voc_data_in_a_concat_dataset(labeler, samples, tmp_path):
    root = write_voc(tmp_path, 3, 0, image_size=32)
    transforms = SegmentationTransform(32)
    real = VOCSegmentation(str(tmp_path), year="2012", image_set="train", transforms=transforms)
    pseudo = PseudoLabelledDataset([(s.image, "unused target") for s in samples], [s.class_names for s in samples],
                                   labeler, transforms=transforms)
    assert root.is_dir()
    images, masks = next(iter(DataLoader(ConcatDataset([real, pseudo]), batch_size=7)))
    assert images.shape == (7, 3, 32, 32) and images.dtype == torch.float32
    assert masks.shape == (7, 32, 32) and masks.dtype == torch.long


def test_tags_from_a_file_or_a_function(labeler, samples, tmp_path):
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({str(i): s.class_names for i, s in enumerate(samples)}))
    assert read_tags(path, 4) == [s.class_names for s in samples]
    from_file = PseudoLabelledDataset([s.image for s in samples], path, labeler, augment=False)
    from_function = PseudoLabelledDataset([s.image for s in samples], lambda i: samples[i].class_names, labeler,
                                          augment=False)
    assert torch.equal(from_file[2][1], from_function[2][1])
    with pytest.raises(ValueError, match=r"no tags for image\(s\) \['4'\]"):
        read_tags(path, 5)
    with pytest.raises(ValueError, match="3 entries for 4 images"):
        PseudoLabelledDataset([s.image for s in samples], [s.class_names for s in samples[:3]], labeler)
    with pytest.raises(ValueError, match="images is empty"):
        PseudoLabelledDataset([], None, labeler)


def test_a_left_out_pseudo_mask_is_served_as_ignore(samples):
    strict = DiffuMaskLabeler("toy", labelling={"strength": 0.04, "num_inference_steps": 50},
                              quality={"min_foreground": 0.9})
    dataset = PseudoLabelledDataset([samples[0].image], [samples[0].class_names], strict,
                                    transforms=lambda image, mask: (image, mask))
    assert set(np.unique(np.asarray(dataset[0][1])).tolist()) == {255}
    assert strict.counts()["empty mask"] == 1


def test_a_tags_file_may_be_keyed_by_file_name_and_is_checked_against_the_label_space(image_folder, tmp_path):
    names = ImageFolderImages(image_folder).names
    tags = read_tags(image_folder / "tags.json", 5, names, TOY_CLASSES)
    assert tags[4] == ["circle"] and len(tags) == 5
    path = tmp_path / "tags.json"
    for data, message in [
        ({"a_rgb.png": ["circle"]}, r"no tags for image\(s\) \['b_gray.png'"),
        ({**dict.fromkeys(names, ["ring"]), "zz.png": ["ring"]}, r"has tags for \['zz.png'\], not among the 5 images"),
        ([["ring"]] * 4, r"one list of class names per image \(5\).*got a list of 4"),
        ([["ring"]] * 4 + [["dog"]], r"image 4 \(e_flat.png\) names 'dog', not in the label space; known classes: circle"),
        ([["ring"]] * 4 + [[]], r"image 4 \(e_flat.png\) has tags \[\]; give a non-empty list"),
        ([["ring"]] * 4 + ["ring"], r"image 4 \(e_flat.png\) has tags 'ring'"),
    ]:
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=message):
            read_tags(path, 5, names, TOY_CLASSES)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tags.json is not valid JSON"):
        read_tags(path, 5)
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        read_tags(tmp_path / "missing.json", 5)


def test_a_dataset_counts_its_own_gated_images(image_folder, labeler):
    dataset = PseudoLabelledDataset(ImageFolderImages(image_folder), image_folder / "tags.json", labeler,
                                    transforms=lambda image, mask: (image, mask))
    assert dataset.tags_source == str(image_folder / "tags.json")
    image, mask = dataset[4]  # the flat gray image: a constant image, served as ignore
    assert set(np.unique(np.asarray(mask)).tolist()) == {255} and dataset.pseudo_label(4).reason == "constant image"
    assert dataset.counts()["generated"] == 1 and dataset.counts()["constant image"] == 1
    assert dataset.pseudo_label(0).mask.shape == (32, 32) and dataset.counts()["accepted"] == 1


def test_tags_are_checked_at_construction_naming_the_file_and_the_image(labeler, samples, tmp_path):
    images = [s.image for s in samples[:2]]
    files = {"not_json.json": b"circle, ring", "utf16.json": json.dumps([["circle"], ["ring"]]).encode("utf-16"),
             "unknown.json": json.dumps([["circle"], ["dragon"]]).encode(),
             "ints.json": json.dumps([["circle"], [3]]).encode(),
             "case.json": json.dumps([["circle"], ["Ring"]]).encode(),
             "empty.json": json.dumps([["circle"], []]).encode()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    expected = {"not_json.json": r"not_json.json is not valid JSON", "utf16.json": r"utf16.json is not UTF-8.*UTF-16",
                "unknown.json": r"tags\[1\] in .*unknown.json names \['dragon'\]",
                "ints.json": r"ints.json: image 1 has tags \[3\]; give a non-empty list of class names",
                "case.json": r"tags\[1\] in .*case.json names \['Ring'\]", "empty.json": r"empty.json: image 1 has tags \[\]; give a non-empty list"}
    for name, message in expected.items():
        with pytest.raises((TypeError, ValueError), match=message):
            PseudoLabelledDataset(images, tmp_path / name, labeler)
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(ValueError, match="fifo.json is a FIFO"):  # opening it would wait for a writer
        PseudoLabelledDataset(images, tmp_path / "fifo.json", labeler)
    with pytest.raises(ValueError, match=r"tags\[5\] names \['dragon'\]"):
        PseudoLabelledDataset([samples[0].image] * 6, [["circle"]] * 5 + [["dragon"]], labeler)
    # A function's answer is checked when drawn, named by the item's own index.
    dataset = PseudoLabelledDataset([samples[0].image] * 6, lambda i: ["dragon"] if i == 5 else ["circle"], labeler)
    with pytest.raises(ValueError, match=r"tags\[5\] names \['dragon'\]"):
        dataset[5]


def test_constructor_arguments_are_checked(labeler, samples):
    images, tags = [s.image for s in samples], [s.class_names for s in samples]
    for kwargs, error, message in (({"seed": -1}, ValueError, "seed must be >= 0"),
                                   ({"seed": 1.5}, TypeError, "seed must be an int"),
                                   ({"augment": "yes"}, TypeError, "augment must be True or False")):
        with pytest.raises(error, match=message):
            PseudoLabelledDataset(images, tags, labeler, **kwargs)
    with pytest.raises(TypeError, match="images must be a map-style dataset or a sequence of images, got NoneType"):
        PseudoLabelledDataset(None, None, labeler)
    with pytest.raises(TypeError, match="labeler must be a DiffuMaskLabeler, got str"):
        PseudoLabelledDataset(images, tags, labeler="toy")
    assert PseudoLabelledDataset(images, tags, labeler, seed=np.int64(3)).seed == 3


def test_an_items_pseudo_mask_does_not_depend_on_the_items_labelled_with_it(labeler):
    world = ToyWorld(32, seed=4)
    items = [world.sample(i) for i in range(6)]
    args = ([s.image for s in items], [s.class_names for s in items], labeler)
    together = PseudoLabelledDataset(*args, transforms=lambda image, mask: (image, mask))
    together.label_all(batch_size=6)
    alone = PseudoLabelledDataset(*args, transforms=lambda image, mask: (image, mask))
    for i in (5, 2, 4):  # each labelled by itself, at position 0 of its call
        assert np.array_equal(np.asarray(alone[i][1]), np.asarray(together[i][1])), i


def test_threads_asking_for_the_same_items_label_each_once(samples):
    labeler = DiffuMaskLabeler("toy", labelling={"strength": 0.04, "num_inference_steps": 50})
    dataset = PseudoLabelledDataset([s.image for s in samples], [s.class_names for s in samples], labeler,
                                    transforms=lambda image, mask: (image, mask))
    masks, errors = [], []

    def read():
        try:
            masks.append([np.asarray(dataset[i][1]) for i in range(4)])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and labeler.counts()["generated"] == 4
    assert all(np.array_equal(a, b) for other in masks[1:] for a, b in zip(masks[0], other))


def test_a_tags_file_naming_one_image_twice_is_an_error_naming_the_key(tmp_path):
    # JSON parsers differ on which of two values for one key counts: neither is taken.
    path = tmp_path / "tags.json"
    path.write_text('{"a.png": ["circle"], "a.png": ["square"]}')
    with pytest.raises(ValueError, match=r"tags.json is not valid JSON: the key 'a.png' appears twice"):
        read_tags(path, 1, ["a.png"])


def test_a_tag_outside_the_classes_labelled_is_named(tmp_path):
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"a.png": ["circle"], "b.png": ["circle", "ring"]}))
    assert read_tags(path, 2, ["a.png", "b.png"], TOY_CLASSES, ["circle", "ring"]) == [["circle"], ["circle", "ring"]]
    with pytest.raises(ValueError, match=r"image 1 \(b.png\) names 'ring', not among the classes labelled \(circle\)"):
        read_tags(path, 2, ["a.png", "b.png"], TOY_CLASSES, ["circle"])
