"""The export loop every format shares: shards of contiguous sample indices, split over processes by
the stream's rule, each written by the format's writer and marked finished by its stats file; the
last process to finish sums the stats into the metadata."""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .. import __version__
from ..data.sharding import split_by_node, split_by_worker
from ..generation.generator import DiffuMaskGenerator, RawSample
from ..pipelines.devices import pick_device
from ..settings.label_spaces import IGNORE_INDEX, voc_palette
from ..settings.validation import check_bool, check_int
from .files import IMAGE_FORMATS, write_json
from .plan import ExportError, ExportFolder, ExportOptions, Shard, export_plan, pixel_counts


@dataclass(frozen=True)
class Format:
    """An export format: its writer (``module.writer`` in this package), the optional package it
    needs and the extra that installs it, and the files it writes (glob patterns under the export
    folder, removed by an overwrite: known here, so removing needs no optional package)."""

    module: str
    writer: str
    package: str | None
    extra: str | None
    owned: tuple[str, ...]


logger = logging.getLogger(__name__)

FORMATS = {
    "voc": Format("voc", "VocWriter", None, None, ("VOCdevkit",)),
    "webdataset": Format("wds", "WdsWriter", "webdataset", "webdataset", ("train-*.tar", ".train-*.tar.tmp")),
    "hf": Format("hf", "HfWriter", "datasets", "hf", ("data",)),
}


def require_package(format: str) -> None:
    """Import the optional package ``format`` needs.

    Raises:
        ModuleNotFoundError: it is not installed; the message names the install command.
    """
    spec = FORMATS[format]
    if spec.package is None:
        return
    try:
        importlib.import_module(spec.package)
    except ImportError as error:
        raise ModuleNotFoundError(f"format {format!r} writes with the {spec.package} package, which cannot be "
                                  f"imported ({error}): pip install \"ondemand_seg[{spec.extra}]\"") from None


def writer_class(format: str) -> type:
    spec = FORMATS[format]
    return getattr(importlib.import_module(f".{spec.module}", __package__), spec.writer)


