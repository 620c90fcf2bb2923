"""DiffuMaskStream: an endless ``IterableDataset`` of generated images and their masks."""
from __future__ import annotations

import os
import random
import threading
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import IterableDataset

from ..generation.generator import DiffuMaskGenerator, RawSample
from ..pipelines.builtin import ModelSource
from ..pipelines.devices import pick_device
from ..settings.config import GeneratorConfig, MaskConfig, QualityConfig
from ..settings.validation import check_bool, check_int
from .fingerprint import (
    fingerprint_differences,
    sequence_fingerprint,
    transform_identity,
)
from .schedule import ServingPlan, ServingSchedule, reshard
from .sharding import shard
from .transforms import (
    JointTransform,
    PairAugmentation,
    SegmentationTransform,
    apply_transforms,
    joint_transforms,
)


class DiffuMaskStream(IterableDataset):
    """Synthesizes ``(image, mask)`` pairs on the fly, DiffuMask style.

    Each DataLoader worker (and each ``torch.distributed`` rank) draws its own share of sample
    indices, loads the pipeline lazily on first use, and serves samples from a bounded cache:
    with ``reuse=k`` a generated sample is served up to ``k`` times under fresh augmentation, so
    the trainer is fed ``k`` samples per generated one. For CUDA generation in workers, create the
    DataLoader with ``multiprocessing_context="spawn"``; with several GPUs, workers take them
    round-robin. A generation that runs out of memory is retried with half the batch (counted in
    ``stats()["oom_retries"]``), and a ``next()`` that raises is not counted as served: the next
    call serves that sample again.

    Args:
        model: hub id, local diffusers folder, ``"toy"`` (the embedded ToyWorld model),
            ``"random-weights"``, or a zero-argument callable returning a pipeline (called once in
            each worker).
        classes: class names to generate, all in the label space.
        reuse: times each generated sample is served (>= 1).
        cache_size: most generated samples held in memory per worker (>= the generation batch).
        num_samples: samples per pass over the stream across all workers and ranks; ``None`` is endless.
        augment: with no transform given, the default :class:`SegmentationTransform` crops and
            flips at random (``True``) or only resizes (``False``).
        transforms: joint ``(image, target) -> (image, target)`` transform, as
            ``VOCSegmentation(transforms=...)`` takes; a :class:`PairAugmentation` is reseeded per
            sample and may splice cached samples.
        transform, target_transform: image-only and target-only transforms (``VisionDataset``'s
            meaning; not together with ``transforms``).
        seed: base seed; sample ``i`` depends on ``(seed, i)`` only.
        device: generation device; default CUDA (round-robin over workers) when available, else CPU.
        vocabulary, label_space, image_size, mask, generator, quality: the settings, merged field
            by field over the model's preset (:func:`~ondemand_seg.settings.resolve.resolve_config`);
            ``stream.config`` holds the result and ``stream.source`` the
            :class:`~ondemand_seg.generation.generator.DiffuMaskGenerator` drawing the samples.

    :meth:`from_export` serves an export's samples instead, on the same schedule.

    Yields:
        ``(image, target)``: a PIL RGB image and a PIL mode-"P" mask (ids, 255 ignore) passed
        through the transforms; with the default, ``image`` float ``[3, H, W]`` normalized like
        torchvision and ``mask`` long ``[H, W]``.
    """

    def __init__(
        self,
        model: ModelSource,
        classes: Sequence[str],
        reuse: int = 1,
        cache_size: int = 64,
        num_samples: int | None = None,
        augment: bool = True,
        transforms: JointTransform | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        vocabulary: Any = None,
        label_space: Sequence[str] | None = None,
        image_size: int | Sequence[int] | None = None,
        mask: MaskConfig | Mapping[str, Any] | None = None,
        generator: GeneratorConfig | Mapping[str, Any] | None = None,
        quality: QualityConfig | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        reuse, cache_size, num_samples = check_serving(reuse, cache_size, num_samples, augment)
        source = DiffuMaskGenerator(model, classes, seed, device, vocabulary=vocabulary, label_space=label_space,
                                    image_size=image_size, mask=mask, generator=generator, quality=quality)
        # The device decides the dtype (half precision on CUDA) and so the bytes of every sample.
        samples = sequence_fingerprint(model, source.config, seed=source.seed, classes=list(source.classes),
                                       device=pick_device(source.device).type)
        self._serve(source, samples, None, reuse, cache_size, num_samples, augment, transforms, transform,
                    target_transform)

    @classmethod
    def from_export(cls, export: str | os.PathLike, reuse: int = 1, cache_size: int = 64,
                    num_samples: int | None = None, augment: bool = True, transforms: JointTransform | None = None,
                    transform: Callable | None = None, target_transform: Callable | None = None,
                    seed: int | None = None) -> "DiffuMaskStream":
        """A stream serving the samples of an export folder (``ondemand_seg.export``, any format)
        instead of generating: no model is loaded, and ``stream.source`` is an
        :class:`~ondemand_seg.exports.ExportSource`.

        It serves on the live stream's schedule with its augmentation seeds: with ``seed=None``
        (the export's seed) and the live stream's ``reuse``, ``cache_size``, transforms and
        sharding, it yields what the live stream of the export's settings yields for as long as
        the live one draws only samples the export holds; exactly with PNG images
        (``image_format="png"``), up to JPEG's loss otherwise. Another ``seed`` serves the same
        samples in another order and augmentation.

        A pass is finite: every sample of the export is served ``reuse`` times, then iteration
        stops (a new iteration serves the pass again); ``num_samples`` ends it earlier. Shards
        split it as they split the live stream. Resume states name the export by its plan, so a
        copy of the folder elsewhere resumes, another export does not.

        Raises:
            ExportError: ``export`` holds no complete export. ValueError: ``num_samples`` is more
                than a pass serves, naming the export's size; a bad argument, named.
        """
        from ..exports.reader import ExportSource

        stream = cls.__new__(cls)
        IterableDataset.__init__(stream)
        reuse, cache_size, num_samples = check_serving(reuse, cache_size, num_samples, augment)
        source = ExportSource(export, seed)
        if num_samples is not None and num_samples > len(source) * reuse:
            raise ValueError(f"num_samples={num_samples} is more than export {source.root} serves in a pass: its "
                             f"{len(source)} samples x reuse {reuse} = {len(source) * reuse}")
        samples = {"export": source.fingerprint, "seed": source.seed}
        stream._serve(source, samples, source.indices, reuse, cache_size, num_samples, augment, transforms, transform,
                      target_transform)
        return stream

    def _serve(self, source: Any, samples: dict, indices: range | None, reuse: int, cache_size: int,
               num_samples: int | None, augment: bool, transforms: JointTransform | None, transform: Callable | None,
               target_transform: Callable | None) -> None:
        """Serve ``source``'s samples (``indices``: all it holds, ``None``: endless); ``samples``
        is what decides them, for the :attr:`fingerprint`."""
        self.source = source
        batch = source.generator_config.batch_size
        if cache_size < batch:
            raise ValueError(f"cache_size ({cache_size}) must be at least the generation batch_size ({batch})")
        self.reuse, self.cache_size, self.num_samples = reuse, cache_size, num_samples
        self._indices = indices
        self.transforms = joint_transforms(transforms, transform, target_transform,
                                           SegmentationTransform(source.image_size, train=augment))
        self._iterator: StreamIterator | None = None
        self._resume: dict = {}
        # The transform (its class and parameters) decides what is served from the samples.
        self.fingerprint = {**samples, "reuse": reuse, "cache_size": cache_size, "augment": augment,
                            "transforms": transform_identity(self.transforms)}

    def _first_plan(self) -> ServingPlan:
        """The plan a run starts from: fresh indices from the source's first."""
        return ServingPlan(base=0 if self._indices is None else self._indices.start)

    @property
    def _stop(self) -> int | None:
        """The first index past a finite source (``None``: endless)."""
        return None if self._indices is None else self._indices.stop

    @property
    def config(self):
        """The resolved settings (:class:`~ondemand_seg.settings.config.DiffuMaskConfig`)."""
        return self.source.config

    def stats(self) -> dict[str, int]:
        """Generated, accepted and rejected-by-reason counts, ``oom_retries`` (generation calls
        retried with a smaller batch after running out of memory) and ``neglected_classes`` (named
        classes labelled as not drawn), over all workers so far; from an export, its generation's."""
        return self.source.counts()

    def __iter__(self) -> "StreamIterator":
        resume = self._resume
        plan = ServingPlan.from_dict(resume["plan"]) if resume else self._first_plan()
        self._iterator = StreamIterator(self, *shard(), plan=plan, served=resume.get("served", 0))
        self._resume = {}
        return self._iterator

    def state_dict(self) -> dict:
        """Position of this process's shard, the plan all shards draw from, and the
        :attr:`fingerprint` of the settings that decide the sequence (torchdata
        ``StatefulDataLoader`` protocol: called in each worker, or in the main process with
        ``num_workers=0``). Before iterating: where the next iteration starts."""
        iterator = self._iterator
        if iterator is None:
            shard_id, shards = shard()
            if self._resume:
                return {**self._resume, "shard_id": self._resume.get("shard_id", shard_id),
                        "shards": self._resume.get("shards", shards)}
            return {"served": 0, "shard_id": shard_id, "shards": shards, "plan": self._first_plan().to_dict(),
                    "fingerprint": self.fingerprint}
        schedule = iterator.schedule
        return {"served": iterator.served, "shard_id": schedule.shard_id, "shards": schedule.shards,
                "plan": schedule.plan.to_dict(), "fingerprint": self.fingerprint}

    def resharded_state(self, states: Sequence[dict]) -> dict:
        """A state that continues a run whose every shard saved one of ``states`` (one per rank ×
        DataLoader worker, as :meth:`state_dict` wrote them) under any other number of ranks and
        workers: pass it to :meth:`load_state_dict` in the main process before the DataLoader
        starts. Samples drawn but not served ``reuse`` times are served first, then fresh ones;
        none is served twice and none skipped.

        Raises:
            ValueError: a state is malformed, made under other settings, or the states are not
                exactly the shards of one run.
        """
        states = list(states)
        if not states:
            raise ValueError("no stream states to reshard")
        for state in states:
            self.check_state(state)
        config = self.source.generator_config
        plan = reshard(states, seed=self.source.seed, batch=config.batch_size, cache_size=self.cache_size,
                       reuse=self.reuse, stop=self._stop)
        return {"served": 0, "plan": plan.to_dict(), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume the next iteration where ``state`` left off: the cache is rebuilt without
        regenerating what was already served, so the sample sequence continues, not restarts.

        Raises:
            ValueError: ``state`` is malformed, was saved by another shard, or under settings that
                give another sequence (other seed, classes, model weights, mask or sampler
                settings, reuse, ...): the error names each differing field.
        """
        if not isinstance(state, dict):
            raise TypeError(f"stream state must be a dict from state_dict(), got {type(state).__name__}")
        if state:
            self.check_state(state)
            shard_id, shards = shard()
            if "shard_id" in state and (state["shard_id"], state["shards"]) != (shard_id, shards):
                raise ValueError(
                    f"stream state was saved by shard {state['shard_id']} of {state['shards']}, but this process "
                    f"is shard {shard_id} of {shards}: resume with the same ranks and workers, or pass every "
                    "shard's state through resharded_state()"
                )
            plan = ServingPlan.from_dict(state["plan"])
            plan.check_reuse(self.reuse)
            quota = plan.quota(self.num_samples, shard_id, shards)
            if quota is not None and state["served"] > quota:
                raise ValueError(f"stream state's served {state['served']} is more than this shard serves in a pass "
                                 f"({quota} of num_samples={self.num_samples}): it was saved by another stream")
        self._resume = dict(state)

    def check_state(self, state: dict) -> None:
        """Refuse a state this stream cannot continue, before it is handed to a DataLoader (whose
        workers would raise it as a traceback): malformed, or saved under settings that give
        another sequence.

        Raises:
            ValueError: naming the malformed field, or each differing setting (saved -> now).
        """
        check_stream_state(state)
        changes = fingerprint_differences(state["fingerprint"], self.fingerprint)
        if changes:
            raise ValueError("stream state was saved under other settings, so resuming would not continue its "
                             f"sample sequence: {'; '.join(changes)} (saved -> now); resume with the settings "
                             "it was saved with")


# Resuming replays the serving schedule up to the count served: this many takes minutes, and no
# run serves more from one DataLoader worker.
MAX_REPLAYED_SERVINGS = 10**8


def check_serving(reuse: Any, cache_size: Any, num_samples: Any, augment: Any) -> tuple[int, int, int | None]:
    """The stream's serving arguments checked: an error naming a bad one."""
    reuse = check_int("reuse", reuse, minimum=1)
    cache_size = check_int("cache_size", cache_size, minimum=1)
    if num_samples is not None:
        num_samples = check_int("num_samples", num_samples, minimum=1)
    check_bool("augment", augment)
    return reuse, cache_size, num_samples


def find_stream_states(state: Any) -> list[dict]:
    """Every stream state inside a DataLoader's ``state_dict()`` (torchdata's
    ``StatefulDataLoader`` keeps one per worker, nested in its own layout), or inside a list of
    them (one per rank), found by their keys so that no loader layout is assumed."""
    if isinstance(state, dict):
        if {"plan", "fingerprint", "served"} <= set(state):
            return [state]
        return [found for value in state.values() for found in find_stream_states(value)]
    if isinstance(state, (list, tuple)):
        return [found for value in state for found in find_stream_states(value)]
    return []


def check_stream_state(state: dict) -> None:
    """An error naming what is wrong with a stream state that :meth:`DiffuMaskStream.state_dict`
    (or :meth:`~DiffuMaskStream.resharded_state`, which names no shard and starts its plan at 0)
    could not have written: a key missing, of the wrong type or out of range."""
    sharded = "shard_id" in state or "shards" in state
    required = ("served", "shard_id", "shards", "plan", "fingerprint") if sharded else ("served", "plan", "fingerprint")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"stream state lacks {', '.join(missing)}: it was not written by DiffuMaskStream.state_dict()")
    for key, minimum in (("served", 0), ("shard_id", 0), ("shards", 1)):
        if key not in state:
            continue
        value = state[key]
        if key == "served" and isinstance(value, int) and value > MAX_REPLAYED_SERVINGS:
            raise ValueError(f"stream state's served {value} is more than a resume replays "
                             f"({MAX_REPLAYED_SERVINGS:,}; replaying takes a few seconds per million)")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"stream state's {key} must be an int, got {value!r} ({type(value).__name__})")
        if value < minimum:
            raise ValueError(f"stream state's {key} must be >= {minimum}, got {value}")
    if sharded and state["shard_id"] >= state["shards"]:
        raise ValueError(f"stream state's shard_id {state['shard_id']} is not below its shards {state['shards']}")
    if not sharded and state["served"]:
        raise ValueError(f"a stream state naming no shard starts its plan (served 0), got served {state['served']}")
    if not isinstance(state["fingerprint"], dict):
        raise ValueError(f"stream state's fingerprint must be a dict, got {type(state['fingerprint']).__name__}")
    ServingPlan.from_dict(state["plan"])


