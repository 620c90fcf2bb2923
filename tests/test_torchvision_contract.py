"""The DiffuMask datasets keep torchvision's segmentation dataset contract: raw items are what
``VOCSegmentation`` yields, and ``transforms`` / ``transform`` / ``target_transform`` mean what
they mean on a ``VisionDataset``, so any transform written for VOC runs on them unchanged."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler
from torchvision import tv_tensors
from torchvision.datasets import VOCSegmentation
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor, to_tensor

from ondemand_seg import DiffuMaskDataset, DiffuMaskStream
from ondemand_seg.settings.label_spaces import voc_palette
from ondemand_seg.toyworld import TOY_CLASSES, write_voc

CLASSES = ["circle", "square"]
# Both sides use ToyWorld's label space: write_voc's masks and the "toy" vocabulary's ids.
TOY_IDS = set(range(len(TOY_CLASSES))) | {255}
KINDS = ["dataset", "stream"]


def make(kind, model, fast, count=4, **kwargs):
    """A DiffuMaskDataset of ``count`` items or a DiffuMaskStream of ``count`` samples."""
    if kind == "dataset":
        return DiffuMaskDataset(model, CLASSES, length=count, cache_size=count, vocabulary="toy", **fast, **kwargs)
    return DiffuMaskStream(model, CLASSES, num_samples=count, vocabulary="toy", **fast, **kwargs)


def first(dataset):
    return next(iter(dataset)) if isinstance(dataset, DiffuMaskStream) else dataset[0]


def items(dataset):
    return list(dataset) if isinstance(dataset, DiffuMaskStream) else [dataset[i] for i in range(len(dataset))]


def voc(root, **kwargs):
    return VOCSegmentation(str(root), year="2012", image_set="train", **kwargs)


def keep(image, target):
    return image, target


def voc_pair_transform(image, target):
    """A joint transform as written for VOCSegmentation: PIL pair in, tensors out (NEAREST for the mask)."""
    image = image.resize((48, 40), Image.BILINEAR)
    target = target.resize((48, 40), Image.NEAREST)
    return to_tensor(image), torch.as_tensor(np.array(target), dtype=torch.long)


def mask_to_tensor(target):
    return torch.as_tensor(np.array(target), dtype=torch.long)


class V2Pair:
    """The image as ``tv_tensors.Image`` and the target as ``tv_tensors.Mask``, through a v2 pipeline
    whose random draws come from torch's RNG (output sizes vary per item)."""

    def __init__(self):
        self.pipeline = v2.Compose([
            v2.RandomResizedCrop(48, scale=(0.3, 1.0)),
            v2.RandomResize(min_size=32, max_size=56),
            v2.RandomHorizontalFlip(),
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        ])

    def __call__(self, image, target):
        return self.pipeline(tv_tensors.Image(pil_to_tensor(image)), tv_tensors.Mask(torch.as_tensor(np.array(target))))


def cat_list(tensors, fill_value):
    """Pad ``tensors`` to the largest size among them and stack (torchvision references' utils.cat_list)."""
    max_size = tuple(max(sizes) for sizes in zip(*[t.shape for t in tensors]))
    batched = tensors[0].new_full((len(tensors),) + max_size, fill_value)
    for tensor, padded in zip(tensors, batched):
        padded[..., : tensor.shape[-2], : tensor.shape[-1]].copy_(tensor)
    return batched


def collate_fn(batch):
    """torchvision references' segmentation collate: images padded with 0, targets with 255."""
    images, targets = zip(*batch)
    return cat_list(images, fill_value=0), cat_list(targets, fill_value=255)


def check_v2_item(image, target):
    assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target.dtype == torch.int64 and target.shape == image.shape[-2:]
    assert set(target.unique().tolist()) <= TOY_IDS, "a mask resized with interpolation invents ids"


