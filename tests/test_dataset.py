import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader
from torchvision.datasets import VOCSegmentation

from ondemand_seg import DiffuMaskDataset, SegmentationTransform
from ondemand_seg.label_spaces import voc_palette


def write_voc_folder(root, n=3, size=(48, 80)):
    """A minimal Pascal VOC 2012 layout that torchvision's VOCSegmentation reads."""
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"2007_{i:06d}"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(base / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros(size, dtype=np.uint8)
        mask[10:30, 20:50] = 12
        mask[10, 20:50] = 255
        png = Image.fromarray(mask, mode="P")
        png.putpalette(voc_palette())
        png.save(base / "SegmentationClass" / f"{name}.png")
        names.append(name)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")
    return root


def test_concat_with_torchvision_voc(tmp_path, fast):
    transform = SegmentationTransform(64, train=True, seed=0)
    voc = VOCSegmentation(str(write_voc_folder(tmp_path)), year="2012", image_set="train", transforms=transform)
    synthetic = DiffuMaskDataset("tiny-random", ["dog", "bird"], length=5, transform=transform, **fast)
    mixed = ConcatDataset([voc, synthetic])
    assert len(mixed) == 8
    voc_image, voc_mask = mixed[0]
    syn_image, syn_mask = mixed[4]
    for a, b in [(voc_image, syn_image), (voc_mask, syn_mask)]:
        assert a.shape[-2:] == b.shape[-2:] == (64, 64) and a.dtype == b.dtype
    assert set(voc_mask.unique().tolist()) <= {0, 12, 255}
    seen = 0
    for images, masks in DataLoader(mixed, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert images.dtype == torch.float32 and masks.dtype == torch.long and images.shape[1:] == (3, 64, 64)
        seen += images.shape[0]
    assert seen == 8


def test_item_is_reproducible_including_augmentation(fast):
    dataset = DiffuMaskDataset("tiny-random", ["dog"], length=4, **fast)
    first, again = dataset[2], dataset[2]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = DiffuMaskDataset("tiny-random", ["dog"], length=4, **fast)
    assert torch.equal(other[2][0], first[0])
    assert not torch.equal(dataset[1][0], first[0])


def test_batched_fetch_matches_single_items(fast):
    dataset = DiffuMaskDataset("tiny-random", ["dog", "bird"], length=6, augment=False, **fast)
    batch_images, batch_masks = next(iter(DataLoader(dataset, batch_size=3)))
    for i in range(3):
        image, mask = dataset[i]
        assert torch.allclose(image, batch_images[i], atol=0.02) and torch.equal(mask, batch_masks[i])


def test_raw_samples_and_index_errors(fast):
    dataset = DiffuMaskDataset("tiny-random", ["dog"], length=3, **fast)
    raw = dataset.raw([0, 2])
    assert [s.index for s in raw] == [0, 2]
    assert raw[0].image.shape == (64, 64, 3) and raw[0].image.dtype == np.uint8
    assert raw[0].prompt == "a photograph of a dog"
    with pytest.raises(IndexError, match="index 3 out of range"):
        dataset[3]
    with pytest.raises(ValueError, match="length must be >= 1, got 0"):
        DiffuMaskDataset("tiny-random", ["dog"], length=0, **fast)


def test_cache_reuses_generated_items(fast):
    dataset = DiffuMaskDataset("tiny-random", ["dog"], length=4, cache_size=3, augment=False, **fast)
    first = dataset[1]
    generated = dataset.stats()["generated"]
    again = dataset[1]
    assert dataset.stats()["generated"] == generated, "a cached item is not regenerated"
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    dataset.raw([0, 2, 3])  # evicts index 1
    dataset[1]
    assert dataset.stats()["generated"] > generated
    with pytest.raises(ValueError, match="cache_size must be >= 0"):
        DiffuMaskDataset("tiny-random", ["dog"], length=4, cache_size=-1, **fast)


def test_a_single_index_generates_its_block_when_everything_fits(fast):
    from ondemand_seg import SamplerConfig

    sampler = SamplerConfig(num_inference_steps=fast["sampler"].num_inference_steps, batch_size=3)
    options = {**fast, "sampler": sampler}
    dataset = DiffuMaskDataset("tiny-random", ["dog"], length=7, cache_size=7, augment=False, **options)
    dataset[4]  # block [3, 4, 5] in one pipeline call
    assert sorted(dataset._cache) == [3, 4, 5] and dataset.stats()["generated"] == 3
    dataset[5]
    assert dataset.stats()["generated"] == 3, "a neighbour generated with the block is served from the cache"
    dataset[6]  # the last block is cut at the length
    assert sorted(dataset._cache) == [3, 4, 5, 6]
    # Items stay a pure function of their index: the same as drawn alone, without any block.
    alone = DiffuMaskDataset("tiny-random", ["dog"], length=7, augment=False, **options)
    for i in (3, 5, 6):
        assert np.array_equal(dataset.raw([i])[0].mask, alone.raw([i])[0].mask)
        assert np.abs(dataset.raw([i])[0].image.astype(int) - alone.raw([i])[0].image.astype(int)).max() <= 1
    # A cache that cannot keep everything generates only what is asked for.
    small = DiffuMaskDataset("tiny-random", ["dog"], length=7, cache_size=6, augment=False, **options)
    small[4]
    assert small.stats()["generated"] == 1
