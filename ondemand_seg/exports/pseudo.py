"""Pseudo-labelled real images written as an export: a
:class:`~ondemand_seg.real.dataset.PseudoLabelledDataset` in the formats, folder layout and metadata
of the generator's export (:func:`~ondemand_seg.exports.run.export`, its writers), so that the labels
outlive the run and :class:`~ondemand_seg.exports.ExportSource`, the datasets' ``from_export`` and
the trainer's ``--from-export`` read them back as they read generated samples.

Sample ``k`` of the export is the ``k``-th image the quality gate kept, in the dataset's order; an
image it left out is counted in the metadata (``gate``, ``pseudo_labels.left_out``), not written.
An export holds samples of one size, so each image and its mask are stored at the labeller's
``image_size`` (the size the model read the image at): the image resized as the labeller resized it
(bilinear, antialiased), the mask by nearest neighbour, its ids unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.fingerprint import files_digest, sequence_fingerprint
from ..generation.generator import RawSample
from ..settings.validation import check_bool
from .plan import ExportFolder, ExportOptions, Shard, pixel_counts
from .run import FORMATS, check_export_args, finish, model_name, reopen_lost_shards, writer_class

if TYPE_CHECKING:
    from ..real.dataset import PseudoLabelledDataset

# What the metadata says the samples are (``pseudo_labels.kind``).
KIND = "pseudo-labels of real images"


def export_pseudo_labels(dataset: "PseudoLabelledDataset", out: str | os.PathLike, *, format: str = "voc",
                         shard_size: int = 1000, image_format: str = "jpg", overwrite: bool = False,
                         progress: bool = True) -> dict:
    """Label every image of ``dataset`` not yet labelled, then write those the quality gate kept into
    the folder ``out`` (see the module docstring), in one process.

    The folder's layout per ``format`` is the generator export's (``docs/export.md``); each sample's
    record holds its index, ``attempt`` 0, the labelling prompt (``""`` for an untagged image, read
    through one prompt per candidate class), the classes its mask was labelled with, the seed and,
    in the VOC and WebDataset records, ``source``: the image's file name (or dataset index). The
    metadata is the generator export's (the labeller's generator settings at the stored size,
    ``classes``: the labeller's candidates; ``gate``: the labelling's counts) and ``pseudo_labels``:
    the kind, model, :class:`~ondemand_seg.real.labeler.LabelConfig` (``strength`` among it), where
    the tags came from (the tags file's path, ``"list"``, ``"function"`` or ``None``: untagged),
    images labelled, written and left out, and each sample's source.

    As the generator's export, the folder's plan is written first: the labeller's model and
    settings, the images (a digest of their files or pixels) and tags, the format and sharding. The
    same command run again on a finished or interrupted export writes only the shards not finished
    (labelling every image again first); another plan is refused before any image is labelled.

    Args:
        dataset: the pseudo-labelled images.
        out: a new or empty folder, or one this export wrote.
        format, shard_size, image_format, overwrite, progress: as for
            :func:`~ondemand_seg.exports.run.export`.

    Returns:
        The metadata.

    Raises:
        TypeError, ValueError: a bad argument, named, before anything is labelled; the gate left out
            every image. ModuleNotFoundError: the format's package is missing. ExportError: ``out``
            holds something else or an export of another plan (naming each differing field).
    """
    from ..real.dataset import PseudoLabelledDataset

    if not isinstance(dataset, PseudoLabelledDataset):
        raise TypeError(f"dataset must be a PseudoLabelledDataset, got {type(dataset).__name__}")
    # shard_size as a plain int (a NumPy integer is accepted, and the plan is JSON).
    shard_size = check_export_args(out, len(dataset), format=format, shard_size=shard_size,
                                   image_format=image_format).shard_size
    check_bool("overwrite", overwrite)
    check_bool("progress", progress)
    labeler = dataset.labeler
    generator = labeler.generator
    config = dataclasses.replace(generator.config, image_size=tuple(labeler.image_size))
    plan = {"format": format, "start": 0, "shard_size": shard_size, "image_format": image_format, "kind": KIND,
            **sequence_fingerprint(generator.model, config, seed=labeler.seed, classes=list(labeler.candidates)),
            "labelling": dataclasses.asdict(labeler.config), "images": len(dataset),
            "images_digest": images_digest(dataset), "tags_digest": tags_digest(dataset)}
    plan = json.loads(json.dumps(plan))  # as read back from metadata.json (tuples as lists), to compare alike
    folder = ExportFolder(out)
    folder.prepare(plan, overwrite, {name: spec.owned for name, spec in FORMATS.items()})
    dataset.label_all(progress=progress)
    if getattr(dataset.images, "files", None) is not None and images_digest(dataset) != plan["images_digest"]:
        # The plan names the files as they were hashed; the masks are of what was read after.
        raise ValueError(f"the image files of {getattr(dataset.images, 'root', 'the dataset')} changed while they were "
                         "labelled (edited, replaced or renamed after the export's plan was written): the masks would "
                         "not be of the images the export records; export again (with overwrite) once they are final")
    labels = [dataset.pseudo_label(i) for i in range(len(dataset))]
    kept = [i for i, label in enumerate(labels) if label.mask is not None]
    gate = dataset.counts()
    if not kept:
        raise ValueError(f"the quality gate left out every one of the {len(dataset)} pseudo-masks ({gate}): "
                         "nothing to export")
    options = ExportOptions(format, len(kept), 0, shard_size, image_format, 0)
    writer = writer_class(format)(folder.root, options, config.label_space)
    shards = options.shards()
    reopen_lost_shards(folder, writer, shards)
    names = source_names(dataset)
    with tqdm(total=len(kept), desc=f"export {format}", unit="sample", disable=not progress) as bar:
        for shard in shards:
            sources = [kept[k] for k in shard.indices]
            if not written_from(folder, shard, sources):
                write_shard(dataset, writer, folder, shard, sources, names)
            bar.update(len(sources))
    extra = {"classes": list(labeler.candidates), "config": config.to_dict(), "gate": gate,
             "pseudo_labels": {"kind": KIND, "model": model_name(generator.model),
                               "labelling": plan["labelling"], "tags": dataset.tags_source,
                               "images": len(dataset), "written": len(kept), "left_out": len(dataset) - len(kept),
                               "sources": [names[i] for i in kept]}}
    return finish(folder, generator, options, plan, extra)


def write_shard(dataset: "PseudoLabelledDataset", writer: Any, folder: ExportFolder, shard: Shard,
                sources: Sequence[int], names: Sequence[Any]) -> None:
    """Write the dataset's images ``sources`` as the export's samples ``shard.indices`` through the
    format's ``writer``, then the shard's stats file (pixels per class, and the sources, which a
    rerun compares), which marks it finished. A shard that fails is abandoned by its writer."""
    labeler = dataset.labeler
    label_space = labeler.label_space
    pixels = np.zeros(len(label_space) + 1, dtype=np.int64)
    files = writer.shard(shard)
    try:
        for index, source in zip(shard.indices, sources):
            label = dataset.pseudo_label(source)
            image, mask = stored_pair(dataset._image(source), label.mask, labeler.image_size)
            prompt = labelling_prompt(dataset, source)
            files.add(RawSample(image, mask, prompt, index, 0),
                      {"index": index, "attempt": 0, "prompt": prompt,
                       "classes": list(label.classes), "seed": labeler.seed, "source": names[source]})
            pixels += pixel_counts(mask, label_space)
        files.commit()
    except BaseException:
        files.abort()
        raise
    folder.write_stats(shard, {"gate": {}, "pixels": {name: int(count) for name, count
                                                      in zip([*label_space, "ignore"], pixels)},
                               "sources": list(sources)})


def written_from(folder: ExportFolder, shard: Shard, sources: Sequence[int]) -> bool:
    """Whether ``shard`` is finished and holds the images ``sources``: a rerun whose gate kept other
    images (other numerics) writes it again."""
    if not folder.is_done(shard):
        return False
    try:
        return json.loads(folder.stats_path(shard).read_text()).get("sources") == list(sources)
    except (OSError, ValueError, AttributeError):
        return False


def stored_pair(image: torch.Tensor, mask: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """A ``[3, H, W]`` float image in [0, 1] and its ``[H, W]`` uint8 mask at ``size`` ``(h, w)``:
    ``[h, w, 3]`` uint8 (resized bilinear, antialiased, as the labeller resizes for the model) and
    ``[h, w]`` uint8 ids (nearest neighbour)."""
    height, width = size
    if tuple(image.shape[-2:]) != (height, width):
        image = F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True,
                              align_corners=False)[0].clamp(0, 1)
        mask = np.asarray(PIL.Image.fromarray(mask).resize((width, height), PIL.Image.NEAREST))
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), mask


def labelling_prompt(dataset: "PseudoLabelledDataset", index: int) -> str:
    """The prompt image ``index`` was read with: its tags' class prompt, ``""`` untagged (one prompt
    per candidate class)."""
    tags = dataset._tags(index)
    if tags is None:
        return ""
    return dataset.labeler.generator.class_prompt(random.Random(0), list(dict.fromkeys(tags))).text


def source_names(dataset: "PseudoLabelledDataset") -> list[Any]:
    """What each image is called: its file name when the images have ``names`` (a folder), else its index."""
    names = getattr(dataset.images, "names", None)
    return list(names) if names is not None else list(range(len(dataset)))


def images_digest(dataset: "PseudoLabelledDataset") -> str:
    """A sha256 of the images: their files' names and contents when they come from files, else
    their pixels as the labeller reads them (which decodes each image once)."""
    files = getattr(dataset.images, "files", None)
    if files is not None:
        return files_digest(files)
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        image = dataset._image(i)
        digest.update(str(tuple(image.shape)).encode() + image.numpy().tobytes())
    return digest.hexdigest()


def tags_digest(dataset: "PseudoLabelledDataset") -> str | None:
    """A sha256 of every image's tags, ``None`` untagged."""
    if dataset.tags is None:
        return None
    tags = [list(dataset._tags(i)) for i in range(len(dataset))]
    return hashlib.sha256(json.dumps(tags).encode()).hexdigest()
