"""Online noise learning: the segmenter being trained scores each synthetic sample and prunes bad labels.

DiffuMask prunes noisy synthetic masks offline. Here it happens in the training process, on the
batch in hand: after a warm-up, each sample's mask is compared with the model's own prediction
(from the forward pass the loss needs anyway, so scoring costs no extra compute), and a sample
whose agreement is below the cutoff is dropped (its mask becomes ignore) or relabelled with the
prediction. Scoring in the training process works with any number of DataLoader workers and
never ships weights to them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .label_spaces import IGNORE_INDEX


def sample_agreement(prediction: torch.Tensor, masks: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-sample foreground IoU between predictions and masks.

    Args:
        prediction: ``[B, H, W]`` long predicted ids.
        masks: ``[B, H, W]`` long label ids, ``ignore_index`` excluded.
    Returns:
        ``[B]`` IoU of the foreground labelling (a pixel counts as agreeing when both give it the
        same non-background id); 1 where neither has foreground.
    """
    valid = masks != ignore_index
    label_fg = (masks > 0) & valid
    pred_fg = (prediction > 0) & valid
    agree = (label_fg & pred_fg & (prediction == masks)).flatten(1).sum(1)
    union = (label_fg | pred_fg).flatten(1).sum(1)
    return torch.where(union > 0, agree / union.clamp_min(1), torch.ones_like(agree, dtype=torch.float))


@dataclass
class NoiseFilter:
    """Drops or relabels synthetic samples the model disagrees with, after ``warmup`` steps.

    ``mode="drop"`` turns a bad sample's mask into ignore; ``"relabel"`` replaces it with the
    model's prediction (ignore pixels stay ignore). Counters: ``scored``, ``dropped``, ``relabelled``.
    """

    cutoff: float = 0.3
    warmup: int = 200
    mode: str = "drop"
    counts: dict[str, int] = field(default_factory=lambda: {"scored": 0, "dropped": 0, "relabelled": 0})

    def __post_init__(self) -> None:
        if not 0.0 <= self.cutoff <= 1.0:
            raise ValueError(f"noise cutoff must be in [0, 1], got {self.cutoff}")
        if self.mode not in ("drop", "relabel"):
            raise ValueError(f"noise mode must be 'drop' or 'relabel', got {self.mode!r}")

    def __call__(self, step: int, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Masks to train on: ``logits`` ``[B, C, H, W]`` from the training forward pass, ``masks`` ``[B, H, W]``."""
        if step < self.warmup:
            return masks
        prediction = logits.detach().argmax(1)
        bad = sample_agreement(prediction, masks) < self.cutoff
        self.counts["scored"] += masks.shape[0]
        if not bad.any():
            return masks
        masks = masks.clone()
        if self.mode == "drop":
            masks[bad] = IGNORE_INDEX
            self.counts["dropped"] += int(bad.sum())
        else:
            masks[bad] = torch.where(masks[bad] == IGNORE_INDEX, masks[bad], prediction[bad])
            self.counts["relabelled"] += int(bad.sum())
        return masks
