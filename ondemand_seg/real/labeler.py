"""Pseudo-masks for real images from the same attention the generator reads.

A real image is encoded with the pipeline's VAE, noised to a point of the schedule (``strength``;
or carried there by inversion, ``LabelConfig.noise``), and denoised for a step or a few with a
prompt naming its classes while the library's capture processors record the class tokens'
attention; the library's mask math (:func:`~ondemand_seg.masks.labelling.masks_from_attention`:
fusion, background floor, self-attention and colour-affinity refinement on the real image, Otsu or
per-class γ) then labels it, and the quality gate drops empty, full or non-finite pseudo-masks.
This is how training-free diffusion segmenters (DiffSegmenter, iSeg, OVAM on real images) read a
real image; here the encoding, noising and text handling are diffusers' own image-to-image
pipelines, made with ``from_pipe`` from the generator's loaded pipeline (same weights, capture already installed).

Families: SD 1.x/2.x, SDXL, SD3/3.5 and Flux, whose image-to-image pipelines diffusers ships.
PixArt and Sana are refused: diffusers has no image-to-image pipeline for them (only the distilled
Sana Sprint has one), so they would need a hand-written denoising call per family.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import numbers
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..generation.generator import DiffuMaskGenerator
from ..generation.seeding import SubStream, sample_seed
from ..generation.tokens import class_token_weights
from ..masks.attention import CapturedAttention
from ..masks.labelling import finite_samples, masks_from_attention
from ..masks.maps import neglected_classes
from ..masks.quality import GateStats, gate
from ..pipelines.families import call_options, latent_size, text_segments
from ..pipelines.loading import check_model_source
from ..settings.label_spaces import check_class_spelling, class_ids
from ..settings.resolve import resolve_config
from ..settings.validation import check_classes, check_finite, check_int, check_size
from .images import ImageLike, to_rgb_tensor
from .inversion import inverted_start

# Families whose image-to-image pipeline diffusers ships (``AutoPipelineForImage2Image``).
LABELLING_FAMILIES = ("sd", "sdxl", "sd3", "flux")
# How the image is noised to its strength (``LabelConfig.noise``).
NOISE_MODES = ("random", "inversion")


@dataclass(frozen=True)
class LabelConfig:
    """How a real image is read.

    strength: the points of the noise schedule the image is noised to, as fractions of it (the
    image-to-image ``strength``: 0.1 on a 50-step schedule starts at its 46th step); several make
    one pass each, their attention summed into one map. recorded_steps: denoising steps recorded
    in each pass, from its start (the rest of the schedule is skipped, so a long schedule costs
    nothing). num_inference_steps: the schedule's length, which sets how finely ``strength`` is
    resolved (``strength × num_inference_steps`` must be at least 1).
    guidance_scale: ``None`` for the generator's. absent_ratio: with no tags, every candidate class
    is read from a prompt of its own, and a class whose attention peak is below this fraction of
    the image's strongest is taken as absent (:func:`~ondemand_seg.masks.maps.neglected_classes`).
    batch_size: images per pipeline call (``None``: the generator's). image_size: the size images
    are resized to for the model (``None``: the generator's); the mask is made at the image's own size.
    noise: how the image reaches its strength's timestep: ``"random"`` adds seeded random noise (the
    image-to-image pipelines' own noising); ``"inversion"`` carries it there deterministically with the
    model's own predictions over the schedule's steps below that timestep (DDIM inversion for SD
    1.x/2.x and SDXL, Euler in sigma for SD3 and Flux; :mod:`~ondemand_seg.real.inversion`), one
    denoiser call per step, so a pseudo-mask depends on no noise seed.
    Numbers may be NumPy scalars.
    """

    strength: tuple[float, ...] = (0.1,)
    recorded_steps: int = 1
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    absent_ratio: float = 0.5
    batch_size: int | None = None
    image_size: tuple[int, int] | None = None
    noise: str = "random"

    def __post_init__(self) -> None:
        # numbers.Real: NumPy's float32 is not a float, and users pass it.
        single = isinstance(self.strength, (numbers.Real, str, bytes)) or not isinstance(self.strength, Sequence)
        strength = (self.strength,) if single else tuple(self.strength)
        if not strength or any(isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 < s <= 1
                               for s in strength):
            raise ValueError(f"strength must be one or more numbers in (0, 1], got {self.strength!r}")
        object.__setattr__(self, "strength", tuple(float(s) for s in strength))
        object.__setattr__(self, "recorded_steps", check_int("recorded_steps", self.recorded_steps, minimum=1))
        steps = check_int("num_inference_steps", self.num_inference_steps, minimum=1)
        object.__setattr__(self, "num_inference_steps", steps)
        too_weak = [s for s in self.strength if int(steps * s) < 1]
        if too_weak:
            raise ValueError(f"strength {too_weak} starts no step of a {steps}-step schedule "
                             f"(num_inference_steps); use at least {1 / steps:g} or more num_inference_steps")
        if self.batch_size is not None:
            object.__setattr__(self, "batch_size", check_int("batch_size", self.batch_size, minimum=1))
        if self.guidance_scale is not None:
            guidance = check_finite("guidance_scale", self.guidance_scale)
            if guidance < 0:
                raise ValueError(f"guidance_scale must be >= 0 (or None for the generator's), got {guidance}")
            object.__setattr__(self, "guidance_scale", guidance)
        if isinstance(self.absent_ratio, bool) or not isinstance(self.absent_ratio, numbers.Real) \
                or not 0 <= self.absent_ratio < 1:
            raise ValueError(f"absent_ratio must be in [0, 1), got {self.absent_ratio!r}")
        object.__setattr__(self, "absent_ratio", float(self.absent_ratio))
        if self.image_size is not None:
            object.__setattr__(self, "image_size", check_size("image_size", self.image_size))
        if self.noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {self.noise!r}")


def check_labelling_family(family: Any) -> None:
    """Refuse a model ``family`` whose image-to-image pipeline diffusers does not ship."""
    if family.name not in LABELLING_FAMILIES:
        raise ValueError(f"labelling real images needs an image-to-image pipeline, and diffusers has none for "
                         f"{family.title}; supported: Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 and Flux")


def check_tags(names: Any, where: str, label_space: Sequence[str]) -> tuple[str, ...]:
    """One image's tags as a tuple of label-space class names, each once; an error naming ``where``
    (e.g. ``"tags[3]"``) for an empty list, a name that is not a string, or one not in ``label_space``
    (its case or spacing too: ``"Circle"`` is not ``"circle"``)."""
    try:
        names = check_classes(names)
    except TypeError as error:
        raise TypeError(f"{where}: {error}") from None
    if not names:
        raise ValueError(f"{where} is empty: name the classes the image contains, or pass tags=None to read every "
                         "candidate class")
    unknown = [n for n in names if n not in label_space[1:]]
    if unknown:
        raise ValueError(f"{where} names {unknown}, not in the label space; known classes: {', '.join(label_space[1:])}")
    return tuple(dict.fromkeys(names))


@dataclass
class PseudoLabel:
    """One image's pseudo-mask.

    mask: ``[H, W]`` uint8 label ids at the image's own size (0 background, 255 ignore), ``None``
    when the quality gate left it out; classes: the classes it was labelled with; absent: named or
    candidate classes judged absent (their attention peak too weak); reason: why the gate left it
    out, else ``None``; index: the image's id (:meth:`DiffuMaskLabeler.label`'s ``ids``; by default
    its position in the call).
    """

    mask: np.ndarray | None
    classes: tuple[str, ...]
    absent: tuple[str, ...]
    reason: str | None
    index: int


class DiffuMaskLabeler:
    """Pseudo-masks for real images, in the label space of a :class:`DiffuMaskGenerator`.

    Args:
        model: as for :class:`DiffuMaskGenerator` (``"toy"``, a folder, a hub id, a callable).
        classes: the candidate classes for images without tags (default: every class of the label
            space); each must be in the label space.
        seed: noise of image ``i`` at strength ``k`` comes from ``(seed, i, k)``.
        labelling: a :class:`LabelConfig` or a dict of its fields.
        vocabulary, label_space, image_size, mask, generator, quality, device: the generator's
            settings (the model's preset merged under them); ``mask`` is the recipe the pseudo-masks
            are made with, ``quality`` the gate.

    Use :meth:`from_generator` to share an existing generator's loaded pipeline.
    """

    def __init__(self, model: Any = "toy", classes: Sequence[str] | None = None, seed: int = 0,
                 device: str | torch.device | None = None, *, labelling: LabelConfig | dict | None = None,
                 vocabulary: Any = None, label_space: Any = None, image_size: Any = None, mask: Any = None,
                 generator: Any = None, quality: Any = None) -> None:
        settings = dict(vocabulary=vocabulary, label_space=label_space, image_size=image_size, mask=mask,
                        generator=generator, quality=quality)
        if classes is None:
            classes = resolve_config(model, (), **settings).label_space[1:]
        source = DiffuMaskGenerator(model, check_classes(classes), seed, device, **settings)
        self._setup(source, labelling)

    @classmethod
    def from_generator(cls, generator: DiffuMaskGenerator, labelling: LabelConfig | dict | None = None,
                       classes: Sequence[str] | None = None) -> "DiffuMaskLabeler":
        """A labeller reading with ``generator``'s pipeline (loaded once, shared), mask recipe, gate
        and label space; ``classes`` (default: the generator's) are the candidates for untagged images."""
        if not isinstance(generator, DiffuMaskGenerator):
            raise TypeError(f"generator must be a DiffuMaskGenerator, got {type(generator).__name__}")
        labeler = cls.__new__(cls)
        labeler._setup(generator, labelling, classes)
        return labeler

    def _setup(self, source: DiffuMaskGenerator, labelling: LabelConfig | dict | None,
               classes: Sequence[str] | None = None) -> None:
        if isinstance(labelling, dict):
            labelling = LabelConfig(**labelling)
        self.config = labelling or LabelConfig()
        if not isinstance(self.config, LabelConfig):
            raise TypeError(f"labelling must be a LabelConfig or a dict of its fields, got {type(labelling).__name__}")
        self.generator = source
        spec = check_model_source(source.model)
        if spec is not None:  # a callable's or an uncached hub model's family is known once loaded
            check_labelling_family(spec.family)
        self.candidates = check_classes(classes) if classes is not None else source.classes
        check_class_spelling(self.candidates, source.label_space)
        class_ids(self.candidates, source.label_space)
        self.seed = source.seed
        self.image_size = self.config.image_size or source.image_size
        self.gate_stats = GateStats()
        self.absent_count = 0
        self._img2img = None

    @property
    def label_space(self) -> tuple[str, ...]:
        return self.generator.label_space

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_img2img": None}

    @property
    def img2img(self):
        """The generator's loaded pipeline as diffusers' image-to-image pipeline of its family
        (``from_pipe``: the same modules, the capture processors already installed)."""
        if self._img2img is None:
            from diffusers import AutoPipelineForImage2Image

            capturing = self.generator.capturing
            family = capturing.family
            check_labelling_family(family)
            capturing.spec.check_image_size(self.image_size)
            pipeline = AutoPipelineForImage2Image.from_pipe(capturing.pipeline)
            pipeline.set_progress_bar_config(disable=True)
            options = call_options(pipeline, family)
            self._call_options = options
            self._text = text_segments(pipeline, family, options)
            self._takes_size = "height" in inspect.signature(type(pipeline).__call__).parameters
            self._img2img = pipeline
        return self._img2img

    def counts(self) -> dict[str, int]:
        """Labelled, accepted and left-out-by-reason counts of the gate (:class:`GateStats` fields),
        and ``absent_classes``: named or candidate classes judged absent, over this process's calls."""
        return {**self.gate_stats.as_dict(), "absent_classes": self.absent_count}

    def __call__(self, image: ImageLike, tags: Sequence[str] | None = None) -> PseudoLabel:
        """:meth:`label` of one image."""
        return self.label([image], None if tags is None else [tags])[0]

    def label(self, images: Sequence[ImageLike], tags: Sequence[Sequence[str]] | None = None,
              ids: Sequence[int] | None = None) -> list[PseudoLabel]:
        """Pseudo-masks of ``images``, one :class:`PseudoLabel` each, in order.

        Args:
            images: PIL images, NumPy arrays or tensors of any size and common mode
                (:func:`~ondemand_seg.real.images.to_rgb_tensor` says how each is read). Each is
                resized to the labeller's ``image_size`` for the model; its mask is made at its
                own size, the refinements reading the image at that size.
            tags: per image, the classes it contains (label-space names); ``None`` reads every
                candidate class and keeps those whose attention is strong enough
                (``LabelConfig.absent_ratio``).
            ids: per image, the id its noise is drawn from (``(seed, id, strength k)``) and errors
                name it by (``images[id]``, ``tags[id]``); default its position in the call. A
                dataset passes each image's own index, so that its pseudo-mask does not depend on
                which images it was labelled with.
        """
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise TypeError(f"images must be a sequence of images, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError("images is empty: give at least one image to label")
        if ids is None:
            ids = list(range(len(images)))
        elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or len(ids) != len(images):
            raise ValueError(f"ids must be one int per image ({len(images)}), got {ids!r}")
        ids = [check_int(f"ids[{j}]", i, minimum=0) for j, i in enumerate(ids)]
        names = None if tags is None else self._check_tags(tags, ids)
        tensors = [to_rgb_tensor(image, f"images[{i}]") for i, image in zip(ids, images)]
        results: list[PseudoLabel] = []
        batch_size = self.config.batch_size or self.generator.generator_config.batch_size
        start = 0
        with self.generator.lock:
            while start < len(tensors):
                # One call takes images of one size, so their masks can be made at that size.
                end = start + 1
                while end < len(tensors) and end - start < batch_size and tensors[end].shape == tensors[start].shape:
                    end += 1
                results += self._label_batch(ids[start:end], torch.stack(tensors[start:end]),
                                             None if names is None else names[start:end])
                start = end
        return results

    def _check_tags(self, tags: Sequence[Sequence[str]], ids: list[int]) -> list[tuple[str, ...]]:
        if isinstance(tags, (str, bytes)) or not isinstance(tags, Sequence) or len(tags) != len(ids):
            raise ValueError(f"tags must be one list of class names per image ({len(ids)}), got {tags!r}")
        return [check_tags(names, f"tags[{i}]", self.label_space) for i, names in zip(ids, tags)]

    def _label_batch(self, indices: list[int], images: torch.Tensor, tags: list[tuple[str, ...]] | None) -> list[PseudoLabel]:
        """Pseudo-labels of one batch of ``[B, 3, H, W]`` images of one size, in [0, 1]."""
        generator = self.generator
        mask_config = generator.capturing.mask_config_for(self.image_size)
        if tuple(images.shape[-2:]) == tuple(self.image_size):
            model_input = images
        else:
            model_input = F.interpolate(images, size=self.image_size, mode="bilinear", antialias=True,
                                        align_corners=False).clamp(0, 1)
        if tags is not None:
            prompts = [generator.class_prompt(random.Random(0), names) for names in tags]
            captured, ids = self._capture(prompts, model_input, indices)
            ratio = mask_config.neglect_ratio
            slot_names = [list(names) for names in tags]
        else:
            # One prompt per candidate: a prompt naming every class may not fit the text encoder
            # (the toy model's CLIP takes 16 tokens), and a class the image lacks would still take
            # a share of a shared softmax.
            parts = [self._capture([generator.class_prompt(random.Random(0), [c])] * len(indices), model_input, indices)
                     for c in self.candidates]
            captured = dataclasses.replace(
                parts[0][0],
                maps={f: torch.cat([p[0].maps[f] for p in parts], 1) for f in parts[0][0].maps},
                self_attention=None if parts[0][0].self_attention is None
                else torch.stack([p[0].self_attention for p in parts]).mean(0))
            ids = torch.cat([p[1] for p in parts], 1)
            ratio = self.config.absent_ratio
            slot_names = [list(self.candidates)] * len(indices)
        absent = neglected_classes(captured.maps, mask_config.resolution_weights, ids, ratio)
        labelled_ids = ids.masked_fill(absent, 0)
        finite = finite_samples(captured)
        _, masks = masks_from_attention(captured, images.to(self._device), labelled_ids.to(self._device),
                                        slot_names, mask_config)
        masks = masks.cpu()
        reasons = gate(images, masks, generator.quality_config, finite_maps=finite.cpu(),
                       num_classes=len(self.label_space))
        self.gate_stats.add(reasons)
        self.absent_count += int(absent.sum())
        results = []
        for j, (index, reason) in enumerate(zip(indices, reasons)):
            kept = tuple(n for n, a in zip(slot_names[j], absent[j].tolist()) if not a)
            gone = tuple(n for n, a in zip(slot_names[j], absent[j].tolist()) if a)
            mask = masks[j].to(torch.uint8).numpy() if reason is None else None
            results.append(PseudoLabel(mask, kept, gone, reason, index))
        return results

    @property
    def _device(self) -> torch.device:
        return self.generator.capturing.device

    def _capture(self, prompts, images: torch.Tensor, indices: list[int]) -> tuple[CapturedAttention, torch.Tensor]:
        """Attention of ``prompts`` over ``[B, 3, h, w]`` images at the model's size, summed over the
        first ``recorded_steps`` steps of one image-to-image pass per strength; and ``[B, K]`` ids."""
        pipeline = self.img2img
        capturing = self.generator.capturing
        store = capturing.store
        config = self.config
        steps = config.num_inference_steps
        guidance = capturing.generator_config.guidance_scale if config.guidance_scale is None else config.guidance_scale
        weights, ids = class_token_weights(self._text, prompts)
        store.begin(weights.to(self._device), latent_size(capturing.spec, self.image_size), config.recorded_steps)
        size = {"height": self.image_size[0], "width": self.image_size[1]} if self._takes_size else {}

        def on_step_end(pipe, step, timestep, callback_kwargs):
            store.on_step(step)
            if step + 1 >= config.recorded_steps:
                # diffusers' documented way to stop a pipeline early: the remaining steps are skipped.
                pipe._interrupt = True
            return callback_kwargs

        inverting = config.noise == "inversion"
        noising = (inverted_start(pipeline, getattr(pipeline, capturing.family.denoiser), capturing.family.name, store)
                   if inverting else contextlib.nullcontext())
        try:
            with torch.inference_mode(), noising:
                for k, strength in enumerate(config.strength):
                    # Each pass records its own first steps into the same running sums.
                    store.step = 0
                    # Inverted, the seed only draws the VAE's latent sample; one seed for every image
                    # makes an image's mask independent of its position in the call.
                    generators = [torch.Generator(self._device).manual_seed(
                        sample_seed(self.seed, 0 if inverting else i, k, SubStream.IMAGE)) for i in indices]
                    pipeline(prompt=[p.text for p in prompts], image=images, strength=strength,
                             num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                             output_type="latent", callback_on_step_end=on_step_end, **size, **self._call_options)
                captured = store.captured()
        finally:
            store.reset()
        return captured, ids
