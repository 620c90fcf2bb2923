"""A picture of what the generator makes: a grid of images beside their mask overlays."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_segmentation_masks, make_grid

from .label_spaces import IGNORE_INDEX, voc_palette


def overlay_grid(images: torch.Tensor, masks: torch.Tensor, num_classes: int, alpha: float = 0.5) -> torch.Tensor:
    """Each image beside itself with its mask painted over in VOC colours (ignore in VOC's cream).

    Args:
        images: ``[N, 3, H, W]`` uint8.
        masks: ``[N, H, W]`` long label ids, 255 ignore.
        num_classes: size of the label space.
    Returns:
        ``[3, GH, GW]`` uint8 grid, one row of (image, overlay) pairs per 4 samples.
    """
    palette = voc_palette()
    ids = list(range(1, num_classes)) + [IGNORE_INDEX]
    colors = [tuple(palette[3 * i : 3 * i + 3]) for i in ids]
    tiles = []
    for image, mask in zip(images, masks):
        painted = draw_segmentation_masks(image, torch.stack([mask == i for i in ids]), alpha=alpha, colors=colors)
        tiles += [image, painted]
    return make_grid(torch.stack(tiles), nrow=8, padding=2, pad_value=255)


def write_preview(dataset, n: int, out: str | Path, batch_size: int = 4, progress: bool = True) -> Path:
    """Generate samples ``0..n-1`` of a :class:`~ondemand_seg.DiffuMaskDataset` and save the grid as PNG."""
    from tqdm.auto import tqdm

    samples = []
    with tqdm(total=n, desc="generating", unit="img", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            batch = dataset.raw(list(range(start, min(start + batch_size, n))))
            samples += batch
            bar.update(len(batch))
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in samples])
    masks = torch.stack([torch.from_numpy(s.mask).long() for s in samples])
    # Small images (the 32 px toy model) are blown up with nearest neighbours so pixels stay visible.
    scale = max(1, 128 // max(images.shape[-2:]))
    if scale > 1:
        images = images.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
        masks = masks.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    grid = overlay_grid(images, masks, len(dataset.source.label_space))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out)
    return out
