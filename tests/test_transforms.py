import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.datasets.vision import VisionDataset
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor

from ondemand_seg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PairAugmentation,
    SegmentationTransform,
    apply_transforms,
    check_same_size,
    joint_transforms,
    spatial_size,
)
from ondemand_seg.settings.label_spaces import voc_palette


def coded_pair(size=(60, 90)):
    """An image whose red channel spells its mask: mask id 7 where red is 255, else 0."""
    h, w = size
    mask = np.zeros(size, dtype=np.uint8)
    mask[10:40, 30:70] = 7
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[..., 0] = np.where(mask == 7, 255, 0)
    image[..., 1] = np.arange(w, dtype=np.uint8)[None, :]
    return image, mask


def red_of(image):
    return image[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]


def test_augmentation_keeps_image_and_mask_aligned():
    image, mask = coded_pair()
    transform = SegmentationTransform((48, 64), train=True, scale=(0.3, 1.0))
    for seed in range(10):
        transform.set_random_seed(seed)
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 48, 64) and out_mask.shape == (48, 64) and out_mask.dtype == torch.long
        red = red_of(out_image) > 0.5
        labelled = out_mask == 7
        # Interpolation can blur the image edge by a pixel; everywhere else they must agree.
        assert (red ^ labelled).float().mean() < 0.08, seed


def test_seeded_transform_is_reproducible_and_pil_works():
    image, mask = coded_pair()
    a = SegmentationTransform(32, seed=5)(Image.fromarray(image), Image.fromarray(mask))
    b = SegmentationTransform(32, seed=5)(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    flips = set()
    transform = SegmentationTransform(32)
    for seed in range(8):
        transform.set_random_seed(seed)
        flips.add(transform(image, mask)[0].sum().item())
    assert len(flips) > 1


def test_eval_transform_is_a_plain_resize():
    image, mask = coded_pair((64, 64))
    out_image, out_mask = SegmentationTransform(32, train=False)(image, mask)
    assert torch.equal(out_mask, torch.from_numpy(mask[::2, ::2]).long())
    assert torch.equal(red_of(out_image) > 0.5, out_mask == 7)


def test_segmentation_transform_reads_a_voc_palette_mask_as_ids():
    image, mask = coded_pair((64, 64))
    target = Image.fromarray(mask)
    target.putpalette(voc_palette())
    assert target.mode == "P"
    out_image, out_mask = SegmentationTransform(32, train=False)(Image.fromarray(image), target)
    assert torch.equal(out_mask, torch.from_numpy(mask[::2, ::2]).long())
    assert isinstance(SegmentationTransform(32), PairAugmentation)


class Recorder(PairAugmentation):
    """A PairAugmentation that returns how many pairs it got and the seed it was given."""

    seed = None

    def set_random_seed(self, seed):
        self.seed = seed

    def apply_many(self, samples):
        return torch.full((2, 2), len(samples)), torch.full((2, 2), self.seed)


class SplicingRecorder(Recorder):
    @property
    def splices(self):
        return True


def test_pair_augmentation_called_on_one_pair_augments_it_alone():
    recorder = SplicingRecorder()
    recorder.set_random_seed(4)
    image, target = recorder("image", "target")
    assert (image == 1).all() and (target == 4).all()
    assert not Recorder().splices, "the protocol's default: no splicing"


def test_joint_transforms_follows_vision_dataset_precedence():
    default = SegmentationTransform(32)
    joint = lambda image, target: (target, image)  # noqa: E731
    assert joint_transforms(None, None, None, default) is default
    assert joint_transforms(joint, None, None, default) is joint
    image_only = joint_transforms(None, lambda x: x + 1, None, default)
    assert image_only(1, 10) == (2, 10)
    target_only = joint_transforms(None, None, lambda y: y * 2, default)
    assert target_only(1, 10) == (1, 20)
    assert joint_transforms(None, lambda x: -x, lambda y: y * 2, default)(1, 10) == (-1, 20)
    for separate in [dict(transform=abs), dict(target_transform=abs), dict(transform=abs, target_transform=abs)]:
        with pytest.raises(ValueError) as ours:
            joint_transforms(joint, separate.get("transform"), separate.get("target_transform"), default)
        with pytest.raises(ValueError) as torchvision:
            VisionDataset("unused", transforms=joint, **separate)
        assert str(ours.value) == str(torchvision.value)


def pil_pair(size=(64, 64), label=7):
    image, mask = coded_pair(size)
    return Image.fromarray(image), Image.fromarray(np.where(mask == 7, label, 0).astype(np.uint8))


def test_apply_transforms_reseeds_pair_augmentations_and_splices_only_when_asked():
    pairs = [pil_pair(), pil_pair(label=3), pil_pair(label=5)]
    count, seed = apply_transforms(SplicingRecorder(), pairs, 11)
    assert (count == 3).all() and (seed == 11).all()
    count, seed = apply_transforms(Recorder(), pairs, 12)
    assert (count == 1).all() and (seed == 12).all()
    transform = SegmentationTransform(32)
    a, b = apply_transforms(transform, pairs, 5), apply_transforms(transform, pairs, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    outcomes = {apply_transforms(transform, pairs, seed)[0].sum().item() for seed in range(6)}
    assert len(outcomes) > 1


def draw_both(image, target):
    return torch.tensor([torch.rand(()).item(), random.random()]), target


def test_apply_transforms_seeds_torch_and_python_for_other_transforms_and_restores_them():
    pairs = [pil_pair()]
    torch.manual_seed(3)
    random.seed(3)
    first = apply_transforms(draw_both, pairs, 21)[0]
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(3)))
    assert random.random() == random.Random(3).random()
    torch.manual_seed(100)
    assert torch.equal(apply_transforms(draw_both, pairs, 21)[0], first), "the global state does not leak in"
    assert not torch.equal(apply_transforms(draw_both, pairs, 22)[0], first)
    # A torchvision v2 pipeline is reproducible from the seed, image and mask alike.
    flip = v2.RandomHorizontalFlip()
    joint = lambda image, target: flip(tv_tensors.Image(pil_to_tensor(image)),  # noqa: E731
                                       tv_tensors.Mask(torch.from_numpy(np.array(target))))
    outs = [apply_transforms(joint, pairs, seed) for seed in range(8)]
    assert all(torch.equal(apply_transforms(joint, pairs, seed)[1], outs[seed][1]) for seed in range(8))
    assert len({out[1].sum(0).argmax().item() for out in outs}) == 2, "flipped for some seeds, not for others"


