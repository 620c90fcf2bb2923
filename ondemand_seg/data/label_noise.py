"""Online label-noise learning: the segmenter being trained scores each synthetic label and prunes bad ones.

DiffuMask prunes noisy synthetic masks offline. Here it happens in the training process, on the
batch in hand: after a warm-up, each class's region in each sample is compared with the model's own
prediction (from the forward pass the loss needs anyway, so scoring costs no extra compute), and a
region whose agreement is low is dropped (it becomes ignore) or relabelled with the prediction.
Scoring in the training process works with any number of DataLoader workers and never ships
weights to them.

Why per class and relative, not one absolute cutoff per sample: with splicing and occlusion a
mosaic of good masks still disagrees with a half-trained model, so a sample-level cutoff drops a
large share of all samples, most of them of the classes the model is still bad at, and those
classes get worse. A region is therefore pruned only when its score is
both below ``cutoff`` and among the lowest ``drop_fraction`` of its own class's recent scores: a
class the model has not learnt yet keeps its labels, and the pruned share is bounded.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from ..settings.label_spaces import IGNORE_INDEX


def class_agreement(
    prediction: torch.Tensor, masks: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-sample, per-class IoU between predictions and masks.

    Args:
        prediction: ``[B, H, W]`` long predicted ids in ``[0, num_classes)``.
        masks: ``[B, H, W]`` long label ids; ``ignore_index`` pixels are left out of both sides.
        num_classes: number of ids, background (0) included.
    Returns:
        ``[B, num_classes]`` float IoU of ``prediction == c`` with ``masks == c``; NaN where the mask
        has no pixel of ``c`` (nothing to score) and for background, which is never scored.
    """
    valid = (masks != ignore_index).unsqueeze(-1)
    labelled = torch.nn.functional.one_hot(torch.where(masks == ignore_index, 0, masks), num_classes).bool() & valid
    predicted = torch.nn.functional.one_hot(prediction, num_classes).bool() & valid
    inter = (labelled & predicted).flatten(1, 2).sum(1)
    union = (labelled | predicted).flatten(1, 2).sum(1)
    present = labelled.flatten(1, 2).any(1)
    present[:, 0] = False
    return torch.where(present, inter / union.clamp_min(1), torch.full_like(inter, float("nan"), dtype=torch.float))


@dataclass
class LabelNoiseFilter:
    """Drops or relabels synthetic class regions the model disagrees with, after ``warmup`` steps.

    Each (sample, class) pair present in a mask is scored with :func:`class_agreement`. A pair is
    pruned when its score is below ``cutoff`` *and* below the ``drop_fraction`` quantile of that
    class's last ``window`` scores (``drop_fraction=1`` gives a plain absolute cutoff). Pruning
    covers the class's region in the mask and in the prediction (the pixels the two disagree on):
    ``mode="drop"`` makes them ignore; ``"relabel"`` gives them the predicted ids. Counters (per
    pair): ``scored``, ``dropped``, ``relabelled``, and ``per_class`` pruned counts.
    """

    cutoff: float = 0.3
    warmup: int = 200
    mode: str = "drop"
    drop_fraction: float = 0.1
    window: int = 256
    counts: dict = field(default_factory=lambda: {"scored": 0, "dropped": 0, "relabelled": 0, "per_class": {}})
    history: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.cutoff <= 1.0:
            raise ValueError(f"noise cutoff must be in [0, 1], got {self.cutoff}")
        if not 0.0 < self.drop_fraction <= 1.0:
            raise ValueError(f"noise drop_fraction must be in (0, 1], got {self.drop_fraction}")
        if self.window < 1:
            raise ValueError(f"noise window must be at least 1, got {self.window}")
        if self.mode not in ("drop", "relabel"):
            raise ValueError(f"noise mode must be 'drop' or 'relabel', got {self.mode!r}")

    def _relative_cutoffs(self, scores: torch.Tensor) -> torch.Tensor:
        """``[C]`` per-class score quantile over recent history plus this batch's ``[B, C]`` scores."""
        cutoffs = torch.full((scores.shape[1],), float("nan"))
        for c in range(1, scores.shape[1]):
            column = scores[:, c]
            recent = self.history.setdefault(c, collections.deque(maxlen=self.window))
            recent.extend(column[~column.isnan()].tolist())
            if recent:
                cutoffs[c] = torch.quantile(torch.tensor(list(recent)), self.drop_fraction)
        return cutoffs

    def __call__(
        self, step: int, logits: torch.Tensor, masks: torch.Tensor, prunable: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Masks to train on: ``logits`` ``[B, C, H, W]`` from the training forward pass, ``masks`` ``[B, H, W]``.

        ``prunable`` (``[B]`` bool, default all): the samples whose labels may be pruned. In a mix of
        real and synthetic data only the synthetic samples are, and only they enter the counters and
        the per-class history: a real label is ground truth, and its scores would raise the quantile
        the synthetic ones are ranked against.
        """
        if step < self.warmup:
            return masks
        prediction = logits.detach().argmax(1)
        scores = class_agreement(prediction, masks, logits.shape[1]).cpu()
        if prunable is not None:
            if prunable.shape != (masks.shape[0],):
                raise ValueError(f"prunable must be one flag per sample, shape [{masks.shape[0]}], got {list(prunable.shape)}")
            scores[~prunable.cpu().bool()] = float("nan")
        scored = ~scores.isnan()
        self.counts["scored"] += int(scored.sum())
        # A score equal to its class's quantile is kept, so a class the model scores 0 everywhere
        # (not learnt yet) loses nothing.
        bad = scored & (scores < self.cutoff)
        if self.drop_fraction < 1.0:
            bad &= scores < self._relative_cutoffs(scores)
        if not bad.any():
            return masks
        masks = masks.clone()
        for b, c in bad.nonzero().tolist():
            region = ((masks[b] == c) | (prediction[b] == c)) & (masks[b] != IGNORE_INDEX)
            masks[b][region] = IGNORE_INDEX if self.mode == "drop" else prediction[b][region]
            self.counts["per_class"][c] = self.counts["per_class"].get(c, 0) + 1
        self.counts["dropped" if self.mode == "drop" else "relabelled"] += int(bad.sum())
        return masks
