from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ondemand_seg.preview import render_preview, write_preview
from ondemand_seg.settings.label_spaces import IGNORE_INDEX, VOC_CLASSES, voc_palette

BIRD, DOG, PERSON = VOC_CLASSES.index("bird"), VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")
SIZE = 32  # enlarged to 128 px tiles by render_preview
TILE = 128


def color(class_id):
    palette = voc_palette()
    return tuple(palette[3 * class_id : 3 * class_id + 3])


def samples(n=2, ids=(BIRD,), ignore=True):
    """Flat grey images so that no image pixel, plain or blended at alpha 0.5, equals a palette colour."""
    images = torch.full((n, 3, SIZE, SIZE), 100, dtype=torch.uint8)
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for k in range(n):
        masks[k, 8:24, 8:20] = ids[k % len(ids)]
        if ignore:
            masks[k, 8:24, 20:22] = IGNORE_INDEX
    return images, masks


def pixels(picture):
    return np.asarray(picture.convert("RGB"))


def rows_with(array, rgb):
    """Row indices of the pixels that are exactly ``rgb``."""
    return np.nonzero(np.all(array == np.array(rgb, dtype=np.uint8), axis=-1))[0]


def test_output_is_a_pil_image_larger_than_its_tiles():
    images, masks = samples(n=3)
    picture = render_preview(images, masks, ["a bird"] * 3, VOC_CLASSES, columns=2)
    assert isinstance(picture, Image.Image) and picture.mode == "RGB"
    # 32 px images are shown at 128 px; two pairs across, two rows down, plus captions and legend.
    assert picture.width > 2 * 2 * TILE
    assert picture.height > 2 * TILE
    array = pixels(picture)
    assert tuple(array[0, 0]) == (255, 255, 255)  # white background
    # The plain grey image is pasted at full size: a 128 px run of it exists on some row.
    grey_runs = np.all(array == 100, axis=-1).sum(axis=1)
    assert grey_runs.max() >= TILE


def test_legend_shows_colours_of_present_classes_only():
    images, masks = samples(n=2, ids=(BIRD, PERSON))
    picture = render_preview(images, masks, ["a bird", "a person"], VOC_CLASSES)
    array = pixels(picture)
    for present in (BIRD, PERSON, IGNORE_INDEX):
        rows = rows_with(array, color(present))
        assert len(rows) > 0, f"no swatch for class {present}"
        # Tiles blend colours at alpha 0.5, so the pure colour only appears in the legend below the tiles.
        assert rows.min() > TILE
    for absent in (DOG, VOC_CLASSES.index("aeroplane")):
        assert len(rows_with(array, color(absent))) == 0, f"absent class {absent} in the picture"


def test_ignore_is_in_the_legend_only_when_present():
    images, masks = samples(ignore=False)
    array = pixels(render_preview(images, masks, ["a", "b"], VOC_CLASSES))
    assert len(rows_with(array, color(BIRD))) > 0
    assert len(rows_with(array, color(IGNORE_INDEX))) == 0


def test_all_background_masks_still_render():
    images = torch.full((1, 3, SIZE, SIZE), 100, dtype=torch.uint8)
    masks = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    picture = render_preview(images, masks, ["nothing here"], VOC_CLASSES)
    assert picture.width >= 2 * TILE


def test_prompts_are_drawn_under_identical_tiles():
    images, masks = samples(n=1)
    a = pixels(render_preview(images, masks, ["a bird"], VOC_CLASSES))
    b = pixels(render_preview(images, masks, ["a small bird on a branch"], VOC_CLASSES))
    assert a.shape == b.shape
    differing_rows = np.nonzero(np.any(a != b, axis=(1, 2)))[0]
    assert len(differing_rows) > 0
    # Only the caption differs: tiles (the top 128 px plus margin) are the same, and so is the legend.
    assert differing_rows.min() > TILE
    bird_rows = rows_with(a, color(BIRD))
    assert differing_rows.max() < bird_rows.min()


def test_long_prompts_wrap_within_the_pair_instead_of_widening_it():
    images, masks = samples(n=1)
    short = render_preview(images, masks, ["a bird"], VOC_CLASSES)
    long = render_preview(images, masks, ["a very detailed photograph of a bird " * 20], VOC_CLASSES)
    unbroken = render_preview(images, masks, ["x" * 500], VOC_CLASSES)
    assert long.width == short.width == unbroken.width
    assert long.height > short.height
    # Wrapping is capped, so a huge prompt costs a few lines, not hundreds.
    assert long.height < short.height + 100


