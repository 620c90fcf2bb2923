"""Segmentation metrics: a confusion matrix for mIoU (as in torchvision's segmentation references)."""
from __future__ import annotations

import torch

from .settings.label_spaces import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates ``[num_classes, num_classes]`` counts (rows: truth, columns: prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        """Add a batch: ``target`` and ``prediction`` are long tensors of the same shape."""
        keep = target != self.ignore_index
        index = self.num_classes * target[keep].long() + prediction[keep].long()
        self.mat += torch.bincount(index.cpu(), minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def reduce_from_all_processes(self) -> None:
        """Sum the counts over ``torch.distributed`` ranks (no-op when not initialised)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            mat = self.mat.to("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
            torch.distributed.all_reduce(mat)
            self.mat = mat.cpu()

    def iou(self) -> torch.Tensor:
        """``[num_classes]`` IoU per class; NaN for a class absent from both truth and prediction."""
        mat = self.mat.double()
        union = mat.sum(0) + mat.sum(1) - mat.diag()
        return torch.where(union > 0, mat.diag() / union.clamp_min(1), torch.full_like(union, float("nan")))

    def mean_iou(self) -> float:
        """Mean IoU over the classes that occur."""
        return float(self.iou().nanmean())

    def pixel_accuracy(self) -> float:
        return float(self.mat.diag().sum().double() / self.mat.sum().clamp_min(1))