class StreamIterator:
    """One shard's pass over a :class:`DiffuMaskStream`: serves the indices its
    :class:`~ondemand_seg.data.schedule.ServingSchedule` picks, generating them in batches.

    The schedule is a pure function of the stream settings, the plan and the count served, so
    ``served=n`` replays it without generating anything and only the samples still in the cache
    are generated again. A serving commits only when its sample is returned: a ``next()`` that
    raises (a failed generation, a transform error) leaves the schedule as it was, so the next call
    serves the same index and ``state_dict()`` never counts it.
    """

    def __init__(self, stream: DiffuMaskStream, shard_id: int, shards: int, plan: ServingPlan | None = None,
                 served: int = 0) -> None:
        self.stream = stream
        plan = plan or ServingPlan()
        self.schedule = ServingSchedule(plan, shard_id, shards, seed=stream.source.seed,
                                        batch=stream.source.generator_config.batch_size,
                                        cache_size=stream.cache_size, reuse=stream.reuse, stop=stream._stop)
        self.quota = plan.quota(stream.num_samples, shard_id, shards)
        self._lock = threading.Lock()
        for _ in range(served):
            self.schedule.advance()  # a state serving more than a finite source holds fails here, naming it
        # Servings returned to the caller; a next() in flight in another thread is not one yet.
        self.served = served

    def __iter__(self) -> "StreamIterator":
        return self

    def __getstate__(self) -> dict:
        # A copied stream (copy.deepcopy, pickle) keeps its position; a lock is made anew.
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __next__(self) -> tuple[Any, Any]:
        with self._lock:  # one serving at a time when threads share this iterator
            if (self.quota is not None and self.schedule.served >= self.quota) or self.schedule.exhausted:
                raise StopIteration
            checkpoint = self.schedule.checkpoint()
            try:
                pair = self._serve()
            except BaseException:
                self.schedule.rollback(checkpoint)
                raise
            self.served = self.schedule.served
            return pair

    def _serve(self) -> tuple[Any, Any]:
        """Advance the schedule by one serving, generate what it drew, and transform the entry served."""
        entry = self.schedule.advance()
        cache = self.schedule.cache
        # Generate whatever the schedule has drawn, so every cached sample is ready for splicing and
        # a resumed iterator (whose whole cache is pending) reaches the same state.
        pending = sorted({e for e in cache + [entry] if e.sample is None}, key=lambda e: e.index)
        if pending:
            for e, sample in zip(pending, self.stream.source.samples([e.index for e in pending])):
                e.sample = sample
        transforms = self.stream.transforms
        seed = entry.sample.augment_seed(self.stream.source.seed, entry.uses - 1)
        samples = [entry.sample]
        if isinstance(transforms, PairAugmentation) and transforms.splices:
            samples += splice_partners(entry.sample, [e.sample for e in cache if e is not entry], seed)
        return apply_transforms(transforms, [s.pil() for s in samples], seed)


def splice_partners(sample: RawSample, candidates: list[RawSample], seed: int, count: int = 3) -> list[RawSample]:
    """Up to ``count`` of ``candidates`` to splice with ``sample``, picked from the serving's own
    seed, so the pick is reproducible and leaves the serving schedule untouched."""
    others = list(candidates)
    random.Random(seed).shuffle(others)
    return others[:count]
