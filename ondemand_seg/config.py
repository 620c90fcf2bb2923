"""Configuration: dataclasses with DiffuMask's defaults that round-trip to JSON, and the one
place where a model's preset and a caller's explicit settings are merged.

Like diffusers' ``from_pretrained(..., **kwargs)`` over a saved config, :func:`resolve_config`
starts from the defaults, applies what the model has and its pipeline recommends, the model
folder's ``ondemand_seg.json`` preset, then the caller's arguments, field by field:
``mask={"threshold": 0.3}`` or ``mask=MaskConfig(threshold=0.3)`` changes γ and keeps every other
field the preset sets. The library's datasets, the command line
and the trainer all go through it, and the result prints and saves as JSON in the preset's form.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .label_spaces import class_ids, validate_label_space
from .loading import check_image_size, check_model_source, read_preset
from .vocabulary import Vocabulary, default_vocabulary, load_vocabulary, vocabulary_from


def config_dataclass(cls: type) -> type:
    """``@dataclass`` that also records which fields the constructor was given.

    A config built as ``MaskConfig(threshold=0.3)`` then overrides only γ when merged over a
    preset (:func:`merge_section`), instead of resetting the preset's other fields to defaults.
    ``dataclasses.replace`` passes every field, so its result counts as fully given.
    """
    cls = dataclass(cls)
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        object.__setattr__(self, "_given", frozenset(names[: len(args)]) | frozenset(kwargs))

    cls.__init__ = __init__
    return cls


@config_dataclass
class MaskConfig:
    """How captured text attention becomes a label mask.

    ``resolution_weights`` is keyed by the latent downsampling factor of an attention map
    (1 = the latent grid itself, 2 = half of it, ...). For SD at 512 px (64×64 latents) the paper's
    64/32/16 maps are factors 1/2/4, averaged with equal weight in the authors' code. ``None`` (the
    default) means the model's own: every grid its text attention runs at with at least 16 cells
    on a side (SD 1.x/2.x at 512 px: 1, 2, 4; SDXL: 2, 4; SD3, Flux, PixArt: 2; Sana: 1), or its
    finest grid when none is that fine.

    ``map_source``: ``"attention"`` reads the softmax mass on the class tokens; ``"output"``
    (joint-attention families: SD3, Flux) reads ConceptAttention's output-space map, the image
    tokens' attention outputs against the class tokens' own. ``joint_softmax``: for joint
    attention, the mass under the model's softmax over all keys (``"all"``) or renormalised over
    the text keys (``"text"``).

    Beyond the paper's fixed γ: ``threshold_mode="otsu"`` picks γ per image and class from the
    fused map itself; ``class_thresholds`` holds per-class γ (e.g. from
    :func:`~ondemand_seg.masks.calibrate_threshold` on a few labelled images); ``refine="affinity"``
    spreads the map along the image's colour affinities; ``self_attention_factor`` propagates it
    through the model's self-attention at that latent factor, ``self_attention_power`` times.
    """

    resolution_weights: dict[int, float] | None = None
    timestep_window: tuple[float, float] = (0.0, 1.0)
    normalization: str = "minmax"
    threshold: float = 0.4
    class_thresholds: dict[str, float] = field(default_factory=dict)
    ignore_band: float = 0.05
    threshold_mode: str = "fixed"
    refine: str = "none"
    refine_iterations: int = 10
    self_attention_factor: int | None = None
    self_attention_power: int = 1
    map_source: str = "attention"
    joint_softmax: str = "all"

    def __post_init__(self) -> None:
        if self.resolution_weights is not None:
            self.resolution_weights = {int(k): float(v) for k, v in self.resolution_weights.items()}
            if not self.resolution_weights or any(w < 0 for w in self.resolution_weights.values()):
                raise ValueError(f"resolution_weights must be non-empty and >= 0, got {self.resolution_weights}")
            if sum(self.resolution_weights.values()) <= 0:
                raise ValueError(f"resolution_weights sum to zero: {self.resolution_weights}")
            bad = [k for k in self.resolution_weights if k < 1 or k & (k - 1)]
            if bad:
                raise ValueError(f"resolution_weights keys are latent downsampling factors (1, 2, 4, ...), got {bad}")
        self.timestep_window = tuple(self.timestep_window)
        if self.map_source not in ("attention", "output"):
            raise ValueError(f"map_source must be 'attention' or 'output', got {self.map_source!r}")
        if self.joint_softmax not in ("all", "text"):
            raise ValueError(f"joint_softmax must be 'all' or 'text', got {self.joint_softmax!r}")
        start, end = self.timestep_window
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"timestep_window must satisfy 0 <= start < end <= 1, got {self.timestep_window}")
        if self.normalization not in ("max", "minmax"):
            raise ValueError(f"normalization must be 'max' or 'minmax', got {self.normalization!r}")
        for name, value in {"threshold": self.threshold, **self.class_thresholds}.items():
            if not 0.0 < value < 1.0:
                raise ValueError(f"threshold for {name!r} must be in (0, 1), got {value}")
        if not 0.0 <= self.ignore_band < 0.5:
            raise ValueError(f"ignore_band must be in [0, 0.5), got {self.ignore_band}")
        if self.threshold_mode not in ("fixed", "otsu"):
            raise ValueError(f"threshold_mode must be 'fixed' or 'otsu', got {self.threshold_mode!r}")
        if self.threshold_mode == "otsu" and self.class_thresholds:
            # Otsu picks γ per image; calibrated per-class γ would be silently unused.
            raise ValueError(f"class_thresholds {self.class_thresholds} need threshold_mode 'fixed', got 'otsu'")
        if self.refine not in ("none", "affinity"):
            raise ValueError(f"refine must be 'none' or 'affinity', got {self.refine!r}")
        if self.refine_iterations < 1:
            raise ValueError(f"refine_iterations must be >= 1, got {self.refine_iterations}")
        factor = self.self_attention_factor
        if factor is not None and (factor < 1 or factor & (factor - 1)):
            raise ValueError(f"self_attention_factor must be None or a latent factor (1, 2, 4, ...), got {factor}")
        if self.self_attention_power < 1:
            raise ValueError(f"self_attention_power must be >= 1, got {self.self_attention_power}")


@config_dataclass
class SamplerConfig:
    """How images are generated.

    ``num_inference_steps`` and ``guidance_scale`` default (``None``) to what the model's own
    pipeline recommends (SD 1.x/2.x: 50 and 7.5, DiffuMask's settings; SDXL: 50 and 5; SD3: 28 and
    7; Flux dev: 28 and 3.5; Flux schnell: 4 and 0; PixArt, Sana: 20 and 4.5); ``scheduler``
    ``None`` keeps the model's scheduler.

    Prompt wording (templates, names, synonyms) is the vocabulary's job, not the sampler's:
    see :class:`~ondemand_seg.vocabulary.Vocabulary`.
    """

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    classes_per_prompt: int = 1
    batch_size: int = 4
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.classes_per_prompt < 1:
            raise ValueError(f"classes_per_prompt must be >= 1, got {self.classes_per_prompt}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@config_dataclass
class QualityConfig:
    """The gate every sample passes before it may reach training."""

    min_foreground: float = 0.005
    max_foreground: float = 0.98
    black_level: float = 0.02
    max_consecutive_rejects: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_foreground < self.max_foreground <= 1.0:
            raise ValueError(
                f"need 0 <= min_foreground < max_foreground <= 1, got {self.min_foreground}, {self.max_foreground}"
            )
        if self.max_consecutive_rejects < 1:
            raise ValueError(f"max_consecutive_rejects must be >= 1, got {self.max_consecutive_rejects}")


def to_dict(config: Any) -> dict:
    """A JSON-ready dict of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config dataclass from :func:`to_dict` output, rejecting unknown keys by name."""
    return merge_section(cls, data)


SECTIONS: dict[str, type] = {"mask": MaskConfig, "sampler": SamplerConfig, "quality": QualityConfig}
_TOP_LEVEL = ("vocabulary", "label_space", "image_size", *SECTIONS)
# The image side for a model known only once loaded (a callable, an uncached hub id): every
# supported family can generate at it.
DEFAULT_IMAGE_SIZE = 512


def given_fields(config: Any) -> dict:
    """The fields a config instance was constructed with (all of them after ``dataclasses.replace``)."""
    given = getattr(config, "_given", None)
    names = [f.name for f in dataclasses.fields(config)] if given is None else sorted(given)
    return {name: getattr(config, name) for name in names}


def merge_section(cls: type, *layers: Any) -> Any:
    """A ``cls`` config from layers merged field by field, later layers winning.

    Each layer is ``None``, a mapping of fields (as in a preset file) or a ``cls`` instance, of
    which only the fields given to its constructor count. Unknown fields are named in the error.
    """
    merged: dict = {}
    for layer in layers:
        if layer is None:
            continue
        if isinstance(layer, cls):
            merged.update(given_fields(layer))
        elif isinstance(layer, Mapping):
            unknown = sorted(set(layer) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"unknown {cls.__name__} option(s): {unknown}")
            merged.update(layer)
        else:
            raise TypeError(f"{cls.__name__} settings must be a {cls.__name__} or a dict of its fields, got {layer!r}")
    return cls(**merged)


@dataclass
class DiffuMaskConfig:
    """Every generation setting of a dataset, resolved: what :func:`resolve_config` returns.

    vocabulary: the words prompts are drawn from (its classes include any free-text class asked for);
    label_space: class names whose position is the id in masks (0 background);
    image_size: ``(height, width)``; mask, sampler, quality: the three config sections.
    :meth:`to_dict` is the preset file's form: saved, it can be passed back as arguments
    (``DiffuMaskStream(model, classes, **config.to_dict())``) or shipped as ``ondemand_seg.json``.
    """

    vocabulary: Vocabulary
    label_space: tuple[str, ...]
    image_size: tuple[int, int]
    mask: MaskConfig
    sampler: SamplerConfig
    quality: QualityConfig

    def to_dict(self) -> dict:
        return {"vocabulary": self.vocabulary.to_dict(), "label_space": list(self.label_space),
                "image_size": list(self.image_size), **{name: to_dict(getattr(self, name)) for name in SECTIONS}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON (creating folders)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path


def resolve_config(model: Any, classes: Sequence[str] = (), **overrides: Any) -> DiffuMaskConfig:
    """Defaults, then what ``model`` itself has and recommends, then its preset, then ``overrides``,
    merged field by field.

    The model layer (:meth:`~ondemand_seg.families.ModelSpec.defaults`: its pipeline's steps and
    guidance, its image size, the attention grids it has) is read from the folder's configs without
    loading weights; for a model known only once loaded (a callable, an uncached hub id) the
    fields left ``None`` are filled in the generating process, by the same rules.

    Args:
        model: what :func:`~ondemand_seg.loading.read_preset` reads a preset from (a folder, a
            built-in name, a hub id or a callable: the last two have none).
        classes: classes to generate, each in the label space; when ``vocabulary`` is given, any
            class it lacks is added to it as free text (zero-shot).
        overrides: ``vocabulary`` (a built-in name, a .json/.yaml path, a :class:`Vocabulary`, a
            full mapping in the file form, or a mapping without ``classes`` whose fields replace
            those of the preset's vocabulary), ``label_space`` (class names; default the
            vocabulary's), ``image_size`` (int or ``(H, W)``), and ``mask`` / ``sampler`` /
            ``quality`` (config instances or dicts of fields). ``None`` means "not given".
    Raises:
        ValueError: an unknown option, field or class, a bad value, an image size or attention
            resolution the model cannot take, an unsupported pipeline class, naming it. FileNotFoundError: a model folder that does not exist.
    """
    unknown = sorted(set(overrides) - set(_TOP_LEVEL))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; the settings are {', '.join(_TOP_LEVEL)}")
    preset = read_preset(model)
    unknown = sorted(set(preset) - set(_TOP_LEVEL))
    if unknown:
        raise ValueError(f"the model preset names unknown option(s) {unknown}; the settings are {', '.join(_TOP_LEVEL)}")

    given_vocabulary = overrides.get("vocabulary")
    labels = overrides.get("label_space")
    patch = isinstance(given_vocabulary, Mapping) and "classes" not in given_vocabulary
    if labels is None and (given_vocabulary is None or patch):
        labels = preset.get("label_space")
    if labels is not None:
        labels = validate_label_space(labels)
    vocabulary = None
    for layer in (preset.get("vocabulary"), given_vocabulary):
        if layer is None:
            continue
        if isinstance(layer, Vocabulary):
            vocabulary = layer
        elif isinstance(layer, Mapping) and "classes" not in layer:
            base = vocabulary or default_vocabulary(labels)
            vocabulary = vocabulary_from({**base.to_dict(), **layer})
        elif isinstance(layer, Mapping):
            vocabulary = vocabulary_from(layer)
        else:
            vocabulary = load_vocabulary(layer)
    vocabulary = vocabulary or default_vocabulary(labels)
    if given_vocabulary is not None:
        # Free-text classes only when a vocabulary is asked for: otherwise a misspelt class would
        # silently become a new zero-shot class instead of an error.
        vocabulary = vocabulary.with_classes([c for c in classes if c != "background"])
    label_space = validate_label_space(labels if labels is not None else vocabulary.label_space)
    if classes:
        class_ids(classes, label_space)
    spec = check_model_source(model)
    size = overrides.get("image_size")
    if size is None:
        size = preset.get("image_size", spec.default_size if spec is not None else DEFAULT_IMAGE_SIZE)
    size = check_image_size(size, spec)
    model_layer = spec.defaults(size) if spec is not None else {}
    sections = {name: merge_section(cls, model_layer.get(name), preset.get(name), overrides.get(name))
                for name, cls in SECTIONS.items()}
    if spec is not None:
        spec.check_mask(sections["mask"])
    unknown = sorted(set(sections["mask"].class_thresholds) - set(label_space))
    if unknown:
        raise ValueError(f"class_thresholds names classes outside the label space: {unknown}")
    return DiffuMaskConfig(vocabulary, label_space, size, **sections)
