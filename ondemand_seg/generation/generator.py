"""The generator: a model of any supported family, with attention capture, turns sample indices
into images, their label masks (through :func:`~ondemand_seg.masks.labelling.masks_from_attention`)
and their prompts. Sample ``i`` depends on ``(seed, i)`` alone."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import random
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch

from ..data.sharding import shard
from ..masks.labelling import finite_samples, masks_from_attention
from ..masks.maps import neglected_classes
from ..masks.quality import GateStats, RejectCounter, gate
from ..pipelines.builtin import ModelSource
from ..pipelines.devices import check_device, pick_device
from ..pipelines.families import (
    ModelSpec,
    call_options,
    describe_pipeline,
    latent_size,
    step_callback,
    text_segments,
)
from ..pipelines.loading import load_pipeline
from ..settings.config import DiffuMaskConfig, GeneratorConfig, MaskConfig
from ..settings.label_spaces import class_ids, voc_palette
from ..settings.resolve import resolve_config
from ..settings.validation import check_classes, check_int
from ..settings.vocabulary import PromptSpec
from .capture import AttentionStore, install_capture
from .seeding import SubStream, augment_seed, sample_seed
from .tokens import class_token_weights

# torch.compile backend for ``GeneratorConfig(compile=True)``; the tests trace with "eager" (the same
# graphs and guards, without inductor's code generation).
COMPILE_BACKEND = "inductor"
# Dynamo treats the Python ints a traced function reads as constants and guards on their values.
# The capture reads the store's step counters (``recording``) and per-factor layer counts, which
# change every step: as constants they would cost a graph per step, past dynamo's recompile limit
# (8) from step 8 on. Made dynamic, the step only decides a branch, so a batch size costs a graph
# per branch the capture takes: recording into empty sums (the first recorded step), recording,
# and, for a window narrower than (0, 1), not recording before and after it (2 to 4 graphs,
# whatever the number of steps). The pattern matches the capture processors' ``store`` attribute.
DYNAMIC_STORE_INTS = r".*\.store\.(step|_first_step|_end_step|counts\[\d+\])$"


@contextlib.contextmanager
def compile_settings():
    """Dynamo settings for a pipeline call whose denoiser is compiled with capture installed: the
    store's counters are dynamic ints (:data:`DYNAMIC_STORE_INTS`), reached through modules."""
    sources = ",".join(filter(None, [torch.compiler.config.dynamic_sources, DYNAMIC_STORE_INTS]))
    # Without allow_unspec_int_on_nn_module, ints reached through a module's attributes stay
    # constants whatever dynamic_sources says.
    with torch.compiler.config.patch(dynamic_sources=sources), \
            torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        yield