def test_legend_wraps_onto_several_lines():
    label_space = ("background",) + tuple(f"a_rather_long_class_name_{i}" for i in range(1, 13))
    images = torch.full((1, 3, SIZE, SIZE), 100, dtype=torch.uint8)
    masks = torch.arange(SIZE).div(SIZE / 13, rounding_mode="floor").long().expand(1, SIZE, SIZE).clone()
    one = render_preview(images, torch.where(masks > 0, 1, 0), ["p"], label_space)
    many = render_preview(images, masks, ["p"], label_space)
    assert many.width == one.width  # wrapped, not stretched sideways
    assert many.height > one.height + 3 * 12
    array = pixels(many)
    for class_id in range(1, 13):
        assert len(rows_with(array, color(class_id))) > 0, f"no swatch for class {class_id}"


def test_large_images_are_not_enlarged():
    images = torch.full((1, 3, 200, 150), 100, dtype=torch.uint8)
    masks = torch.zeros(1, 200, 150, dtype=torch.long)
    masks[0, 50:100, 50:100] = DOG
    picture = render_preview(images, masks, ["a dog"], VOC_CLASSES)
    grey_runs = np.all(pixels(picture) == 100, axis=-1).sum(axis=1)
    assert grey_runs.max() == 2 * 150  # a row through the image and the unpainted overlay, both at 150 px
    assert picture.width < 2 * 2 * 150


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda i, m, p: (i, m, p[:1]), "1 prompts"),
        (lambda i, m, p: (i, m[:1], p), "1 masks"),
        (lambda i, m, p: (i.float(), m, p), "torch.float32"),
        (lambda i, m, p: (i[:, :1], m, p), "[2, 1, 32, 32]"),
        (lambda i, m, p: (i, m.int(), p), "torch.int32"),
        (lambda i, m, p: (i, m[:, :, :16], p), "(32, 16)"),
        (lambda i, m, p: (i, torch.where(m == BIRD, 21, m), p), "[21]"),
        (lambda i, m, p: (i, torch.where(m == BIRD, -1, m), p), "[-1]"),
        (lambda i, m, p: (i, m, ["ok", 7]), "7"),
        (lambda i, m, p: (i, m, "ab"), "'ab'"),
    ],
)
def test_bad_inputs_name_the_bad_value(change, expected):
    images, masks, prompts = change(*samples(n=2), ["a bird", "a bird"])
    with pytest.raises(ValueError) as error:
        render_preview(images, masks, prompts, VOC_CLASSES)
    assert expected in str(error.value)


def test_bad_options_name_the_bad_value():
    images, masks = samples(n=2)
    with pytest.raises(ValueError, match="1.5"):
        render_preview(images, masks, ["a", "b"], VOC_CLASSES, alpha=1.5)
    with pytest.raises(ValueError, match="columns.*0"):
        render_preview(images, masks, ["a", "b"], VOC_CLASSES, columns=0)
    with pytest.raises(ValueError, match="'thing'"):
        render_preview(images, masks, ["a", "b"], ("thing", "bird"))


@dataclass
class Sample:
    image: object
    mask: object
    prompt: str


def sample_objects(as_pil):
    images, masks = samples(n=3, ids=(BIRD, DOG))
    out = []
    for image, mask, prompt in zip(images, masks, ["a bird", "a dog", "another bird"]):
        image = image.permute(1, 2, 0).numpy()
        mask = mask.to(torch.uint8).numpy()
        if as_pil:
            image = Image.fromarray(image, "RGB")
            mask = Image.fromarray(mask, "L") if prompt == "a dog" else Image.fromarray(mask, "P")
        out.append(Sample(image, mask, prompt))
    return out


@pytest.mark.parametrize("as_pil", [True, False], ids=["pil", "numpy"])
def test_write_preview_writes_a_png(tmp_path, as_pil):
    out = tmp_path / "nested" / "folder" / "grid.png"
    written = write_preview(sample_objects(as_pil), VOC_CLASSES, str(out), columns=2)
    assert written == out and isinstance(written, Path)
    with Image.open(written) as picture:
        assert picture.format == "PNG"
        array = pixels(picture)
    images, masks = samples(n=3, ids=(BIRD, DOG))
    expected = pixels(render_preview(images, masks, ["a bird", "a dog", "another bird"], VOC_CLASSES, columns=2))
    np.testing.assert_array_equal(array, expected)
    assert len(rows_with(array, color(DOG))) > 0


def test_write_preview_rejects_bad_samples(tmp_path):
    good = sample_objects(as_pil=True)
    with pytest.raises(ValueError, match="empty"):
        write_preview([], VOC_CLASSES, tmp_path / "x.png")
    with pytest.raises(ValueError, match="'RGB'"):
        write_preview([Sample(good[0].image, good[0].mask.convert("RGB"), "p")], VOC_CLASSES, tmp_path / "x.png")
    small = Sample(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), np.uint8), "small")
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        write_preview([good[0], small], VOC_CLASSES, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