def test_raw_items_are_what_voc_segmentation_yields(tiny_sd1, tmp_path, fast):
    write_voc(tmp_path, n_train=2, n_val=0, image_size=64)
    voc_image, voc_target = voc(tmp_path)[0]
    assert voc_image.mode == "RGB" and voc_target.mode == "P"
    dataset = make("dataset", tiny_sd1, fast, transforms=keep)
    for image, target in [dataset[1], first(make("stream", tiny_sd1, fast, transforms=keep))]:
        assert isinstance(image, Image.Image) and isinstance(target, Image.Image)
        assert image.mode == voc_image.mode and target.mode == voc_target.mode
        assert target.getpalette() == voc_target.getpalette() == voc_palette()
        assert image.size == target.size == (64, 64)
        assert set(np.unique(np.array(target)).tolist()) <= TOY_IDS
    raw = dataset.raw([1])[0]
    image, target = dataset[1]
    assert np.array_equal(np.array(image), raw.image) and np.array_equal(np.array(target), raw.mask)


def test_a_voc_pair_transform_runs_unchanged_on_voc_and_both_datasets(tiny_sd1, tmp_path, fast):
    write_voc(tmp_path, n_train=2, n_val=0, image_size=64)
    dataset = make("dataset", tiny_sd1, fast, transforms=voc_pair_transform)
    stream = make("stream", tiny_sd1, fast, transforms=voc_pair_transform)
    voc_items = items(voc(tmp_path, transforms=voc_pair_transform))
    for image, target in voc_items + items(dataset) + items(stream):
        assert image.shape == (3, 40, 48) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        assert target.shape == (40, 48) and target.dtype == torch.long
        assert set(target.unique().tolist()) <= TOY_IDS
    # The transform saw the raw pair and nothing else: the item is exactly its output.
    image, target = dataset[2]
    want_image, want_target = voc_pair_transform(*dataset.raw([2])[0].pil())
    assert torch.equal(image, want_image) and torch.equal(target, want_target)


def test_a_v2_pipeline_on_tv_tensors_mixes_with_voc_in_one_loader(tiny_sd1, tmp_path, fast):
    write_voc(tmp_path, n_train=2, n_val=0, image_size=64)
    mixed = ConcatDataset([voc(tmp_path, transforms=V2Pair()), make("dataset", tiny_sd1, fast, transforms=V2Pair())])
    assert len(mixed) == 6
    direct = [mixed[i] for i in range(len(mixed))]
    for image, target in direct:
        check_v2_item(image, target)
    assert len({tuple(image.shape) for image, _ in direct}) > 1, "the pipeline gives items of several sizes"
    # The collate pads each item to the batch's largest size: image with 0, target with 255.
    images, targets = collate_fn(direct)
    for (image, target), padded_image, padded_target in zip(direct, images, targets):
        h, w = target.shape
        assert torch.equal(padded_image[:, :h, :w], image) and torch.equal(padded_target[:h, :w], target)
        assert not padded_image[:, h:].any() and not padded_image[:, :, w:].any()
        assert (padded_target[h:] == 255).all() and (padded_target[:, w:] == 255).all()
    seen = 0
    for images, targets in DataLoader(mixed, batch_size=4, shuffle=True, collate_fn=collate_fn,
                                      generator=torch.Generator().manual_seed(0)):
        assert images.dtype == torch.float32 and targets.dtype == torch.int64
        assert images.shape[0] == targets.shape[0] and images.shape[-2:] == targets.shape[-2:]
        assert set(targets.unique().tolist()) <= TOY_IDS
        seen += len(images)
    assert seen == len(mixed)
    stream = make("stream", tiny_sd1, fast, transforms=V2Pair())
    streamed = 0
    for images, targets in DataLoader(stream, batch_size=2, collate_fn=collate_fn):
        assert images.dtype == torch.float32 and targets.dtype == torch.int64
        assert images.shape[-2:] == targets.shape[-2:] and set(targets.unique().tolist()) <= TOY_IDS
        streamed += len(images)
    assert streamed == 4
    # Each rank of a DistributedSampler gets its share, and together they cover every index once.
    shares = [list(DistributedSampler(mixed, num_replicas=2, rank=rank, shuffle=True, seed=0)) for rank in range(2)]
    assert [len(share) for share in shares] == [3, 3]
    assert sorted(shares[0] + shares[1]) == list(range(len(mixed)))
    loader = DataLoader(mixed, batch_size=3, collate_fn=collate_fn,
                        sampler=DistributedSampler(mixed, num_replicas=2, rank=1, shuffle=True, seed=0))
    assert sum(len(images) for images, _ in loader) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_transform_and_target_transform_keep_vision_dataset_meaning(kind, tiny_sd1, tmp_path, fast):
    image, target = first(make(kind, tiny_sd1, fast, transform=pil_to_tensor))
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    assert isinstance(target, Image.Image) and target.mode == "P"
    image, target = first(make(kind, tiny_sd1, fast, target_transform=mask_to_tensor))
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert target.dtype == torch.long and target.shape == (64, 64)
    both = make(kind, tiny_sd1, fast, transform=pil_to_tensor, target_transform=mask_to_tensor)
    image, target = first(both)
    assert image.dtype == torch.uint8 and target.dtype == torch.long and image.shape[-2:] == target.shape
    if kind == "dataset":
        raw = both.raw([0])[0]
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(raw.image))
        assert torch.equal(target, torch.from_numpy(raw.mask).long())
    with pytest.raises(ValueError) as ours:
        make(kind, tiny_sd1, fast, transforms=keep, transform=pil_to_tensor)
    with pytest.raises(ValueError) as torchvision:
        voc(tmp_path, transforms=keep, transform=pil_to_tensor)
    assert str(ours.value) == str(torchvision.value)
    with pytest.raises(ValueError, match="Only transforms or transform/target_transform"):
        make(kind, tiny_sd1, fast, transforms=keep, target_transform=mask_to_tensor)