@dataclass
class GeneratedBatch:
    """Images and masks of one generation call, on the CPU.

    images: ``[B, 3, H, W]`` float in [0, 1]; masks: ``[B, H, W]`` long label ids (255 ignore);
    with ``keep_maps``, fused: ``[B, K, H, W]`` the fused attention the masks came from and
    class_ids: ``[B, K]`` the label of each map (0 = unused slot, or a class the model neglected);
    finite_maps: ``[B]`` bool, False where a sample's attention maps held a non-finite value
    (``None``: not checked); neglected: ``[B]`` long, classes of each prompt labelled as not drawn
    (``MaskConfig.neglect_ratio``); decoded: ``[B, 3, H, W]`` float, the decoder's images before
    the pipeline clamped them to [0, 1] (``None``: not recorded), which the quality gate's range
    check reads.
    """

    images: torch.Tensor
    masks: torch.Tensor
    fused: torch.Tensor | None = None
    class_ids: torch.Tensor | None = None
    finite_maps: torch.Tensor | None = None
    neglected: torch.Tensor | None = None
    decoded: torch.Tensor | None = None

    def uint8_images(self) -> np.ndarray:
        """The images as ``[B, H, W, 3]`` uint8 RGB (what samples, oracles and labellers take)."""
        return (self.images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class CapturingPipeline:
    """A loaded pipeline of any supported family with attention capture installed: prompts and
    seeds in, images and the label masks read out of their text attention out, in one call.

    Settings left ``None`` (resolution weights, steps, guidance) take the model's own values, and
    mask settings the model cannot serve (a resolution it lacks, output-space maps on cross-
    attention) are an error here, at first load, naming what the model has.

    ``generator_config.channels_last`` converts the denoiser's weights to channels-last and
    ``generator_config.compile`` compiles its forward in place (``nn.Module.compile``), after the
    capture processors are installed: dynamo traces them into the denoiser's graph with no graph
    break, recording steps included, and the pipeline keeps its own module. The first batch of
    each size compiles 2 to 4 graphs (:data:`DYNAMIC_STORE_INTS`); past dynamo's recompile limit
    (8 graphs, e.g. a third batch size) new variants run uncompiled, with the same results.
    """

    def __init__(self, pipeline, mask_config: MaskConfig, generator_config: GeneratorConfig) -> None:
        self.pipeline = pipeline
        self.spec: ModelSpec = describe_pipeline(pipeline)
        self.family = self.spec.family
        self.spec.check_mask(mask_config)
        self.mask_config = mask_config
        steps = generator_config.num_inference_steps or self.spec.num_inference_steps
        guidance = generator_config.guidance_scale
        self.generator_config = dataclasses.replace(
            generator_config, num_inference_steps=steps,
            guidance_scale=self.spec.guidance_scale if guidance is None else guidance)
        self.store = AttentionStore(mask_config.map_source, mask_config.joint_softmax, generator_config.capture_kernel,
                                    per_head=mask_config.aggregation != "mean", rescaling=mask_config.token_rescaling)
        self.store.self_attention_factor = mask_config.self_attention_factor
        self.call_options = call_options(pipeline, self.family)
        self.text = text_segments(pipeline, self.family, self.call_options)
        self.capturing_layers = install_capture(self.denoiser, self.store, self.family,
                                                mask_config.self_attention_factor is not None)
        if self.generator_config.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        if self.generator_config.compile:
            self.denoiser.compile(backend=COMPILE_BACKEND)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.family.denoiser)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def mask_config_for(self, size: tuple[int, int]) -> MaskConfig:
        """The mask settings used at ``size``, the model's resolution weights filled in."""
        if self.mask_config.resolution_weights is not None:
            return self.mask_config
        return dataclasses.replace(self.mask_config, resolution_weights=self.spec.default_resolution_weights(size))

    def generate(
        self, prompts: Sequence[PromptSpec], seeds: Sequence[int], size: tuple[int, int], keep_maps: bool = False
    ) -> GeneratedBatch:
        """One image and mask per prompt; image ``i`` depends on ``prompts[i]`` and ``seeds[i]`` only."""
        pipe, cfg = self.pipeline, self.generator_config
        self.spec.check_image_size(size)
        mask_config = self.mask_config_for(size)
        weights, ids = class_token_weights(self.text, prompts)
        self.store.begin(weights.to(self.device), latent_size(self.spec, size),
                         cfg.num_inference_steps, mask_config.timestep_window)
        # One generator per image, so an image does not depend on the batch it was drawn in.
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        decoded: list[torch.Tensor] = []
        try:
            compiled = compile_settings() if cfg.compile else contextlib.nullcontext()
            with torch.inference_mode(), compiled, recording_decoded(pipe, decoded):
                images = pipe(
                    prompt=[p.text for p in prompts],
                    height=size[0],
                    width=size[1],
                    num_inference_steps=cfg.num_inference_steps,
                    guidance_scale=cfg.guidance_scale,
                    generator=generators,
                    output_type="pt",
                    **self.call_options,
                    **step_callback(pipe, self.store.on_step),
                ).images
                captured = self.store.captured()
                finite = finite_samples(captured)
                neglected = neglected_classes(captured.maps, mask_config.resolution_weights, ids,
                                              mask_config.neglect_ratio)
                # A neglected class is labelled as if the prompt had not named it (slot id 0).
                ids = ids.masked_fill(neglected, 0)
                fused, masks = masks_from_attention(captured, images, ids, [p.class_names for p in prompts], mask_config)
        finally:
            self.store.reset()
        counts = neglected.sum(1).cpu()
        raw = decoded[0].float().cpu() if len(decoded) == 1 and decoded[0].shape == images.shape else None
        if keep_maps:
            return GeneratedBatch(images.float().cpu(), masks.cpu(), fused.cpu(), ids, finite.cpu(), counts, raw)
        return GeneratedBatch(images.float().cpu(), masks.cpu(), finite_maps=finite.cpu(), neglected=counts, decoded=raw)


