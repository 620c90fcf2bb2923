"""Pseudo-labelled real images written as an export (ondemand_seg/exports/pseudo.py) and read back
as one: the masks on disk are the dataset's, gated images counted and not written."""
import json
import random
import shutil

import numpy as np
import PIL.Image
import pytest

from ondemand_seg import DiffuMaskDataset
from ondemand_seg.exports import ExportError, ExportSource
from ondemand_seg.real import DiffuMaskLabeler, ImageFolderImages, PseudoLabelledDataset

KEPT = ["a_rgb.png", "b_gray.png", "c_rgba.png", "d_tall.jpg"]  # e_flat.png is a constant image: left out


@pytest.fixture(scope="module")
def pseudo(image_folder):
    """The image folder pseudo-labelled by the toy model from its tags file, every image labelled."""
    labeler = DiffuMaskLabeler("toy", labelling={"strength": 0.04, "num_inference_steps": 50})
    dataset = PseudoLabelledDataset(ImageFolderImages(image_folder), image_folder / "tags.json", labeler)
    dataset.label_all()
    return dataset


@pytest.mark.parametrize("fmt", ["voc", "webdataset", "hf"])
def test_an_export_of_pseudo_labels_reads_back_with_the_dataset_s_masks(pseudo, fmt, tmp_path):
    metadata = pseudo.export(tmp_path / fmt, format=fmt, image_format="png", shard_size=3, progress=False)
    source = ExportSource(tmp_path / fmt)
    assert len(source) == 4 and source.image_size == (32, 32) and metadata["shards"] == 2
    labels = metadata["pseudo_labels"]
    assert labels["sources"] == KEPT and (labels["images"], labels["written"], labels["left_out"]) == (5, 4, 1)
    assert labels["tags"] == str(pseudo.images.root / "tags.json") and labels["model"] == "toy"
    assert labels["labelling"]["strength"] == [0.04]
    assert source.stats()["constant image"] == 1 and source.stats()["accepted"] == 4
    for sample, name in zip(source.samples(range(4)), KEPT):
        label = pseudo.pseudo_label(pseudo.images.names.index(name))
        expected = label.mask
        if name == "d_tall.jpg":  # 40x24: stored at the model's 32x32, its mask resized by nearest neighbour
            expected = np.asarray(PIL.Image.fromarray(label.mask).resize((32, 32), PIL.Image.NEAREST))
        assert np.array_equal(sample.mask, expected), name
        assert sample.prompt == pseudo.labeler.generator.class_prompt(random.Random(0), list(label.classes)).text
    gray = source.samples([1])[0].image
    assert np.array_equal(gray[..., 0], gray[..., 2]), "the grayscale image is stored as gray RGB"


def test_an_export_of_pseudo_labels_serves_through_the_datasets_from_export(pseudo, tmp_path):
    pseudo.export(tmp_path / "voc", progress=False)
    dataset = DiffuMaskDataset.from_export(tmp_path / "voc", length=4, transforms=lambda image, mask: (image, mask))
    image, mask = dataset[0]
    assert image.size == (32, 32) and set(np.unique(np.asarray(mask)).tolist()) <= {0, 1, 4, 255}


def test_a_rerun_resumes_and_another_plan_is_refused_before_labelling(pseudo, image_folder, tmp_path):
    out = tmp_path / "out"
    first = pseudo.export(out, progress=False)
    (out / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "0000000002.png").unlink()
    again = pseudo.export(out, progress=False)  # the shard whose file went missing is written again
    assert again["pseudo_labels"] == first["pseudo_labels"] and ExportSource(out).samples([2])[0].mask.any()
    stronger = DiffuMaskLabeler("toy", labelling={"strength": 0.08, "num_inference_steps": 50})
    other = PseudoLabelledDataset(ImageFolderImages(image_folder), image_folder / "tags.json", stronger)
    with pytest.raises(ExportError, match=r"labelling\.strength: \[0\.04\] -> \[0\.08\]"):
        other.export(out, progress=False)
    assert stronger.counts()["generated"] == 0, "refused before any image is labelled"
    untagged = PseudoLabelledDataset(ImageFolderImages(image_folder), None, pseudo.labeler)
    with pytest.raises(ExportError, match="tags_digest"):
        untagged.export(out, progress=False)


