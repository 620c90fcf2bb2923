import pytest
import torch

from ondemand_seg.masks import fuse_resolutions, labels_from_maps, normalize_maps


def blob(size, top, left, height, width, value=1.0):
    m = torch.zeros(size, size)
    m[top : top + height, left : left + width] = value
    return m


def test_normalize_maps_max_and_minmax():
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    assert torch.allclose(normalize_maps(maps, "max"), maps / 5)
    assert torch.allclose(normalize_maps(maps, "minmax"), (maps - 1) / 4)
    flat = torch.full((1, 1, 3, 3), 7.0)
    assert normalize_maps(flat, "minmax").abs().max() == 0
    with pytest.raises(ValueError, match="'sum'"):
        normalize_maps(maps, "sum")


def test_normalize_maps_is_per_map():
    maps = torch.stack([blob(4, 0, 0, 2, 2, 3.0), blob(4, 2, 2, 2, 2, 0.5)])[None]
    out = normalize_maps(maps)
    assert out[0, 0].max() == 1 and out[0, 1].max() == 1


def test_fuse_resolutions_upsamples_and_weights():
    coarse = blob(4, 0, 0, 2, 2)[None, None]  # top-left quarter
    fine = blob(8, 4, 4, 4, 4)[None, None]  # bottom-right quarter
    only_fine = fuse_resolutions({2: coarse, 1: fine}, {1: 1.0, 2: 0.0}, (16, 16))
    assert only_fine.shape == (1, 1, 16, 16)
    assert only_fine[0, 0, 12, 12] == 1 and only_fine[0, 0, 2, 2] == 0
    mostly_coarse = fuse_resolutions({2: coarse, 1: fine}, {1: 1.0, 2: 3.0}, (16, 16))
    assert mostly_coarse[0, 0, 2, 2] > mostly_coarse[0, 0, 13, 13] > mostly_coarse[0, 0, 2, 13]


def test_fuse_resolutions_names_missing_factor():
    with pytest.raises(ValueError, match=r"factor\(s\) \[4\].*captured factors: \[1, 2\]"):
        fuse_resolutions({1: torch.rand(1, 1, 8, 8), 2: torch.rand(1, 1, 4, 4)}, {1: 1, 2: 1, 4: 1}, (8, 8))


def test_labels_threshold_and_ignore_band():
    fused = torch.tensor([0.1, 0.35, 0.42, 0.5, 0.9]).view(1, 1, 1, 5)
    labels = labels_from_maps(fused, torch.tensor([[7]]), torch.tensor([[0.4]]), ignore_band=0.05)
    assert labels.tolist() == [[[0, 255, 255, 7, 7]]]
    no_band = labels_from_maps(fused, torch.tensor([[7]]), torch.tensor([[0.4]]), ignore_band=0.0)
    assert no_band.tolist() == [[[0, 0, 7, 7, 7]]]


def test_labels_highest_class_wins_with_own_threshold():
    dog = torch.tensor([0.9, 0.3, 0.50, 0.0])
    cat = torch.tensor([0.6, 0.8, 0.45, 0.0])
    fused = torch.stack([dog, cat]).view(1, 2, 1, 4)
    ids = torch.tensor([[12, 8]])
    labels = labels_from_maps(fused, ids, torch.tensor([[0.4, 0.4]]), ignore_band=0.0)
    assert labels.tolist() == [[[12, 8, 12, 0]]]
    # A stricter threshold for dog hands the third pixel to cat, which clears its own.
    labels = labels_from_maps(fused, ids, torch.tensor([[0.6, 0.4]]), ignore_band=0.0)
    assert labels.tolist() == [[[12, 8, 8, 0]]]


def test_labels_ignore_unused_slots():
    fused = torch.ones(2, 2, 3, 3)
    ids = torch.tensor([[5, 0], [5, 9]])
    labels = labels_from_maps(fused, ids, torch.full((2, 2), 0.4), 0.05)
    assert set(labels[0].unique().tolist()) == {5}
    assert set(labels[1].unique().tolist()) <= {5, 9}
