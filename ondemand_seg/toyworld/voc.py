"""Write ToyWorld samples as a Pascal VOC 2012 segmentation tree.

The layout is the one ``torchvision.datasets.VOCSegmentation(root, year="2012")`` reads, so any
VOC training or evaluation code runs on ToyWorld unchanged.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..settings.label_spaces import voc_palette
from ..settings.validation import check_int
from .world import ToyWorld

# Val samples are drawn from indices this far past train's, so the splits never share a sample.
VAL_INDEX_OFFSET = 1_000_000_000


def write_voc(root: str | Path, n_train: int, n_val: int, image_size: int | tuple[int, int] = 64,
              seed: int = 0) -> Path:
    """Render ``n_train`` + ``n_val`` ToyWorld samples under ``root/VOCdevkit/VOC2012``.

    Writes ``JPEGImages/<id>.jpg`` (RGB, quality 95), ``SegmentationClass/<id>.png`` (palette
    PNG of class ids into `TOY_CLASSES`, VOC colours) and ``ImageSets/Segmentation/{train,val}.txt``.
    ``<id>`` is the zero-padded ToyWorld index, so ``ToyWorld(image_size, seed).sample(int(id))``
    regenerates a file's sample. Existing files with the same ids are overwritten.

    Returns:
        The ``VOC2012`` folder.
    """
    n_train = check_int("n_train", n_train, minimum=0)
    n_val = check_int("n_val", n_val, minimum=0)
    if n_train > VAL_INDEX_OFFSET:
        raise ValueError(f"n_train={n_train} would overlap val, which starts at index {VAL_INDEX_OFFSET}")
    world = ToyWorld(image_size=image_size, seed=seed)
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    images, masks, splits = voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation"
    for folder in (images, masks, splits):
        folder.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()

    for split, indices in (("train", range(n_train)),
                           ("val", range(VAL_INDEX_OFFSET, VAL_INDEX_OFFSET + n_val))):
        ids = []
        for index in indices:
            sample = world.sample(index)
            image_id = f"{index:010d}"
            # 4:4:4 because class is colour: chroma subsampling would smear hues across edges
            Image.fromarray(sample.image).save(images / f"{image_id}.jpg", quality=95, subsampling=0)
            mask = Image.fromarray(sample.mask)
            mask.putpalette(palette)  # turns the "L" image into "P" with VOC's colours
            mask.save(masks / f"{image_id}.png")
            ids.append(image_id)
        (splits / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return voc
