"""The quality gate: no corrupt sample reaches training."""
from __future__ import annotations

from collections import Counter

import torch

from ..settings.config import QualityConfig
from ..settings.label_spaces import IGNORE_INDEX

# Each reason the gate gives, with what a run of it means (for :class:`TooManyRejects`).
REJECT_CAUSES = {
    "non-finite image": "the model or its dtype is broken (NaN/inf pixels; try float32 or bfloat16)",
    "non-finite attention": "the captured attention held NaN/inf: a numerics or dtype problem in the "
                            "denoiser (try float32 or bfloat16), not a threshold problem",
    "out-of-range image": "the decoder gives values far outside [0, 1] (a [0, 255] or [-1, 1] scale, or a "
                          "wrong VAE scaling factor) that clamping would hide (QualityConfig.max_out_of_range)",
    "all-black image": "the model or its dtype is broken (the decoder gives black images)",
    "constant image": "the decoder gives one-colour images while the attention still places objects: a broken "
                      "VAE or dtype, or latents that collapsed (QualityConfig.constant_level)",
    "invalid label ids": "the mask holds ids outside the label space (nor 255): a labelling bug; please report it",
    "empty mask": "the threshold is too high for this model (MaskConfig.threshold) or "
                  "QualityConfig.min_foreground too strict",
    "full mask": "the threshold is too low for this model (MaskConfig.threshold) or "
                 "QualityConfig.max_foreground too strict",
}
REJECT_REASONS = tuple(REJECT_CAUSES)


def gate(images: torch.Tensor, masks: torch.Tensor, config: QualityConfig,
         finite_maps: torch.Tensor | None = None, num_classes: int | None = None,
         decoded: torch.Tensor | None = None) -> list[str | None]:
    """Why each sample fails the gate, or ``None`` when it passes.

    The image is judged as it will be served: clamped to [0, 1] (as it is stored in uint8). "All
    black" looks at the 99th percentile of its values and "constant" at the values between each
    channel's 1st and 99th percentile, so a few stray pixels do not make a black or one-colour
    image pass. "Out of range" is judged before clamping, on ``decoded`` (or ``images`` when it is
    ``None``).

    Args:
        images: ``[B, 3, H, W]`` float, [0, 1] when valid.
        decoded: ``[B, 3, H, W]`` float, the decoder's images before the pipeline clamped them
            (``None``: ``images`` are unclamped).
        masks: ``[B, H, W]`` long label ids, 255 ignore.
        finite_maps: ``[B]`` bool, False where the sample's attention maps were non-finite
            (``None``: not checked).
        num_classes: size of the label space: ids at or above it (other than 255) are invalid
            (``None``: not checked).
    Returns:
        One entry per sample: ``None`` or one of :data:`REJECT_REASONS`.
    """
    batch = images.shape[0]
    if finite_maps is not None and (finite_maps.dtype != torch.bool or tuple(finite_maps.shape) != (batch,)):
        raise ValueError(f"finite_maps must be a [{batch}] bool tensor (one per image), "
                         f"got {finite_maps.dtype} of shape {tuple(finite_maps.shape)}")
    finite = torch.isfinite(images).flatten(1).all(1)
    if decoded is not None:  # an inf clamped by the pipeline is still a broken image
        finite &= torch.isfinite(decoded).flatten(1).all(1)
    finite_attention = torch.ones(batch, dtype=torch.bool) if finite_maps is None else finite_maps.cpu()
    raw = torch.nan_to_num((images if decoded is None else decoded).float(), nan=0.5)
    outside = ((raw < -config.range_margin) | (raw > 1.0 + config.range_margin)).flatten(1).float().mean(1)
    out_of_range = outside > config.max_out_of_range
    served = torch.nan_to_num(images.float(), nan=0.0).clamp(0, 1)
    black = served.flatten(1).quantile(0.99, dim=1) <= config.black_level
    # One colour: every channel flat, whatever its level; judged on the values between each
    # channel's 1st and 99th percentile, so a few stray pixels do not make a flat image pass.
    values = served.flatten(2)
    low, high = values.quantile(0.01, dim=2, keepdim=True), values.quantile(0.99, dim=2, keepdim=True)
    constant = torch.minimum(torch.maximum(values, low), high).std(2, correction=0).amax(1) <= config.constant_level
    valid_ids = (masks >= 0) & ((masks < (num_classes if num_classes is not None else IGNORE_INDEX))
                                | (masks == IGNORE_INDEX))
    valid = valid_ids.flatten(1).all(1)
    pixels = masks[0].numel()
    foreground = ((masks > 0) & (masks != IGNORE_INDEX)).flatten(1).sum(1) / pixels
    background = (masks == 0).flatten(1).sum(1) / pixels
    reasons = []
    for i in range(batch):
        if not finite[i]:
            reasons.append("non-finite image")
        elif not finite_attention[i]:
            reasons.append("non-finite attention")
        elif out_of_range[i]:
            reasons.append("out-of-range image")
        elif not valid[i]:
            reasons.append("invalid label ids")
        elif black[i]:
            reasons.append("all-black image")
        elif constant[i]:
            reasons.append("constant image")
        elif foreground[i] < config.min_foreground:
            reasons.append("empty mask")
        elif background[i] < 1.0 - config.max_foreground:
            reasons.append("full mask")
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
            if reason not in REJECT_CAUSES:
                raise ValueError(f"unknown reject reason {reason!r}; the gate's reasons are {REJECT_REASONS}")
            self.by_reason[reason] += 1
            self.consecutive += 1
            if self.consecutive >= self.max_consecutive:
                causes = "; ".join(f"{r}: {REJECT_CAUSES[r]}" for r, _ in self.by_reason.most_common())
                raise TooManyRejects(
                    f"the quality gate rejected {self.consecutive} samples in a row (all rejects so far: "
                    f"{dict(self.by_reason)}). What they mean: {causes}. "
                    "Raise QualityConfig.max_consecutive_rejects to keep trying."
                )


