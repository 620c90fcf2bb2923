import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader
from torchvision.datasets import VOCSegmentation

from ondemand_seg import (
    AugmentConfig,
    DiffuMaskAugment,
    DiffuMaskDataset,
    SegmentationTransform,
)
from ondemand_seg.toyworld import TOY_CLASSES, write_voc


def test_concat_with_torchvision_voc(tiny_sd1, tmp_path, fast):
    write_voc(tmp_path, n_train=3, n_val=0, image_size=(48, 80))
    transform = SegmentationTransform(64, train=True, seed=0)
    voc = VOCSegmentation(str(tmp_path), year="2012", image_set="train", transforms=transform)
    synthetic = DiffuMaskDataset(tiny_sd1, ["dog", "bird"], length=5, transforms=transform, **fast)
    mixed = ConcatDataset([voc, synthetic])
    assert len(mixed) == 8
    voc_image, voc_mask = mixed[0]
    syn_image, syn_mask = mixed[4]
    for a, b in [(voc_image, syn_image), (voc_mask, syn_mask)]:
        assert a.shape[-2:] == b.shape[-2:] == (64, 64) and a.dtype == b.dtype
    assert set(voc_mask.unique().tolist()) <= set(range(len(TOY_CLASSES))) | {255}
    assert set(syn_mask.unique().tolist()) <= {0, 3, 12, 255}
    seen = 0
    for images, masks in DataLoader(mixed, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert images.dtype == torch.float32 and masks.dtype == torch.long and images.shape[1:] == (3, 64, 64)
        seen += images.shape[0]
    assert seen == 8


def test_item_is_reproducible_including_augmentation(tiny_sd1, fast):
    dataset = DiffuMaskDataset(tiny_sd1, ["dog"], length=4, **fast)
    first, again = dataset[2], dataset[2]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = DiffuMaskDataset(tiny_sd1, ["dog"], length=4, **fast)
    assert torch.equal(other[2][0], first[0])
    assert not torch.equal(dataset[1][0], first[0])


def test_batched_fetch_matches_single_items(tiny_sd1, fast):
    dataset = DiffuMaskDataset(tiny_sd1, ["dog", "bird"], length=6, augment=False, **fast)
    batch_images, batch_masks = next(iter(DataLoader(dataset, batch_size=3)))
    for i in range(3):
        image, mask = dataset[i]
        assert torch.allclose(image, batch_images[i], atol=0.02) and torch.equal(mask, batch_masks[i])


def test_raw_samples_and_index_errors(tiny_sd1, fast):
    dataset = DiffuMaskDataset(tiny_sd1, ["dog"], length=3, **fast)
    raw = dataset.raw([0, 2])
    assert [s.index for s in raw] == [0, 2]
    assert raw[0].image.shape == (64, 64, 3) and raw[0].image.dtype == np.uint8
    assert raw[0].prompt == "a photograph of a dog"
    assert dataset.config is dataset.source.config and dataset.config.image_size == (64, 64)
    with pytest.raises(IndexError, match="index 3 out of range"):
        dataset[3]
    with pytest.raises(ValueError, match="length must be >= 1, got 0"):
        DiffuMaskDataset(tiny_sd1, ["dog"], length=0, **fast)


def test_cache_reuses_generated_items(tiny_sd1, fast):
    dataset = DiffuMaskDataset(tiny_sd1, ["dog"], length=4, cache_size=3, augment=False, **fast)
    first = dataset[1]
    generated = dataset.stats()["generated"]
    again = dataset[1]
    assert dataset.stats()["generated"] == generated, "a cached item is not regenerated"
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    dataset.raw([0, 2, 3])  # evicts index 1
    dataset[1]
    assert dataset.stats()["generated"] > generated
    with pytest.raises(ValueError, match="cache_size must be >= 0"):
        DiffuMaskDataset(tiny_sd1, ["dog"], length=4, cache_size=-1, **fast)


def test_a_single_index_generates_its_block_when_everything_fits(tiny_sd1, fast):
    from ondemand_seg import GeneratorConfig

    sampler = GeneratorConfig(num_inference_steps=fast["generator"].num_inference_steps, batch_size=3)
    options = {**fast, "generator": sampler}
    dataset = DiffuMaskDataset(tiny_sd1, ["dog"], length=7, cache_size=7, augment=False, **options)
    dataset[4]  # block [3, 4, 5] in one pipeline call
    assert sorted(dataset._cache) == [3, 4, 5] and dataset.stats()["generated"] == 3
    dataset[5]
    assert dataset.stats()["generated"] == 3, "a neighbour generated with the block is served from the cache"
    dataset[6]  # the last block is cut at the length
    assert sorted(dataset._cache) == [3, 4, 5, 6]
    # Items stay a pure function of their index: the same as drawn alone, without any block, up to
    # float rounding of batched kernels (images within one grey level, which can move a pixel of
    # the random-weight model's flat maps across γ).
    alone = DiffuMaskDataset(tiny_sd1, ["dog"], length=7, augment=False, **options)
    for i in (3, 5, 6):
        assert (dataset.raw([i])[0].mask != alone.raw([i])[0].mask).mean() < 0.002
        assert np.abs(dataset.raw([i])[0].image.astype(int) - alone.raw([i])[0].image.astype(int)).max() <= 1
    # A cache that cannot keep everything generates only what is asked for.
    small = DiffuMaskDataset(tiny_sd1, ["dog"], length=7, cache_size=6, augment=False, **options)
    small[4]
    assert small.stats()["generated"] == 1


SHAPES = ["circle", "square", "triangle"]


def splicing_dataset(model, fast, splice, seed=0, cache_size=8):
    """8 items of ToyWorld classes whose only augmentation is splicing (with probability ``splice``)."""
    config = dataclasses.replace(AugmentConfig.off(), splice=splice)
    return DiffuMaskDataset(model, SHAPES, length=8, transforms=DiffuMaskAugment(64, config), cache_size=cache_size,
                            seed=seed, vocabulary="toy", **fast)


def pixels(image):
    """The set of a normalized ``[3, H, W]`` image's colours (exact floats)."""
    return set(map(tuple, image.flatten(1).T.tolist()))


def test_map_style_splicing_tiles_an_item_with_others_of_its_block(tiny_sd1, fast):
    spliced = splicing_dataset(tiny_sd1, fast, splice=1.0)
    plain = splicing_dataset(tiny_sd1, fast, splice=0.0)
    assert spliced.transforms.splices and not plain.transforms.splices
    block = fast["generator"].batch_size
    unspliced = [plain[i] for i in range(8)]
    raw_ids = [set(np.unique(s.mask).tolist()) for s in plain.raw(range(8))]
    foreign_ids = False
    for i in range(8):
        image, mask = spliced[i]
        members = range(i - i % block, i - i % block + block)
        own = pixels(unspliced[i][0])
        block_pixels = set().union(*(pixels(unspliced[j][0]) for j in members))
        colours = pixels(image)
        # Every pixel comes from the item's generation block (cropped at the unspliced scale) ...
        assert colours <= block_pixels, i
        assert set(mask.unique().tolist()) <= set().union(*(raw_ids[j] for j in members)) | {255}, i
        # ... and the tiles of other items of it cover at least 30 % of the image.
        assert len(colours - own) >= 0.25 * len(colours), i
        foreign_ids |= bool(set(mask.unique().tolist()) - raw_ids[i] - {255})
    assert foreign_ids, "no item shows a class of another item"


def test_map_style_splicing_is_reproducible_and_depends_on_the_seed(tiny_sd1, fast):
    dataset = splicing_dataset(tiny_sd1, fast, splice=1.0)
    first = [dataset[i] for i in range(8)]
    again = dataset[5]
    assert torch.equal(again[0], first[5][0]) and torch.equal(again[1], first[5][1])
    fresh = splicing_dataset(tiny_sd1, fast, splice=1.0)
    for i in (0, 5, 7):
        image, mask = fresh[i]
        assert torch.equal(image, first[i][0]) and torch.equal(mask, first[i][1])
    batch = dataset.__getitems__([1, 2, 6])
    for i, (image, mask) in zip([1, 2, 6], batch):
        assert torch.equal(image, first[i][0]) and torch.equal(mask, first[i][1])
    other_seed = splicing_dataset(tiny_sd1, fast, splice=1.0, seed=1)
    assert not torch.equal(other_seed[5][0], first[5][0])


def test_map_style_splicing_warns_when_the_cache_cannot_keep_the_blocks(tiny_sd1, fast):
    with pytest.warns(UserWarning, match="cache_size=4 < length=8"):
        small = splicing_dataset(tiny_sd1, fast, splice=1.0, cache_size=4)
    with pytest.warns(UserWarning, match="cache_size=0"):
        none = splicing_dataset(tiny_sd1, fast, splice=1.0, cache_size=0)
    full = splicing_dataset(tiny_sd1, fast, splice=1.0)
    # A smaller cache only costs regeneration: items stay a pure function of (seed, index).
    for i in (6, 1):
        want_image, want_mask = full[i]
        for dataset in (small, none):
            image, mask = dataset[i]
            assert torch.equal(mask, want_mask) and torch.allclose(image, want_image, atol=0.02)


def test_indices_are_anything_with_index(tiny_sd1, fast):
    dataset = DiffuMaskDataset(tiny_sd1, ["dog"], length=4, augment=False, cache_size=4, **fast)
    image, mask = dataset[2]
    for index in (torch.tensor(2), np.int64(2), np.uint8(2)):
        other_image, other_mask = dataset[index]
        assert torch.equal(other_mask, mask) and torch.equal(other_image, image)
    assert [s.index for s in dataset.raw([np.int32(1), torch.tensor(3)])] == [1, 3]
    with pytest.raises(TypeError, match=r"indices must be integers, got 2.0 \(float\)"):
        dataset[2.0]
    with pytest.raises(IndexError, match="index 4 out of range"):
        dataset[np.int64(4)]
    with pytest.raises(TypeError, match=r"indices must be integers, got True \(bool\)"):
        dataset[True]  # an int to Python, yet never a position: it would serve item 1
    with pytest.raises(TypeError, match=r"got False \(bool\)"):
        dataset.__getitems__([1, False])