@contextlib.contextmanager
def recording_decoded(pipe: Any, into: list[torch.Tensor]):
    """Within the block, ``pipe``'s image processor appends to ``into`` each image batch it is
    given, brought to [0, 1] as it would be (denormalized) but not clamped: diffusers' ``postprocess``
    clamps, which would hide a decoder that gives values on another scale. A pipeline without a
    ``VaeImageProcessor``-like ``image_processor`` records nothing."""
    processor = getattr(pipe, "image_processor", None)
    postprocess = getattr(processor, "postprocess", None)
    config = getattr(processor, "config", None)
    if postprocess is None or config is None:
        yield
        return

    def recording(image, output_type="pil", do_denormalize=None, **options):
        if isinstance(image, torch.Tensor) and image.ndim == 4 and output_type != "latent":
            flags = do_denormalize if do_denormalize is not None else [bool(getattr(config, "do_normalize", False))] * len(image)
            scale = torch.tensor([0.5 if flag else 1.0 for flag in flags], device=image.device).view(-1, 1, 1, 1)
            into.append(image.float() * scale + (1.0 - scale))
        return postprocess(image, output_type=output_type, do_denormalize=do_denormalize, **options)

    processor.postprocess = recording
    try:
        yield
    finally:
        del processor.postprocess


_PALETTE = voc_palette()

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class RawSample:
    """A generated sample before any transform.

    image: ``[H, W, 3]`` uint8 RGB; mask: ``[H, W]`` uint8 label ids (255 ignore).
    """

    image: np.ndarray
    mask: np.ndarray
    prompt: str
    index: int
    attempt: int

    def augment_seed(self, base_seed: int, use: int = 0) -> int:
        """Seed of the ``use``-th augmentation of this sample."""
        return augment_seed(base_seed, self.index, self.attempt, use)

    def pil(self) -> tuple[PIL.Image.Image, PIL.Image.Image]:
        """The pair as ``VOCSegmentation`` yields one: a PIL RGB image and a mode-"P" mask whose
        palette is VOC's (ids are the label space's; 255 ignore)."""
        mask = PIL.Image.fromarray(self.mask)
        mask.putpalette(_PALETTE)  # an "L" image with a palette becomes "P", ids unchanged
        return PIL.Image.fromarray(self.image), mask


class SharedCount:
    """One count shared by every DataLoader worker (a spawn-context ``multiprocessing.Value``, as
    :class:`~ondemand_seg.quality.GateStats` is), so the main process reads what workers add."""

    def __init__(self, shared: bool = True) -> None:
        self._value = multiprocessing.get_context("spawn").Value("q", 0) if shared else _InProcessValue()

    def add(self, n: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self) -> int:
        return self._value.value

    def __getstate__(self) -> dict:
        shared = not isinstance(self._value, _InProcessValue)
        if shared and multiprocessing.context.get_spawning_popen() is not None:
            return {"value": self._value}  # a spawned DataLoader worker adds to the same count
        # Any other copy (copy.deepcopy, pickle) counts on its own from the count it was made with,
        # as GateStats' copies do.
        return {"shared": shared, "count": self.value}

    def __setstate__(self, state: dict) -> None:
        if "value" in state:
            self._value = state["value"]
            return
        self.__init__(shared=state["shared"])
        self._value.value = state["count"]