def test_bad_export_arguments_are_named_before_labelling(pseudo, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    for out, options, message in [(tmp_path / "file", {}, "is a file"),
                                  (tmp_path / "o", {"format": "coco"}, "format must be one of voc, webdataset, hf"),
                                  (tmp_path / "o", {"shard_size": 0}, "shard_size must be >= 1"),
                                  (tmp_path / "full", {}, "is not empty and holds no export")]:
        with pytest.raises(ValueError, match=message):
            pseudo.export(out, progress=False, **options)
    with pytest.raises(TypeError, match="must be a PseudoLabelledDataset"):
        from ondemand_seg.exports.pseudo import export_pseudo_labels
        export_pseudo_labels([1, 2], tmp_path / "o")


def test_every_image_left_out_is_an_error_naming_the_counts(image_folder, tmp_path):
    strict = DiffuMaskLabeler("toy", labelling={"strength": 0.04, "num_inference_steps": 50},
                              quality={"min_foreground": 0.95})
    dataset = PseudoLabelledDataset(ImageFolderImages(image_folder), image_folder / "tags.json", strict)
    with pytest.raises(ValueError, match="left out every one of the 5 pseudo-masks"):
        dataset.export(tmp_path / "out", progress=False)
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["complete"] is False


def test_untagged_images_export_with_the_classes_the_presence_test_found(image_folder, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a_rgb.png", "c_rgba.png"):
        shutil.copy(image_folder / name, folder / name)
    labeler = DiffuMaskLabeler("toy", classes=["circle", "ring"], labelling={"strength": 0.04})
    dataset = PseudoLabelledDataset(ImageFolderImages(folder), None, labeler)
    metadata = dataset.export(tmp_path / "out", format="hf", progress=False)
    assert metadata["pseudo_labels"]["tags"] is None and metadata["classes"] == ["circle", "ring"]
    for sample, index in zip(ExportSource(tmp_path / "out").samples([0, 1]), (0, 1)):
        assert sample.prompt == "" and np.array_equal(sample.mask, dataset.pseudo_label(index).mask)
        assert set(dataset.pseudo_label(index).classes) <= {"circle", "ring"}


def test_an_export_takes_a_numpy_shard_size_and_file_names_that_are_not_utf8(pseudo, image_folder, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(image_folder / "a_rgb.png", folder.as_posix().encode() + b"/\xff.png")
    tags = json.loads((image_folder / "tags.json").read_text())["a_rgb.png"]
    dataset = PseudoLabelledDataset(ImageFolderImages(folder), [tags], pseudo.labeler)
    metadata = dataset.export(tmp_path / "out", shard_size=np.int64(1), progress=False)
    assert metadata["shard_size"] == 1 and metadata["pseudo_labels"]["sources"] == ["\udcff.png"]
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["pseudo_labels"]["written"] == 1


def test_an_image_edited_between_the_plan_and_its_labelling_is_an_error(image_folder, tmp_path):
    # The plan records the files as hashed; masks of an edited file would be recorded under that hash.
    images = shutil.copytree(image_folder, tmp_path / "images")
    labeler = DiffuMaskLabeler("toy", labelling={"strength": 0.04, "num_inference_steps": 50})
    dataset = PseudoLabelledDataset(ImageFolderImages(images), images / "tags.json", labeler)
    label_all = dataset.label_all

    def edited_first(**options):
        shutil.copy(images / "b_gray.png", images / "a_rgb.png")
        return label_all(**options)

    dataset.label_all = edited_first
    with pytest.raises(ValueError, match=r"image files of .*images changed while they were labelled"):
        dataset.export(tmp_path / "out", progress=False)