def resize_image_only(image, target):
    """The bug this guards against: an image resized without its mask."""
    return pil_to_tensor(image.resize((56, 48))), mask_to_tensor(target)


@pytest.mark.parametrize("kind", KINDS)
def test_an_image_and_mask_of_different_sizes_raise_naming_both(kind, tiny_sd1, fast):
    with pytest.raises(ValueError, match=r"image of size 48x56 and a mask of size 64x64"):
        first(make(kind, tiny_sd1, fast, transforms=resize_image_only))
    with pytest.raises(ValueError, match=r"image of size 64x64 and a mask of size 32x32"):
        first(make(kind, tiny_sd1, fast, transforms=lambda image, target: (image, target.resize((32, 32)))))
    # v2 on a plain PIL pair resizes both (PIL resizes a mode-"P" mask with NEAREST): no mismatch.
    image, target = first(make(kind, tiny_sd1, fast, transforms=v2.Resize(32)))
    assert image.size == target.size == (32, 32) and target.mode == "P"
    assert set(np.unique(np.array(target)).tolist()) <= TOY_IDS


def drawing(image, target):
    """A transform that only records one draw from torch's and one from Python's RNG."""
    return torch.tensor([torch.rand(()).item(), random.random()]), target


@pytest.mark.parametrize("kind", KINDS)
def test_torch_random_transforms_are_reproducible_from_seed_and_index(kind, tiny_sd1, fast):
    torch.manual_seed(1234)
    random.seed(1234)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    a = items(make(kind, tiny_sd1, fast, transforms=V2Pair()))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    torch.manual_seed(99)  # another global state: the items do not depend on it
    b = items(make(kind, tiny_sd1, fast, transforms=V2Pair()))
    for (image_a, target_a), (image_b, target_b) in zip(a, b):
        check_v2_item(image_a, target_a)
        assert torch.equal(image_a, image_b) and torch.equal(target_a, target_b)
    assert len({tuple(image.shape) for image, _ in a}) > 1, "the random resize drew one size for every item"
    draws = [image for image, _ in items(make(kind, tiny_sd1, fast, transforms=drawing))]
    assert len({tuple(d.tolist()) for d in draws}) == len(draws), "each item has its own seed"
    other_seed = [image for image, _ in items(make(kind, tiny_sd1, fast, transforms=drawing, seed=1))]
    assert not any(torch.equal(x, y) for x, y in zip(draws, other_seed))


def test_a_fetch_leaves_the_global_random_state_alone(tiny_sd1, fast):
    dataset = make("dataset", tiny_sd1, fast)
    for transforms in (dataset.transforms, V2Pair(), drawing):  # the default SegmentationTransform first
        dataset.transforms = transforms
        torch.manual_seed(7)
        random.seed(7)
        dataset[3]
        dataset.__getitems__([0, 2])
        assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(7))), transforms
        assert random.random() == random.Random(7).random(), transforms