class _InProcessValue:
    """A count of one process with the ``value`` and ``get_lock()`` of a ``multiprocessing.Value``."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def get_lock(self):
        return self._lock


def concat_batches(parts: Sequence[GeneratedBatch]) -> GeneratedBatch:
    """One :class:`GeneratedBatch` of ``parts`` in order (a field ``None`` in any part is ``None``)."""
    if len(parts) == 1:
        return parts[0]
    fields = {}
    for field in dataclasses.fields(GeneratedBatch):
        values = [getattr(part, field.name) for part in parts]
        fields[field.name] = None if any(v is None for v in values) else torch.cat(values)
    return GeneratedBatch(**fields)


class ForkSafeRLock:
    """A re-entrant lock that each process makes anew on first use.

    A DataLoader worker forked while another thread of the parent held a plain lock would inherit
    it held, by a thread that does not exist in the child, and wait for it forever. Pickled, it
    arrives unlocked.
    """

    # Guards the re-creation; replaced in a forked child, where it may have been inherited held.
    _guard = threading.Lock()

    def __init__(self) -> None:
        self._pid, self._lock = os.getpid(), threading.RLock()

    def _current(self) -> threading.RLock:
        if self._pid != os.getpid():
            with ForkSafeRLock._guard:
                if self._pid != os.getpid():
                    self._pid, self._lock = os.getpid(), threading.RLock()
        return self._lock

    def __enter__(self) -> bool:
        return self._current().__enter__()

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _new_fork_guard() -> None:
    ForkSafeRLock._guard = threading.Lock()


os.register_at_fork(after_in_child=_new_fork_guard)


class DiffuMaskGenerator:
    """The generator: sample ``i`` (an image, its label mask and its prompt) from ``(seed, i)``.

    Every setting is resolved and checked at construction, before any model loads; the pipeline
    loads on first use in whichever process generates (a DataLoader worker, a Ray actor, ...).
    The datasets, the command line, the benchmarks and the exporters all draw through this class:
    :meth:`samples` turns sample indices into accepted (quality-gated) raw samples, the same for
    the same ``(seed, i)`` whatever the batch, process or machine; :meth:`generate` runs one
    ungated pipeline call on prompts and seeds of the caller's choosing (benchmarks, calibration).

    Args:
        model: hub id, local diffusers folder, ``"toy"``, ``"random-weights"``, or a callable.
        classes: classes to generate, each in the label space (with ``vocabulary`` given and no
            ``label_space``, a class the vocabulary lacks is added to it as free text).
        seed: base seed; sample ``i`` depends on ``(seed, i)`` only.
        device: generation device; default CUDA (round-robin over workers) when available, else CPU.
        vocabulary, label_space, image_size, mask, generator, quality: the settings, merged over
            the model's preset by :func:`~ondemand_seg.settings.resolve.resolve_config` (``None``:
            not given).
    """

    def __init__(self, model: ModelSource, classes: Sequence[str], seed: int = 0,
                 device: str | torch.device | None = None, *, vocabulary: Any = None, label_space: Any = None,
                 image_size: Any = None, mask: Any = None, generator: Any = None, quality: Any = None) -> None:
        seed = check_int("seed", seed, minimum=0)
        check_device(device)
        # resolve_config checks the model before anything else, then the classes.
        self.config: DiffuMaskConfig = resolve_config(
            model, classes, vocabulary=vocabulary, label_space=label_space, image_size=image_size, mask=mask,
            generator=generator, quality=quality)
        classes = check_classes(classes)
        if not classes:
            raise ValueError("classes is empty: name at least one class to generate")
        self.classes = classes
        self.class_ids = class_ids(self.classes, self.label_space)
        self.image_size = self.config.image_size
        self.model = model
        self.seed = int(seed)
        self.device = device
        self.gate_stats = GateStats()
        self.oom_retries = SharedCount()
        self.neglected_classes = SharedCount()
        self._generation_batch = self.config.generator.batch_size
        self._capturing: CapturingPipeline | None = None
        self._rejects: RejectCounter | None = None
        # One pipeline and one attention store serve every draw of this object: draws from several
        # threads (two loops over one dataset) take turns, or their captured maps would mix.
        self.lock = ForkSafeRLock()

    @property
    def vocabulary(self):
        return self.config.vocabulary

    @property
    def label_space(self) -> tuple[str, ...]:
        return self.config.label_space

    @property
    def mask_config(self):
        return self.config.mask

    @property
    def generator_config(self):
        return self.config.generator

    @property
    def quality_config(self):
        return self.config.quality

    def __getstate__(self) -> dict:
        # A worker loads its own pipeline; never ship weights through pickling.
        return {**self.__dict__, "_capturing": None, "_rejects": None}

    @property
    def capturing(self) -> CapturingPipeline:
        """The pipeline with capture installed, loaded on first use in this process."""
        with self.lock:
            if self._capturing is None:
                pipeline = load_pipeline(self.model, pick_device(self.device, shard()[0]),
                                         self.generator_config.scheduler)
                capturing = CapturingPipeline(pipeline, self.mask_config, self.generator_config)
                # Folders and cached hub ids were checked in resolve_config; a callable's or an
                # uncached hub id's model is known only now.
                capturing.spec.check_generator(self.generator_config)
                self._capturing = capturing
            return self._capturing

    @property
    def pipeline(self):
        """The loaded diffusers pipeline (capture processors installed on its denoiser)."""
        return self.capturing.pipeline

    @property
    def spec(self) -> ModelSpec:
        """What the loaded model is (:class:`~ondemand_seg.pipelines.families.ModelSpec`)."""
        return self.capturing.spec

    def resolved_mask_config(self) -> MaskConfig:
        """The mask settings samples are labelled with, the model's resolution weights filled in."""
        return self.capturing.mask_config_for(self.image_size)

    def prompt(self, index: int, attempt: int = 0) -> PromptSpec:
        """The prompt of sample ``index`` at retry ``attempt``."""
        rng = random.Random(sample_seed(self.seed, index, attempt, SubStream.PROMPT))
        count = self.generator_config.classes_per_prompt
        if isinstance(count, tuple):
            count = rng.randint(*count)
        count = min(count, len(self.classes))
        picks = rng.sample(range(len(self.classes)), count)
        return self.class_prompt(rng, [self.classes[i] for i in picks])

    def class_prompt(self, rng: random.Random, names: Sequence[str]) -> PromptSpec:
        """A prompt naming ``names`` in order, drawn from the vocabulary with ``rng``."""
        return self.vocabulary.sample_multi(rng, names, [self.label_space.index(n) for n in names])

    def keep_counts_in_process(self) -> None:
        """Keep this object's counts (:meth:`counts`) in this process only, from now on and from
        zero, instead of in memory DataLoader workers share. For a generator that never reaches a
        worker, such as one in a Ray actor: the shared counts' named semaphores are released at
        process exit through multiprocessing's resource tracker, which in a Ray actor no longer
        knows them then, and each printed a ``KeyError`` traceback."""
        self.gate_stats = GateStats(shared=False)
        self.oom_retries = SharedCount(shared=False)
        self.neglected_classes = SharedCount(shared=False)

    def counts(self) -> dict[str, int]:
        """Generated, accepted and rejected-by-reason counts, ``oom_retries`` (generation calls
        retried with a smaller batch) and ``neglected_classes`` (named classes of generated samples
        labelled as not drawn, ``MaskConfig.neglect_ratio``), over all workers so far."""
        return {**self.gate_stats.as_dict(), "oom_retries": self.oom_retries.value,
                "neglected_classes": self.neglected_classes.value}

    def stats(self) -> dict[str, int]:
        """Generated, accepted and rejected-by-reason counts, ``oom_retries`` and
        ``neglected_classes``, over every process drawing for this object (see :meth:`counts`)."""
        return self.counts()

    def samples(self, indices: Sequence[int]) -> list[RawSample]:
        """Accepted samples for ``indices``, in order, generated in batches of
        ``generator.batch_size`` in the order given.

        A sample the quality gate rejects is redrawn with the next attempt seed; too many
        rejects in a row raise :class:`~ondemand_seg.masks.quality.TooManyRejects`. Running out of
        memory retries with a smaller batch (see :meth:`_generate`). Nothing is kept from a draw
        that raises, so drawing the same indices again gives the same samples.

        Sample ``i`` is made from ``(seed, i)`` alone: its prompt, its noise and its mask. Its
        bytes are identical wherever it is generated in the same pipeline batch on the same kind
        of device and thread count, which is why the stream, exports and a fully cached dataset
        generate aligned blocks of the batch size; generated beside other indices, float rounding
        in batched kernels can move a few pixels by a level or so.
        """
        if isinstance(indices, (str, bytes)) or not isinstance(indices, (Sequence, range)):
            raise TypeError(f"indices must be a sequence of ints, got {indices!r} ({type(indices).__name__})")
        with self.lock:
            return self._samples(indices)

    def _samples(self, indices: Sequence[int]) -> list[RawSample]:
        if self._rejects is None:
            self._rejects = RejectCounter(self.quality_config.max_consecutive_rejects)
        pending = deque((int(i), 0) for i in indices)
        done: dict[int, RawSample] = {}
        while pending:
            keys = [pending.popleft() for _ in range(min(self.generator_config.batch_size, len(pending)))]
            prompts = [self.prompt(i, a) for i, a in keys]
            seeds = [sample_seed(self.seed, i, a, SubStream.IMAGE) for i, a in keys]
            batch = self._generate(prompts, seeds, keep_maps=False)
            reasons = gate(batch.images, batch.masks, self.quality_config, finite_maps=batch.finite_maps,
                           num_classes=len(self.label_space), decoded=batch.decoded)
            self.gate_stats.add(reasons)
            if batch.neglected is not None:
                self.neglected_classes.add(int(batch.neglected.sum()))
            self._rejects.update(reasons)
            images = batch.uint8_images()
            masks = batch.masks.to(torch.uint8).numpy()
            for j, ((index, attempt), reason) in enumerate(zip(keys, reasons)):
                if reason is None:
                    done[index] = RawSample(images[j], masks[j], prompts[j].text, index, attempt)
                else:
                    pending.append((index, attempt + 1))
        return [done[int(i)] for i in indices]

    def generate(self, prompts: Sequence[PromptSpec], seeds: Sequence[int], keep_maps: bool = False) -> GeneratedBatch:
        """One ungated generation of ``prompts`` with latent seeds ``seeds`` at the configured image
        size: image ``i`` depends on ``prompts[i]`` and ``seeds[i]`` only. ``keep_maps`` keeps the
        fused attention each mask came from (:class:`GeneratedBatch`)."""
        with self.lock:
            return self._generate(prompts, seeds, keep_maps)

    def _generate(self, prompts: Sequence[PromptSpec], seeds: Sequence[int], keep_maps: bool) -> GeneratedBatch:
        """``capturing.generate`` in calls of at most ``_generation_batch`` images.

        Out of memory, the generation batch is halved for the rest of this process and the call
        retried, down to one image, then the error names the sizes tried. Each image depends on
        its prompt and seed alone (one generator per image), so the samples are those a run that
        never ran out of memory draws.
        """
        parts: list[GeneratedBatch] = []
        tried: list[int] = []
        start = 0
        while start < len(prompts):
            size = self._generation_batch
            try:
                parts.append(self.capturing.generate(prompts[start:start + size], seeds[start:start + size],
                                                     self.image_size, keep_maps=keep_maps))
            except torch.OutOfMemoryError as error:
                tried.append(size)
                if size == 1:
                    raise torch.OutOfMemoryError(
                        f"generation ran out of memory on {self.capturing.device} at every generation batch size "
                        f"tried ({', '.join(map(str, tried))}; configured generator.batch_size="
                        f"{self.generator_config.batch_size}), down to one {self.image_size[0]}x{self.image_size[1]} "
                        "image: free memory on that device (other processes or models on it, fewer DataLoader "
                        "workers per GPU) or lower image_size"
                    ) from error
                self._generation_batch = size // 2
                self.oom_retries.add()
                logger.warning("generation ran out of memory at batch size %d on %s; retrying with %d for the "
                               "rest of this process (%s)", size, self.capturing.device, self._generation_batch, error)
                torch.cuda.empty_cache()  # hand the failed call's cached blocks back before the retry
                continue
            start += size
        return concat_batches(parts)
