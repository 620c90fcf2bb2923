import dataclasses

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ondemand_seg.data.augment import AugmentConfig, DiffuMaskAugment
from ondemand_seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PairAugmentation
from ondemand_seg.settings.label_spaces import voc_palette

SIZE = (48, 64)
IGNORE = 255
# Each class id has its own colour, so the image spells its mask; black is what padding invents.
PALETTE = {0: (255, 255, 255), 3: (0, 255, 0), 7: (255, 0, 0), 12: (0, 0, 255), 20: (255, 255, 0)}
INVENTED = (0, 0, 0)
SEEDS = range(8)


def paint(mask):
    """The ``[h, w, 3]`` uint8 image whose colours are ``mask``'s classes."""
    image = np.zeros(mask.shape + (3,), dtype=np.uint8)
    for label, colour in PALETTE.items():
        image[mask == label] = colour
    return image


def coded_pair(size=SIZE):
    mask = np.zeros(size, dtype=np.uint8)
    mask[6:30, 8:36] = 7
    mask[20:44, 30:58] = 3
    rows, cols = np.ogrid[: size[0], : size[1]]
    mask[(rows - 12) ** 2 + (cols - 50) ** 2 < 49] = 12
    return paint(mask), mask


def to_uint8(image):
    """Undo normalisation: float ``[3, H, W]`` → float ``[H, W, 3]`` in 0-255."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


def labels_by_colour(image):
    """Each pixel's nearest palette class, or 255 where it is nearest to the invented black."""
    labels = list(PALETTE) + [IGNORE]
    colours = np.array(list(PALETTE.values()) + [INVENTED], dtype=np.float32)
    distance = ((image[..., None, :] - colours) ** 2).sum(-1)
    return np.array(labels)[distance.argmin(-1)]


def assert_aligned(image, mask, context):
    """Labelled pixels show their class's colour and invented (black) pixels are ignore, up to edges."""
    by_colour = labels_by_colour(image)
    labelled = mask != IGNORE
    assert (by_colour[labelled] == mask[labelled]).mean() >= 0.95, context
    invented = by_colour == IGNORE
    if invented.any():
        assert (mask[invented] == IGNORE).mean() >= 0.95, context


def only(**options):
    return dataclasses.replace(AugmentConfig.off(), **options)


def run(config, seed, pair=None):
    image, mask = pair or coded_pair()
    augment = DiffuMaskAugment(SIZE, config)
    augment.set_random_seed(seed)
    out_image, out_mask = augment(image, mask)
    assert out_image.shape == (3, *SIZE) and out_image.dtype == torch.float32
    assert out_mask.shape == SIZE and out_mask.dtype == torch.long
    return to_uint8(out_image), out_mask.numpy()


@pytest.mark.parametrize("options, invents", [
    (dict(flip=1.0), False),
    (dict(blur=1.0), False),
    (dict(occlusion=1.0), True),
    (dict(perspective=1.0), True),
    (dict(scale_jitter=(0.5, 1.5)), True),
])
def test_each_op_keeps_image_and_mask_aligned(options, invents):
    image, mask = coded_pair()
    changed, ignored = False, False
    for seed in SEEDS:
        out_image, out_mask = run(only(**options), seed)
        assert_aligned(out_image, out_mask, (options, seed))
        changed |= not np.array_equal(out_mask, mask) or np.abs(out_image - image).max() > 1
        ignored |= (out_mask == IGNORE).any()
    assert changed, "the op never ran"
    assert ignored == invents


def test_flip_and_blur_move_masks_exactly_with_images():
    image, mask = coded_pair()
    for seed in SEEDS:
        assert np.array_equal(run(only(flip=1.0), seed)[1], mask[:, ::-1])
        assert np.array_equal(run(only(blur=1.0), seed)[1], mask)


def test_occluders_are_ignore_and_leave_the_rest_untouched():
    image, mask = coded_pair()
    for seed in SEEDS:
        out_image, out_mask = run(only(occlusion=1.0), seed)
        occluded = out_mask == IGNORE
        assert 0 < occluded.mean() < 0.5
        assert np.array_equal(out_mask[~occluded], mask[~occluded])
        assert np.abs(out_image - image).max(-1)[~occluded].max() < 0.5