def test_apply_transforms_rejects_an_image_and_mask_of_different_sizes():
    image, target = pil_pair((40, 60))
    resize_image = lambda image, target: (image.resize((30, 20)), target)  # noqa: E731
    with pytest.raises(ValueError, match=r"image of size 20x30 and a mask of size 40x60 \(height x width\)"):
        apply_transforms(resize_image, [(image, target)], 0)
    drop_target = lambda image, target: (pil_to_tensor(image), None)  # noqa: E731
    assert apply_transforms(drop_target, [(image, target)], 0)[1] is None, "a target without a size is not checked"


@pytest.mark.parametrize("value, size", [
    (Image.new("RGB", (30, 20)), (20, 30)),
    (Image.new("P", (30, 20)), (20, 30)),
    (torch.zeros(3, 20, 30), (20, 30)),
    (torch.zeros(20, 30), (20, 30)),
    (tv_tensors.Mask(torch.zeros(1, 20, 30)), (20, 30)),
    (np.zeros((20, 30, 3)), (20, 30)),
    (np.zeros((20, 30)), (20, 30)),
    (torch.zeros(5), None),
    ("not an image", None),
    ({"masks": torch.zeros(2, 20, 30)}, None),
])
def test_spatial_size(value, size):
    assert spatial_size(value) == size


def test_check_same_size_names_both_sizes_height_first():
    check_same_size(Image.new("RGB", (30, 20)), torch.zeros(20, 30))
    check_same_size(torch.zeros(3, 20, 30), {"boxes": []})
    with pytest.raises(ValueError, match=r"image of size 20x30 and a mask of size 30x20"):
        check_same_size(torch.zeros(3, 20, 30), np.zeros((30, 20)))


def test_a_joint_augmentation_passed_as_image_transform_is_named():
    with pytest.raises(ValueError, match="SegmentationTransform transforms image and mask together: pass it as transforms="):
        joint_transforms(None, SegmentationTransform(8), None, default=None)