def check_export_args(out: str | os.PathLike, n: Any, *, start: Any = 0, format: Any = "voc", shard_size: Any = 1000,
                      image_format: Any = "jpg", workers: Any = 0) -> ExportOptions:
    """The export's arguments checked, before any model loads (see :func:`export`).

    Raises:
        TypeError, ValueError: a bad value, named. ModuleNotFoundError: the format's package is not
            installed, naming the install command.
    """
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(image_format, str) or image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    options = ExportOptions(format, check_int("n", n, minimum=1), check_int("start", start, minimum=0),
                            check_int("shard_size", shard_size, minimum=1), image_format,
                            check_int("workers", workers, minimum=0))
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a folder path, got {out!r} ({type(out).__name__})")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out {str(out)!r} is a file; give a folder (new or empty, or an earlier export)")
    above = next((p for p in path.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"out {str(out)!r} lies under {str(above)!r}, which is a file")
    require_package(format)
    return options


def sample_record(generator: DiffuMaskGenerator, sample: RawSample) -> dict:
    """What is stored next to a sample: index, attempt, prompt, the classes the prompt names, and the
    base seed (``DiffuMaskGenerator(..., seed=seed).samples([index])`` draws it again)."""
    classes = generator.prompt(sample.index, sample.attempt).class_names
    return {"index": sample.index, "attempt": sample.attempt, "prompt": sample.prompt, "classes": list(classes),
            "seed": generator.seed}


def aligned_batches(shard: Shard, batch_size: int) -> Iterator[range]:
    """The generation batches that cover ``shard``: ``[k * batch_size, (k + 1) * batch_size)``, as a
    stream in one process draws them.

    An image depends in its last bit on the batch it was drawn in (float rounding of batched
    kernels), so drawing the stream's batches, whole, makes sample ``i`` the stream's sample ``i``
    byte for byte. A shard whose ends are not multiples of the batch size draws the samples of its
    first and last batch that lie outside it too, and drops them.
    """
    first = shard.start - shard.start % batch_size
    return (range(start, start + batch_size) for start in range(first, shard.stop, batch_size))


def write_shard(generator: DiffuMaskGenerator, writer: Any, folder: ExportFolder, shard: Shard) -> Iterator[int]:
    """Generate ``shard`` in :func:`aligned_batches`, write it through ``writer``, then its stats file
    (quality-gate counts of its draws, pixels per class), which marks it finished. Yields the number
    of samples written after each batch. A shard that fails is abandoned by its writer: no partial
    file stands under a final name, and no stats file is written."""
    gate: dict[str, int] = {}
    pixels = np.zeros(len(generator.label_space) + 1, dtype=np.int64)
    files = writer.shard(shard)
    try:
        for batch in aligned_batches(shard, generator.generator_config.batch_size):
            # Counted around this batch's draw under the generator's lock: another thread drawing
            # from the same generator (a second export) adds to the same counters.
            with generator.lock:
                before = generator.stats()
                drawn = generator.samples(batch)
                after = generator.stats()
            for key in after:
                gate[key] = gate.get(key, 0) + after[key] - before.get(key, 0)
            kept = [sample for sample in drawn if sample.index in shard.indices]
            for sample in kept:
                files.add(sample, sample_record(generator, sample))
                pixels += pixel_counts(sample.mask, generator.label_space)
            yield len(kept)
        files.commit()
    except BaseException:
        files.abort()
        raise
    names = [*generator.label_space, "ignore"]
    folder.write_stats(shard, {"gate": gate,
                               "pixels": {name: int(count) for name, count in zip(names, pixels)}})


def private_copy(generator: DiffuMaskGenerator, device: Any) -> DiffuMaskGenerator:
    """``generator`` rebuilt from its settings on ``device``: a DataLoader worker's copy shares the
    quality-gate counters with every other worker, so counts taken around one shard would include
    the others' draws; a rebuilt generator counts only its own."""
    return DiffuMaskGenerator(generator.model, generator.classes, generator.seed, device, **generator.config.to_dict())


class ShardJobs(IterableDataset):
    """The unfinished shards of one process, written as it is iterated; yields sample counts.

    A process is ``rank * workers + worker`` of ``world * workers`` (the stream's sharding rule,
    :func:`~ondemand_seg.data.sharding.shard`) and takes the shards whose number is its own modulo
    the process count; a worker generates on that process number's GPU, round-robin, as the
    stream's workers do. ``rank`` and ``world`` are taken in the main process, because a spawned
    worker does not see the process group.
    """

    def __init__(self, generator: DiffuMaskGenerator, options: ExportOptions, root: Path, rank: int, world: int) -> None:
        self.generator, self.options, self.root = generator, options, root
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[int]:
        worker, workers = split_by_worker()
        process, processes = self.rank * workers + worker, self.world * workers
        generator = self.generator
        if torch.utils.data.get_worker_info() is not None:
            generator = private_copy(generator, pick_device(generator.device, process))
        folder = ExportFolder(self.root)
        writer = writer_class(self.options.format)(self.root, self.options, generator.label_space)
        for shard in self.options.shards():
            if shard.number % processes == process and not folder.is_done(shard):
                yield from write_shard(generator, writer, folder, shard)


def model_name(model: Any) -> str:
    if callable(model):
        return f"{getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', type(model).__name__)}"
    return str(model)


def versions(format: str) -> dict[str, str]:
    packages = ["torch", "diffusers", FORMATS[format].package]
    return {"ondemand_seg": __version__,
            **{name: importlib.metadata.version(name) for name in packages if name is not None}}


def finish(folder: ExportFolder, generator: DiffuMaskGenerator, options: ExportOptions, plan: dict,
           extra: dict | None = None) -> dict:
    """The metadata: complete (written now) when every shard has its stats file, else as it stands.
    ``extra``: fields added to (or replacing) the generator's, such as a pseudo-label export's."""
    shards = options.shards()
    if not all(folder.is_done(shard) for shard in shards):
        return folder.read_metadata()
    files = writer_class(options.format)(folder.root, options, generator.label_space).finish(shards)
    palette = voc_palette()
    colours = {name: palette[3 * i:3 * i + 3] for i, name in enumerate(generator.label_space)}
    metadata = {
        "complete": True, "format": options.format, "samples": options.n, "start": options.start,
        "shards": len(shards), "shard_size": options.shard_size, "image_format": options.image_format, "files": files,
        "model": model_name(generator.model), "model_fingerprint": plan["model"], "seed": generator.seed,
        "classes": list(generator.classes), "config": generator.config.to_dict(),
        "label_space": list(generator.label_space),
        "palette": {**colours, "ignore": palette[3 * IGNORE_INDEX:3 * IGNORE_INDEX + 3]},
        "ignore_index": IGNORE_INDEX, "versions": versions(options.format),
        **folder.summary(shards, generator.label_space), "plan": plan, **(extra or {}),
    }
    write_json(folder.metadata_path, metadata)
    return metadata


def export(generator: DiffuMaskGenerator, out: str | os.PathLike, n: int, *, start: int = 0, format: str = "voc",
           shard_size: int = 1000, image_format: str = "jpg", workers: int = 0, overwrite: bool = False,
           progress: bool = True) -> dict:
    """Write the generator's samples ``start`` to ``start + n - 1`` into the folder ``out``.

    Sample ``i`` on disk is the generator's sample ``i`` drawn as a :class:`~ondemand_seg.DiffuMaskStream`
    in one process draws it, in whole generation batches (:func:`aligned_batches`): its mask's ids
    unchanged and, with ``image_format="png"``, its image's pixels (JPEG, quality 95, otherwise).
    An image's last bit depends on the numerics too: on the CPU, compare processes with the same
    thread count (DataLoader workers compute with one thread). Layouts, one per
    ``format``: ``"voc"`` a Pascal VOC 2012 tree (``torchvision.datasets.VOCSegmentation(out,
    image_set="train")``), ``"webdataset"`` tar shards (``webdataset.WebDataset``), ``"hf"`` parquet
    shards with ``datasets`` features (``datasets.load_dataset(out)``); see ``docs/export.md``.

    The work is done in shards of ``shard_size`` contiguous indices, each written under temporary
    names and renamed into place when complete, then marked finished by its stats file. Running the
    same export again after an interruption writes only the unfinished shards. ``out/metadata.json``
    holds the plan from the start (``"complete": false``) and, once every shard is finished, the
    generator settings, model fingerprint, label space and palette, versions, quality-gate counts
    and each class's pixel share.

    Args:
        generator: the samples' source; its settings, seed and classes decide the files.
        out: a new or empty folder, or one an earlier export wrote.
        n: samples to write (>= 1); start: the first sample index (>= 0).
        format: ``"voc"``, ``"webdataset"`` (``pip install "ondemand_seg[webdataset]"``) or ``"hf"``
            (``pip install "ondemand_seg[hf]"``).
        shard_size: samples per shard (>= 1): per tar or parquet file, and the unit of resuming.
        image_format: ``"jpg"`` or ``"png"`` (lossless).
        workers: generating processes (DataLoader workers; 0: this process); on several GPUs each
            takes one, round-robin. Under ``torch.distributed`` every rank calls ``export`` and
            writes its own share of the shards (rank 0 prepares the folder; the last rank to finish
            writes the metadata).
        overwrite: remove an export already in ``out`` (whatever its settings) and start afresh.
        progress: show a progress bar (samples/s, time left) on rank 0.

    Returns:
        The metadata (``"complete": false`` on a rank that finished before the others).

    Raises:
        TypeError, ValueError: a bad argument, named, before any model loads. ModuleNotFoundError:
            the format's package is missing, naming the install command. ExportError (a
            ValueError): ``out`` is a file, holds something other than an export, or holds an
            export made with other settings (naming each differing field) and ``overwrite`` is False.
    """
    options = check_export_args(out, n, start=start, format=format, shard_size=shard_size,
                                image_format=image_format, workers=workers)
    if not isinstance(generator, DiffuMaskGenerator):
        raise TypeError(f"generator must be a DiffuMaskGenerator, got {type(generator).__name__}")
    check_bool("overwrite", overwrite)
    check_bool("progress", progress)
    folder = ExportFolder(out)
    plan = export_plan(generator, options)
    rank, world = split_by_node()
    if rank == 0:
        folder.prepare(plan, overwrite, {name: spec.owned for name, spec in FORMATS.items()})
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        folder.check_plan(plan)
    processes = max(workers, 1)
    own = [shard for shard in options.shards() if (shard.number % (world * processes)) // processes == rank]
    reopen_lost_shards(folder, writer_class(format)(folder.root, options, generator.label_space), own)
    pending = [shard for shard in own if not folder.is_done(shard)]
    if pending:
        jobs = ShardJobs(generator, options, folder.root, rank, world)
        context = "spawn" if workers and torch.cuda.is_available() else None
        loader = DataLoader(jobs, batch_size=None, num_workers=workers, multiprocessing_context=context)
        with tqdm(total=sum(len(shard.indices) for shard in pending), unit="sample", desc=f"export {format}",
                  disable=not progress or rank != 0) as bar:
            for count in loader:
                bar.update(int(count))
    return finish(folder, generator, options, plan)


def reopen_lost_shards(folder: ExportFolder, writer: Any, shards: list[Shard]) -> None:
    """Mark unfinished (remove the stats file of) each finished shard whose files are gone (deleted or
    moved by hand since), so that a rerun writes it again instead of reporting it written."""
    for shard in shards:
        if folder.is_done(shard) and not all(path.is_file() for path in writer.files(shard)):
            logger.warning("export shard %d has a stats file but lost some of its files: writing it again",
                           shard.number)
            folder.stats_path(shard).unlink()


@contextlib.contextmanager
def torchrun_process_group() -> Iterator[None]:
    """Inside ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), join its process group for the
    duration, so that :func:`export` sees this process's rank; otherwise nothing. gloo on GPUs too:
    the export only synchronises once, on a barrier, and nccl would have to pick a device for it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo")
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
