"""Generation on a Ray cluster (``pip install "ondemand_seg[ray]"``): sample indices split over a
pool of Ray actors, each holding one generator whose pipeline loads once, on whichever node Ray
places it.

- :func:`generate`: a ``ray.data.Dataset`` of raw samples, to feed training (``iter_torch_batches``,
  ``streaming_split`` across training workers) or to write with Ray Data's own writers;
- :func:`export`: an export folder (VOC, WebDataset, Hugging Face) written by the actors, the same
  files :func:`ondemand_seg.export` writes.

Importing this package does not import ray; calling either function without it raises
``ModuleNotFoundError`` naming the install command, before anything else is checked or loaded.
``python -m ondemand_seg.ray export`` is the command line (``--address`` joins a running cluster).
See ``docs/scale.md``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..exports import FORMATS
from ..exports.plan import ExportFolder, ExportOptions, export_plan
from ..exports.run import check_export_args, finish, reopen_lost_shards, write_shard, writer_class
from ..generation.generator import DiffuMaskGenerator, RawSample
from ..pipelines.builtin import BUILTIN_MODELS, RANDOM_WEIGHTS_MODEL, ModelSource
from ..settings.validation import check_bool, check_finite, check_int

INSTALL = 'pip install "ondemand_seg[ray]"'
# The columns of generate()'s rows, in order.
COLUMNS = ("index", "image", "mask", "prompt", "attempt", "seed")


def require_ray():
    """The ``ray`` module, with Ray Data.

    Raises:
        ModuleNotFoundError: ray (or Ray Data's dependencies) cannot be imported; the message names
            the install command.
    """
    try:
        import ray
        import ray.data  # noqa: F401 - pandas and pyarrow come with the "data" extra only
    except ImportError as error:
        raise ModuleNotFoundError(f"ondemand_seg.ray runs on Ray Data, which cannot be imported ({error}): "
                                  f"{INSTALL}") from None
    return ray


@dataclass(frozen=True)
class ActorPool:
    """The generating actors a call asks for: ``size`` actors reserving ``num_gpus`` GPUs and
    ``num_cpus`` CPUs each. An actor with a GPU generates on it; one without generates on the CPU
    with ``int(num_cpus)`` torch threads (at least one)."""

    size: int
    num_gpus: float
    num_cpus: float

    @classmethod
    def check(cls, actors: Any, num_gpus: Any, num_cpus: Any) -> "ActorPool":
        """The pool, each value checked (an error naming it otherwise)."""
        size = check_int("actors", actors, minimum=1)
        gpus, cpus = check_finite("num_gpus", num_gpus), check_finite("num_cpus", num_cpus)
        for name, value in (("num_gpus", gpus), ("num_cpus", cpus)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        return cls(size, gpus, cpus)

    @property
    def device(self) -> str:
        # Ray hides every GPU but the actor's own, so "cuda" is the one it reserved.
        return "cuda" if self.num_gpus > 0 else "cpu"

    @property
    def threads(self) -> int:
        return max(1, int(self.num_cpus))

    def check_fits(self, ray: Any) -> None:
        """Refuse a pool none of whose actors the cluster could ever place (Ray would wait for the
        resources forever): ``num_gpus`` or ``num_cpus`` above the cluster's total. Starts Ray's
        local instance first when none is running, as Ray Data would on first use.

        Raises:
            ClusterTooSmall: naming the setting and what the cluster has.
        """
        if not ray.is_initialized():
            ray.init()
        total = ray.cluster_resources()
        for resource, name, need in (("GPU", "num_gpus", self.num_gpus), ("CPU", "num_cpus", self.num_cpus)):
            if need > total.get(resource, 0):
                raise ClusterTooSmall(
                    f"{name}={need:g} per actor, but the Ray cluster has {total.get(resource, 0):g} {resource}(s) in "
                    f"all: no actor could start (Ray would wait for one forever); lower {name}, or start the "
                    "cluster's nodes before the command")

    def map_options(self) -> dict:
        """``Dataset.map_batches`` arguments that run a callable class on this pool, one unit of
        work per call."""
        import ray.data

        return {"compute": ray.data.ActorPoolStrategy(size=self.size), "num_gpus": self.num_gpus,
                "num_cpus": self.num_cpus, "batch_size": 1}


class ClusterTooSmall(ValueError):
    """The Ray cluster has fewer GPUs or CPUs in all than one actor reserves."""


@dataclass(frozen=True)
class Recipe:
    """What an actor rebuilds its generator from: plain, picklable settings (a generator itself
    holds shared counters that only pass to processes it starts)."""

    model: ModelSource
    classes: tuple[str, ...]
    seed: int
    config: dict
    device: str
    threads: int

    @classmethod
    def of(cls, generator: DiffuMaskGenerator, pool: ActorPool) -> "Recipe":
        return cls(for_other_processes(generator.model), tuple(generator.classes), generator.seed,
                   generator.config.to_dict(), pool.device, pool.threads)

    def build(self) -> DiffuMaskGenerator:
        # A thread count decides an image's last bit: one thread per CPU reserved, so an actor with
        # num_cpus=1 draws a one-thread DataLoader worker's bytes.
        torch.set_num_threads(self.threads)
        generator = DiffuMaskGenerator(self.model, self.classes, self.seed, self.device, **self.config)
        generator.keep_counts_in_process()  # an actor starts no DataLoader workers to share them with
        return generator


def for_other_processes(model: ModelSource) -> ModelSource:
    """``model`` as other processes can load it: a local folder given by a relative path becomes
    absolute (an actor on another node starts elsewhere; the folder must be there too)."""
    if isinstance(model, (str, os.PathLike)) and model not in (*BUILTIN_MODELS, RANDOM_WEIGHTS_MODEL) \
            and Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    return model


def check_generator(model: ModelSource, classes: Sequence[str], seed: Any, settings: dict) -> DiffuMaskGenerator:
    """The generator the actors rebuild, constructed here so that every setting is resolved and
    checked in the driver, before Ray starts anything; its pipeline never loads here."""
    return DiffuMaskGenerator(model, classes, seed, **settings)


def aligned_blocks(start: int, n: int, batch: int) -> range:
    """First indices of the generation blocks ``[k·batch, (k+1)·batch)`` that cover samples
    ``start .. start + n - 1``: the blocks a stream in one process generates, whole."""
    return range(start - start % batch, start + n, batch)


def check_columns(columns: Any) -> tuple[str, ...]:
    """``columns`` as a tuple of names from :data:`COLUMNS`, each once (an error naming the bad one)."""
    if isinstance(columns, str) or not isinstance(columns, Sequence) or not columns:
        raise TypeError(f"columns must be a non-empty sequence of column names from {', '.join(COLUMNS)}, "
                        f"got {columns!r}")
    for name in columns:
        if name not in COLUMNS:
            raise ValueError(f"unknown column {name!r}; columns are {', '.join(COLUMNS)}")
    if len(set(columns)) != len(columns):
        raise ValueError(f"columns must name each column once, got {list(columns)}")
    return tuple(columns)


def sample_columns(samples: Sequence[RawSample], seed: int, columns: Sequence[str] = COLUMNS) -> dict[str, np.ndarray]:
    """``samples`` as a batch of ``columns`` (of :data:`COLUMNS`: index, image, mask, prompt, attempt, seed)."""
    batch = {"index": np.array([s.index for s in samples], dtype=np.int64),
             "image": np.stack([s.image for s in samples]), "mask": np.stack([s.mask for s in samples]),
             "prompt": np.array([s.prompt for s in samples], dtype=object),
             "attempt": np.array([s.attempt for s in samples], dtype=np.int64),
             "seed": np.full(len(samples), seed, dtype=np.int64)}
    return {name: batch[name] for name in columns}


class BlockGenerator:
    """A Ray actor of :func:`generate`: builds its generator once, then turns each block it is
    handed (its first index) into the samples of that aligned generation block that lie in
    ``wanted``."""

    def __init__(self, recipe: Recipe, wanted: range, columns: tuple[str, ...]) -> None:
        self.generator = recipe.build()
        self.batch = self.generator.generator_config.batch_size
        self.wanted, self.columns = wanted, columns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # One samples() call per block: a rejected sample is redrawn beside the same neighbours as
        # in the stream, so redraws are byte-identical too.
        kept = [sample for first in batch["block"] for sample in self.generator.samples(range(first, first + self.batch))
                if sample.index in self.wanted]
        return sample_columns(kept, self.generator.seed, self.columns)


def generate(model: ModelSource, classes: Sequence[str], n: int, *, start: int = 0, seed: int = 0, actors: int = 1,
             num_gpus: float = 0, num_cpus: float = 1, columns: Sequence[str] = COLUMNS, vocabulary: Any = None,
             label_space: Any = None, image_size: Any = None, mask: Any = None, generator: Any = None,
             quality: Any = None):
    """Samples ``start .. start + n - 1`` of the generator, generated by ``actors`` Ray actors, as a
    lazy ``ray.data.Dataset``: nothing runs until it is consumed, and each consumption (an epoch)
    generates again, the same rows. Ray starts a local instance here unless ``ray.init`` (or
    ``RAY_ADDRESS``) names a cluster.

    Each row is one sample: ``index`` (int64), ``image`` (uint8 ``[H, W, 3]``), ``mask`` (uint8
    ``[H, W]``, label ids, 255 ignore), ``prompt`` (str), ``attempt`` and ``seed`` (int64); its
    image and mask are the bytes :class:`~ondemand_seg.DiffuMaskStream` draws for index ``i`` on
    the same device kind and thread count (raw, before any transform). Every index in the range
    appears exactly once; rows arrive in whichever order the actors finish (sort, or set Ray Data's
    ``preserve_order``, if order matters).

    The range is cut into the stream's generation blocks (``generator.batch_size`` indices,
    aligned to multiples of it); an actor generates one block per call, whole, and keeps the
    indices that lie in the range, so a range whose ends are not aligned generates a little more
    than ``n``.

    Args:
        model, classes, seed, vocabulary, label_space, image_size, mask, generator, quality: as
            :class:`~ondemand_seg.DiffuMaskGenerator` takes them, resolved and checked here, before
            Ray starts anything. A model folder must be at the same path on every node.
        n: samples (>= 1); start: the first index (>= 0).
        actors: generating actors (>= 1), each loading the pipeline once.
        num_gpus, num_cpus: resources each actor reserves. ``num_gpus > 0`` generates on the GPU
            (0.5: two actors share one); otherwise on the CPU with ``int(num_cpus)`` torch threads.
        columns: the columns each row holds, of :data:`COLUMNS` (default all). ``("image",
            "mask")`` for ``iter_torch_batches``, which cannot turn the ``prompt`` strings into
            tensors; the actors leave the others out, so no ``select_columns`` step runs.

    Raises:
        ModuleNotFoundError: ray is not installed (naming ``pip install "ondemand_seg[ray]"``).
        TypeError, ValueError: a bad argument or setting, named. ClusterTooSmall (a ValueError):
            ``num_gpus`` or ``num_cpus`` is more than the cluster has in all.
    """
    ray = require_ray()
    n, start = check_int("n", n, minimum=1), check_int("start", start, minimum=0)
    pool = ActorPool.check(actors, num_gpus, num_cpus)
    columns = check_columns(columns)
    source = check_generator(model, classes, seed, dict(vocabulary=vocabulary, label_space=label_space,
                                                        image_size=image_size, mask=mask, generator=generator,
                                                        quality=quality))
    blocks = aligned_blocks(start, n, source.generator_config.batch_size)
    pool.check_fits(ray)
    # Items, not ray.data.range: a read task would wait for a CPU that actors reserving every core
    # never free. One item per block, so that Ray hands the blocks out one at a time.
    items = ray.data.from_items([{"block": first} for first in blocks], override_num_blocks=len(blocks))
    return items.map_batches(BlockGenerator, **pool.map_options(),
                             fn_constructor_args=(Recipe.of(source, pool), range(start, start + n), columns))


class ShardWriter:
    """A Ray actor of :func:`export`: builds its generator and the format's writer once, then writes
    each shard it is handed as :func:`ondemand_seg.export` does (aligned batches, temporary names,
    the stats file last)."""

    def __init__(self, recipe: Recipe, out: str, options: ExportOptions) -> None:
        self.generator = recipe.build()
        self.folder = ExportFolder(out)
        self.writer = writer_class(options.format)(self.folder.root, options, self.generator.label_space)
        self.shards = options.shards()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written = [sum(write_shard(self.generator, self.writer, self.folder, self.shards[number]))
                   for number in batch["shard"]]
        return {"shard": np.asarray(batch["shard"]), "samples": np.array(written, dtype=np.int64)}


def export(model: ModelSource, classes: Sequence[str], out: str | os.PathLike, n: int, *, start: int = 0,
           seed: int = 0, format: str = "voc", shard_size: int = 1000, image_format: str = "jpg",
           overwrite: bool = False, progress: bool = True, actors: int = 1, num_gpus: float = 0, num_cpus: float = 1,
           vocabulary: Any = None, label_space: Any = None, image_size: Any = None, mask: Any = None,
           generator: Any = None, quality: Any = None) -> dict:
    """Write samples ``start .. start + n - 1`` into the folder ``out`` from ``actors`` Ray actors:
    the files, metadata, resuming and refusals of :func:`ondemand_seg.export` with the same
    arguments (``docs/export.md``), byte for byte on the same device kind and thread count.

    This process prepares the folder (checks the plan, removes an overwritten export), hands the
    unfinished shards to the actors one at a time, and writes the metadata once all are finished.
    ``out`` must be one folder every node sees at the same path (a shared file system). A rerun
    after an interruption writes only the shards without a stats file, and those whose files were
    deleted since.

    Args:
        model, classes, seed, vocabulary, label_space, image_size, mask, generator, quality: the
            generator, as :func:`generate` takes them.
        out, n, start, format, shard_size, image_format, overwrite, progress: as
            :func:`ondemand_seg.export` takes them (``workers`` is ``actors`` here).
        actors, num_gpus, num_cpus: the actor pool, as :func:`generate` takes it.

    Returns:
        The complete metadata.

    Raises:
        ModuleNotFoundError: ray, or the format's package, is not installed (naming the install
            command). TypeError, ValueError: a bad argument or setting, named; ExportError (a
            ValueError): ``out`` holds something else or another plan. All before Ray starts.
            ClusterTooSmall (a ValueError): ``num_gpus`` or ``num_cpus`` is more than the cluster
            has in all, once Ray has started.
    """
    ray = require_ray()
    pool = ActorPool.check(actors, num_gpus, num_cpus)
    options = check_export_args(out, n, start=start, format=format, shard_size=shard_size, image_format=image_format)
    check_bool("overwrite", overwrite)
    check_bool("progress", progress)
    source = check_generator(model, classes, seed, dict(vocabulary=vocabulary, label_space=label_space,
                                                        image_size=image_size, mask=mask, generator=generator,
                                                        quality=quality))
    folder = ExportFolder(Path(out).expanduser().resolve())
    plan = export_plan(source, options)
    folder.prepare(plan, overwrite, {name: spec.owned for name, spec in FORMATS.items()})
    reopen_lost_shards(folder, writer_class(format)(folder.root, options, source.label_space), options.shards())
    pending = [shard for shard in options.shards() if not folder.is_done(shard)]
    if pending:
        pool.check_fits(ray)
        shards = ray.data.from_items([{"shard": shard.number} for shard in pending],
                                     override_num_blocks=len(pending))
        written = shards.map_batches(ShardWriter, fn_constructor_args=(Recipe.of(source, pool), str(folder.root),
                                                                       options), **pool.map_options())
        with tqdm(total=sum(len(shard.indices) for shard in pending), unit="sample", desc=f"export {format} (ray)",
                  disable=not progress) as bar:
            for row in written.iter_rows():
                bar.update(int(row["samples"]))
    return finish(folder, source, options, plan)