def test_off_only_normalises():
    image, mask = coded_pair()
    out_image, out_mask = run(AugmentConfig.off(), 0)
    assert np.array_equal(out_mask, mask)
    assert np.abs(out_image - image).max() < 0.01


def test_off_resizes_other_sizes_and_never_splices():
    image, mask = coded_pair((96, 128))
    other = coded_pair()[0][..., ::-1], np.full(SIZE, 20, dtype=np.uint8)
    out_image, out_mask = DiffuMaskAugment(SIZE, AugmentConfig.off()).apply_many([(image, mask), other])
    assert np.array_equal(out_mask.numpy(), cv2.resize(mask, SIZE[::-1], interpolation=cv2.INTER_NEAREST_EXACT))
    assert_aligned(to_uint8(out_image), out_mask.numpy(), "resize")


def test_seeded_augmentation_is_reproducible():
    pairs = [coded_pair(), *(splice_inputs(3)[1:])]
    config = AugmentConfig(splice=0.7, blur=0.5, occlusion=0.5, perspective=0.5, flip=0.5)
    first = DiffuMaskAugment(SIZE, config, seed=11).apply_many(pairs)
    again = DiffuMaskAugment(SIZE, config)
    again.set_random_seed(11)
    second = again.apply_many(pairs)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    outcomes = set()
    for seed in SEEDS:
        again.set_random_seed(seed)
        outcomes.add(again.apply_many(pairs)[0].sum().item())
    assert len(outcomes) > 1


def test_pil_inputs_match_arrays_and_inputs_stay_untouched():
    image, mask = coded_pair()
    kept = image.copy(), mask.copy()
    augment = DiffuMaskAugment(SIZE, AugmentConfig(splice=0.0, occlusion=1.0), seed=3)
    from_arrays = augment(image, mask)
    augment.set_random_seed(3)
    from_pil = augment(Image.fromarray(image), Image.fromarray(mask))
    assert torch.equal(from_arrays[0], from_pil[0]) and torch.equal(from_arrays[1], from_pil[1])
    assert np.array_equal(image, kept[0]) and np.array_equal(mask, kept[1])