class InProcessCounts(list):
    """Counts of one process: a list of ints with the ``get_lock()`` of a ``multiprocessing.Array``."""

    def __init__(self, values) -> None:
        import threading

        super().__init__(values)
        self._lock = threading.Lock()

    def get_lock(self):
        return self._lock


class GateStats:
    """Generated / accepted / rejected-by-reason counts, shared by every DataLoader worker.

    Backed by a spawn-context ``multiprocessing.Array`` so that workers started by fork or spawn
    add to the same numbers the main process reads; with ``shared=False`` by a list of this
    process (no named semaphore: see :meth:`DiffuMaskGenerator.keep_counts_in_process
    <ondemand_seg.DiffuMaskGenerator.keep_counts_in_process>`).
    """

    FIELDS = ("generated", "accepted") + REJECT_REASONS

    def __init__(self, shared: bool = True) -> None:
        import multiprocessing

        self._values = (multiprocessing.get_context("spawn").Array("q", len(self.FIELDS)) if shared
                        else InProcessCounts([0] * len(self.FIELDS)))

    def __getstate__(self) -> dict:
        from multiprocessing import context

        shared = not isinstance(self._values, InProcessCounts)
        if shared and context.get_spawning_popen() is not None:
            return {"values": self._values}  # a spawned DataLoader worker adds to the same counts
        # Any other copy (copy.deepcopy, pickle) counts on its own from the counts it was made with:
        # a shared array can only be handed to a process being started, a lock not at all.
        return {"shared": shared, "counts": self.as_dict()}

    def __setstate__(self, state: dict) -> None:
        if "values" in state:
            self._values = state["values"]
            return
        self.__init__(shared=state["shared"])
        self._values[:] = [state["counts"][field] for field in self.FIELDS]

    def add(self, reasons: list[str | None]) -> None:
        with self._values.get_lock():
            self._values[0] += len(reasons)
            for reason in reasons:
                self._values[1 if reason is None else self.FIELDS.index(reason)] += 1

    def as_dict(self) -> dict[str, int]:
        with self._values.get_lock():
            return dict(zip(self.FIELDS, self._values[:]))
