"""The quality gate: no corrupt sample reaches training."""
from __future__ import annotations

from collections import Counter

import torch

from .config import QualityConfig
from .label_spaces import IGNORE_INDEX

REJECT_REASONS = ("non-finite image", "all-black image", "empty mask", "full mask")


def gate(images: torch.Tensor, masks: torch.Tensor, config: QualityConfig) -> list[str | None]:
    """Why each sample fails the gate, or ``None`` when it passes.

    Args:
        images: ``[B, 3, H, W]`` float in [0, 1].
        masks: ``[B, H, W]`` long label ids, 255 ignore.
    Returns:
        One entry per sample: ``None`` or one of :data:`REJECT_REASONS`.
    """
    finite = torch.isfinite(images).flatten(1).all(1)
    black = torch.nan_to_num(images, nan=0.0).flatten(1).amax(1) <= config.black_level
    pixels = masks[0].numel()
    foreground = ((masks > 0) & (masks != IGNORE_INDEX)).flatten(1).sum(1) / pixels
    background = (masks == 0).flatten(1).sum(1) / pixels
    reasons = []
    for i in range(images.shape[0]):
        if not finite[i]:
            reasons.append(REJECT_REASONS[0])
        elif black[i]:
            reasons.append(REJECT_REASONS[1])
        elif foreground[i] < config.min_foreground:
            reasons.append(REJECT_REASONS[2])
        elif background[i] < 1.0 - config.max_foreground:
            reasons.append(REJECT_REASONS[3])
        else:
            reasons.append(None)
    return reasons


class TooManyRejects(RuntimeError):
    """The gate rejected so many samples in a row that generation is not working."""


class RejectCounter:
    """Counts rejects by reason and raises :class:`TooManyRejects` after too many in a row."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.by_reason: Counter[str] = Counter()

    def update(self, reasons: list[str | None]) -> None:
        for reason in reasons:
            if reason is None:
                self.consecutive = 0
                continue
            self.by_reason[reason] += 1
            self.consecutive += 1
            if self.consecutive >= self.max_consecutive:
                raise TooManyRejects(
                    f"the quality gate rejected {self.consecutive} samples in a row (all rejects so far: "
                    f"{dict(self.by_reason)}). Empty or full masks mean the threshold does not suit this "
                    "model (MaskConfig.threshold); black or non-finite images mean the model or its "
                    "dtype is broken. Raise QualityConfig.max_consecutive_rejects to keep trying."
                )


class GateStats:
    """Generated / accepted / rejected-by-reason counts, shared by every DataLoader worker.

    Backed by a spawn-context ``multiprocessing.Array`` so that workers started by fork or spawn
    add to the same numbers the main process reads.
    """

    FIELDS = ("generated", "accepted") + REJECT_REASONS

    def __init__(self) -> None:
        import multiprocessing

        self._values = multiprocessing.get_context("spawn").Array("q", len(self.FIELDS))

    def add(self, reasons: list[str | None]) -> None:
        with self._values.get_lock():
            self._values[0] += len(reasons)
            for reason in reasons:
                self._values[1 if reason is None else self.FIELDS.index(reason)] += 1

    def as_dict(self) -> dict[str, int]:
        with self._values.get_lock():
            return dict(zip(self.FIELDS, self._values[:]))