def splice_inputs(count):
    """``count`` samples of different sizes; sample ``i`` is all class ``CLASSES[i]`` but for a
    background block in its top-left corner, so its tile in a mosaic is its class's bounding box."""
    sizes = [(40, 40), (50, 70), (64, 48), (30, 90)]
    samples = []
    for label, (h, w) in zip([3, 7, 12, 20], sizes[:count]):
        mask = np.full((h, w), label, dtype=np.uint8)
        mask[: h // 3, : w // 3] = 0
        samples.append((paint(mask), mask))
    return samples


@pytest.mark.parametrize("count", [2, 3, 4])
def test_splice_puts_every_sample_whole_into_its_tile(count):
    augment = DiffuMaskAugment(SIZE, AugmentConfig(splice_fit="whole"))
    samples = splice_inputs(count)
    for seed in SEEDS:
        image, mask = augment.splice(samples, np.random.default_rng(seed))
        assert image.shape == (*SIZE, 3) and mask.shape == SIZE and image.dtype == mask.dtype == np.uint8
        area = 0
        for sample_image, sample_mask in samples:
            rows, cols = np.nonzero(mask == sample_mask.max())
            top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            size = (right - left, bottom - top)
            expected_mask = cv2.resize(sample_mask, size, interpolation=cv2.INTER_NEAREST_EXACT)
            assert np.array_equal(mask[top:bottom, left:right], expected_mask)
            expected = cv2.resize(sample_image, size, interpolation=cv2.INTER_AREA).astype(int)
            assert np.abs(image[top:bottom, left:right].astype(int) - expected).max() <= 1
            area += (bottom - top) * (right - left)
        assert area == SIZE[0] * SIZE[1]  # the tiles partition the mosaic: nothing invented, nothing lost
        assert_aligned(image.astype(np.float32), mask, seed)


@pytest.mark.parametrize("count", [2, 4])
def test_splice_crop_keeps_each_sample_at_the_unspliced_scale(count):
    augment = DiffuMaskAugment(SIZE, AugmentConfig(splice_fit="crop"))
    rows, cols = np.mgrid[: SIZE[0], : SIZE[1]]
    samples = []
    for label in [3, 7, 12, 20][:count]:
        # Every pixel of the resized sample is unique (position coded in the mask ids), so a tile
        # can only match the window it was cut from, at scale 1.
        mask = ((rows * SIZE[1] + cols) % 250).astype(np.uint8)
        samples.append((np.dstack([rows, cols, np.full_like(rows, label)]).astype(np.uint8), mask))
    for seed in SEEDS:
        image, mask = augment.splice(samples, np.random.default_rng(seed))
        assert image.shape == (*SIZE, 3) and mask.shape == SIZE and IGNORE not in mask
        for sample_image, sample_mask in samples:
            tile_rows, tile_cols = np.nonzero(image[..., 2] == sample_image[0, 0, 2])
            top, left = tile_rows.min(), tile_cols.min()
            height, width = tile_rows.max() + 1 - top, tile_cols.max() + 1 - left
            assert len(tile_rows) == height * width, "each sample fills one rectangle"
            source_top, source_left = image[top, left, :2]
            window = (slice(source_top, source_top + height), slice(source_left, source_left + width))
            assert np.array_equal(image[top : top + height, left : left + width], sample_image[window])
            assert np.array_equal(mask[top : top + height, left : left + width], sample_mask[window])


def test_two_samples_sit_side_by_side():
    samples = splice_inputs(2)
    for seed in SEEDS:
        _, mask = DiffuMaskAugment(SIZE).splice(samples, np.random.default_rng(seed))
        for column in mask.T:
            assert len(set(column.tolist()) - {0}) == 1


def test_apply_many_splices_the_served_sample_with_others():
    samples = splice_inputs(4)
    augment = DiffuMaskAugment(SIZE, only(splice=1.0, splice_max=3))
    counts = set()
    for seed in SEEDS:
        augment.set_random_seed(seed)
        classes = set(augment.apply_many(samples)[1].unique().tolist()) - {0}
        assert 3 in classes and len(classes) in (2, 3) and IGNORE not in classes
        counts.add(len(classes))
    assert counts == {2, 3}


@pytest.mark.parametrize("field, value", [
    ("splice", 1.5), ("blur", -0.1), ("occlusion", "often"), ("perspective", float("nan")), ("flip", 2),
    ("splice_max", 1), ("splice_max", 5), ("splice_max", 3.0), ("splice_fit", "stretch"),
    ("scale_jitter", (0.0, 1.0)), ("scale_jitter", (1.2, 0.8)), ("scale_jitter", (1.0,)), ("scale_jitter", 1.0),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{field: value})


def test_bad_inputs_raise():
    augment = DiffuMaskAugment(SIZE)
    with pytest.raises(ValueError, match="2 to 4"):
        augment.splice(splice_inputs(1), np.random.default_rng(0))
    with pytest.raises(ValueError, match="size"):
        DiffuMaskAugment((1, 64))
    with pytest.raises(ValueError, match="uint8"):
        augment(np.zeros((*SIZE, 3), dtype=np.float32), np.zeros(SIZE, dtype=np.uint8))
    with pytest.raises(ValueError, match="mask"):
        augment(np.zeros((*SIZE, 3), dtype=np.uint8), np.zeros((10, 10), dtype=np.uint8))


def test_is_a_pair_augmentation_that_splices_only_when_configured():
    assert isinstance(DiffuMaskAugment(SIZE), PairAugmentation)
    assert DiffuMaskAugment(SIZE, AugmentConfig(splice=0.5)).splices
    assert not DiffuMaskAugment(SIZE, AugmentConfig(splice=0.0)).splices
    assert not DiffuMaskAugment(SIZE, AugmentConfig.off()).splices


def test_voc_style_pil_pairs_match_arrays():
    """Dataset items are a PIL RGB image and a mode-"P" mask with VOC's palette; the ids are read, not the colours."""
    samples = splice_inputs(3)
    as_pil = []
    for image, mask in samples:
        target = Image.fromarray(mask)
        target.putpalette(voc_palette())
        assert target.mode == "P"
        as_pil.append((Image.fromarray(image), target))
    augment = DiffuMaskAugment(SIZE, AugmentConfig(splice=1.0, occlusion=1.0))
    for seed in SEEDS[:3]:
        augment.set_random_seed(seed)
        from_arrays = augment.apply_many(samples)
        augment.set_random_seed(seed)
        from_pil = augment.apply_many(as_pil)
        assert torch.equal(from_arrays[0], from_pil[0]) and torch.equal(from_arrays[1], from_pil[1])
