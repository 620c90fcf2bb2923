import json

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
