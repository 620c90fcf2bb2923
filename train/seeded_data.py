"""Real training data augmented reproducibly: the augmentation of each serving is seeded from the
run's seed and the serving's place in its worker's order, and that place is checkpointed.

A real dataset cannot name a seed per item the way the DiffuMask datasets do (item ``i`` is served
once per epoch, each time with a new crop), and a transform holding its own random state draws
from OS entropy in every run and restarts on resume. Counting servings per worker is reproducible
because the sampler fixes the order and the DataLoader hands batches to workers round-robin.
torchdata's ``StatefulDataLoader`` snapshots the counter with each worker's dataset state, so a
resumed run continues the count where it stopped.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from ondemand_seg.generation.seeding import serving_seed
from ondemand_seg.data.sharding import shard
from ondemand_seg.data.transforms import JointTransform, apply_transforms


class SeededServings(Dataset):
    """``dataset`` (untransformed ``(image, target)`` pairs) with ``transforms`` applied under
    :func:`~ondemand_seg.generation.seeding.serving_seed` of ``seed``, this process's shard and how many items
    the shard served before.

    ``state_dict()`` / ``load_state_dict()`` hold the count (torchdata's ``Stateful`` protocol).
    """

    def __init__(self, dataset: Dataset, transforms: JointTransform, seed: int) -> None:
        self.dataset, self.transforms, self.seed = dataset, transforms, int(seed)
        self.served = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        shard_id, shards = shard()
        seed = serving_seed(self.seed, shard_id, shards, self.served)
        self.served += 1
        return apply_transforms(self.transforms, [self.dataset[index]], seed)

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = int(state["served"])


class StatefulConcatDataset(ConcatDataset):
    """``ConcatDataset`` whose ``state_dict()`` holds its stateful parts' states (a part listed
    several times, e.g. real images repeated next to a synthetic set, is one state), so that
    ``StatefulDataLoader`` checkpoints them: it only asks the dataset it was given."""

    def _stateful_parts(self) -> dict[int, Any]:
        parts: dict[int, Any] = {}
        for position, part in enumerate(self.datasets):
            if hasattr(part, "state_dict") and all(part is not seen for seen in parts.values()):
                parts[position] = part
        return parts

    def state_dict(self) -> dict:
        return {position: part.state_dict() for position, part in self._stateful_parts().items()}

    def load_state_dict(self, state: dict) -> None:
        parts = self._stateful_parts()
        if set(state) != set(parts):
            raise ValueError(f"the saved data state holds parts {sorted(state)}, this dataset's stateful parts are "
                             f"{sorted(parts)}: it was saved from another mix of datasets")
        for position, part in parts.items():
            part.load_state_dict(state[position])


class SourceFlaggedConcatDataset(StatefulConcatDataset):
    """:class:`StatefulConcatDataset` whose items are ``(image, target, flagged)``: ``flagged`` is
    True for items of the parts at the positions in ``flagged`` (in a mix, the synthetic part, whose
    labels noise learning may prune; a DataLoader collates the flags into a ``[B]`` bool tensor)."""

    def __init__(self, datasets: Sequence[Dataset], flagged: Iterable[int]) -> None:
        super().__init__(datasets)
        self.flagged = frozenset(flagged)
        if not self.flagged <= set(range(len(self.datasets))):
            raise ValueError(f"flagged parts {sorted(self.flagged)} are not all among the {len(self.datasets)} parts")

    def __getitem__(self, index: int) -> tuple[Any, Any, bool]:
        if index < 0:
            index += len(self)
        part = bisect.bisect_right(self.cumulative_sizes, index)
        return (*super().__getitem__(index), part in self.flagged)
