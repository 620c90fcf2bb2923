"""train/seeded_data.py: real data augmented reproducibly from the run's seed, its state resumed."""
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ondemand_seg import SegmentationTransform

MODULE = Path(__file__).resolve().parents[1] / "train" / "seeded_data.py"
_spec = importlib.util.spec_from_file_location("seeded_data", MODULE)
seeded_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeded_data)
SeededServings, StatefulConcatDataset = seeded_data.SeededServings, seeded_data.StatefulConcatDataset
SourceFlaggedConcatDataset = seeded_data.SourceFlaggedConcatDataset


class Pairs(Dataset):
    """Untransformed (H×W×3 uint8 image, H×W mask) pairs, each pixel's value unique to its item."""

    def __init__(self, n=6, size=24):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        return rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8), np.full((self.size, self.size), i, np.uint8)


def servings(seed, n=12, workers=0, state=None, loader_state=None):
    """The first ``n`` images a loader over seeded real pairs serves (batch 2, fixed order)."""
    data = SeededServings(Pairs(), SegmentationTransform(12, train=True), seed)
    if state is not None:
        data.load_state_dict(state)
    loader = StatefulDataLoader(StatefulConcatDataset([data, data]), batch_size=2, num_workers=workers,
                                sampler=torch.utils.data.RandomSampler(range(12), generator=torch.Generator().manual_seed(0)))
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    return loader, [images for images, _ in itertools.islice(iter(loader), n // 2)]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_seed_serves_the_same_crops_and_another_seed_others(workers):
    _, first = servings(0, workers=workers)
    _, again = servings(0, workers=workers)
    _, other = servings(1, workers=workers)
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "augmentation not fixed by the seed"
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_each_serving_of_an_item_gets_a_new_crop():
    data = SeededServings(Pairs(n=1), SegmentationTransform(12, train=True), seed=0)
    crops = [data[0][0] for _ in range(4)]
    assert data.state_dict() == {"served": 4}
    assert len({c.numpy().tobytes() for c in crops}) == 4, "every epoch's serving of an item would look the same"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_loader_serves_what_the_uninterrupted_one_would(workers):
    loader, whole = servings(0, n=12, workers=workers)
    loader, head = servings(0, n=6, workers=workers)
    state = loader.state_dict()
    _, tail = servings(0, n=6, workers=workers, loader_state=state)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, whole))


def test_a_part_listed_twice_is_one_state_and_a_foreign_state_is_refused():
    real = SeededServings(Pairs(), SegmentationTransform(12), seed=0)
    mixed = StatefulConcatDataset([real, real, Pairs()])
    real[0]
    assert mixed.state_dict() == {0: {"served": 1}}
    mixed.load_state_dict({0: {"served": 7}})
    assert real.served == 7
    with pytest.raises(ValueError, match=r"holds parts \[1\].*stateful parts are \[0\]"):
        mixed.load_state_dict({1: {"served": 7}})


def test_flagged_concat_marks_the_items_of_its_flagged_parts_and_keeps_their_state():
    real = SeededServings(Pairs(n=3), SegmentationTransform(12), seed=0)
    synthetic = SeededServings(Pairs(n=2), SegmentationTransform(12), seed=1)
    mixed = SourceFlaggedConcatDataset([real, real, synthetic], flagged=[2])
    flags = [mixed[i][2] for i in range(len(mixed))]
    assert flags == [False] * 6 + [True] * 2
    assert mixed[-1][2] is True and int(mixed[-1][1][0, 0]) == 1, "negative index: the last synthetic item"
    assert mixed.state_dict() == {0: {"served": 6}, 2: {"served": 4}}  # two in the loop, two by index -1
    batch = next(iter(torch.utils.data.DataLoader(mixed, batch_size=8)))
    assert batch[2].dtype == torch.bool and batch[2].tolist() == flags
    with pytest.raises(ValueError, match=r"flagged parts \[3\] are not all among the 3 parts"):
        SourceFlaggedConcatDataset([real, real, Pairs()], flagged=[3])
