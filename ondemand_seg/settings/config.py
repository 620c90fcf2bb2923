"""Configuration sections: dataclasses with DiffuMask's defaults that round-trip to JSON, each
checking its fields at construction. :func:`~ondemand_seg.settings.resolve.resolve_config` merges
them with a model's preset and a caller's settings."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..pipelines.loading import scheduler_class
from .validation import check_bool, check_count_range, check_finite, check_int
from .vocabulary import Vocabulary


def _latent_factor(key: Any) -> int:
    """A ``resolution_weights`` key: an int, or its decimal string (as JSON keys are)."""
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    return check_int(f"resolution_weights key {key!r}", key)


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


# The choices of MaskConfig's label-free repairs (the mask math in ondemand_seg.masks.maps reads them here).
MASK_AGGREGATIONS = ("mean", "agreement", "entropy")
MASK_RESCALINGS = ("none", "tokens", "classes")
SELF_ATTENTION_MODES = ("add", "replace")
SELF_ATTENTION_STOPS = ("fixed", "separation")
# Past this the sharpened rows are one-hot in float32 for any attention a model gives.
MAX_SHARPNESS = 64.0


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

    ``background_floor="median"`` subtracts each fused map's median before refinement and
    thresholding, clipping at 0: a token's attention that was never taught to localise keeps a
    floor over the whole image (softmax mass has to go somewhere), most of all when the prompt names
    several classes, and min-max normalisation leaves that floor inside the object's range; an
    object covering less than half the image leaves the median on the floor. ``"none"`` (the
    default, the paper's) keeps the map as fused.

    ``neglect_ratio`` (prompts naming several classes): a class whose attention peak is below this
    share of the strongest named class's peak in the same image is taken as not drawn (the
    "catastrophic neglect" of Attend-and-Excite, Chefer et al. 2023, found by the same per-token
    maximum) and labelled as if the prompt had not named it; 0 (the default, the paper's) keeps
    every class. With one class per prompt it never applies.

    Label-free repairs for attention that was never taught to localise (GoCA, Meng et al., CVPR
    2026; iSeg, Sun et al. 2024), all off by default. ``aggregation``: how the layers and heads of
    one resolution are combined: ``"mean"`` (the paper's uniform mean), ``"agreement"`` (each
    layer-head map weighted by its correlation with the weighted consensus, disagreeing ones 0) or
    ``"entropy"`` (peaked maps weighted up); the capture then keeps one running sum per layer-head
    (:func:`~ondemand_seg.masks.maps.head_weights`). ``token_rescaling``: per-pixel rescaling of a
    class's attention against the prompt's other tokens, each token's map first divided by its own
    mean: ``"tokens"`` (the class's share among all text tokens) or ``"classes"`` (objectness
    times the class's share among the prompt's classes), applied per layer, head and step as
    recorded (:func:`~ondemand_seg.masks.maps.rescale_token_mass`). ``self_attention_sharpness``
    (>= 1) reduces the self-attention's entropy before propagating (rows raised to this power);
    ``self_attention_mode``: ``"add"`` adds the change the propagation makes to the fused map,
    ``"replace"`` takes the propagated map; ``self_attention_stop``: ``"fixed"`` takes
    ``self_attention_power`` steps, ``"separation"`` stops each map (after at least one step, at
    most ``self_attention_power``) once its Otsu separation stops rising
    (:func:`~ondemand_seg.masks.maps.propagate_self_attention`). These four act only with
    self_attention_factor set (a preset may set them ahead of its factor); the command-line flags
    for them without a factor are a usage error.
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
    neglect_ratio: float = 0.0
    background_floor: str = "none"
    aggregation: str = "mean"
    token_rescaling: str = "none"
    self_attention_sharpness: float = 1.0
    self_attention_mode: str = "add"
    self_attention_stop: str = "fixed"

    def __post_init__(self) -> None:
        if self.resolution_weights is not None:
            if not isinstance(self.resolution_weights, Mapping):
                raise TypeError(f"resolution_weights must be a dict of latent factor: weight or None, got "
                                f"{self.resolution_weights!r}")
            self.resolution_weights = {_latent_factor(k): check_finite(f"resolution_weights[{k!r}]", v)
                                       for k, v in self.resolution_weights.items()}
            if not self.resolution_weights or any(w < 0 for w in self.resolution_weights.values()):
                raise ValueError(f"resolution_weights must be non-empty and >= 0, got {self.resolution_weights}")
            if sum(self.resolution_weights.values()) <= 0:
                raise ValueError(f"resolution_weights sum to zero: {self.resolution_weights}")
            bad = [k for k in self.resolution_weights if k < 1 or k & (k - 1)]
            if bad:
                raise ValueError(f"resolution_weights keys are latent downsampling factors (1, 2, 4, ...), got {bad}")
        if isinstance(self.timestep_window, (str, bytes)) or not isinstance(self.timestep_window, Sequence) \
                or len(self.timestep_window) != 2:
            raise TypeError(f"timestep_window must be (start, end), got {self.timestep_window!r}")
        self.timestep_window = tuple(check_finite("timestep_window", t) for t in self.timestep_window)
        self.threshold = check_finite("threshold", self.threshold)
        if not isinstance(self.class_thresholds, Mapping) or not all(isinstance(k, str) for k in self.class_thresholds):
            raise TypeError(f"class_thresholds must be a dict of class name: threshold, got {self.class_thresholds!r}")
        self.class_thresholds = {k: check_finite(f"class_thresholds[{k!r}]", v)
                                 for k, v in self.class_thresholds.items()}
        self.ignore_band = check_finite("ignore_band", self.ignore_band)
        self.refine_iterations = check_int("refine_iterations", self.refine_iterations)
        if self.self_attention_factor is not None:
            self.self_attention_factor = check_int("self_attention_factor", self.self_attention_factor)
        self.self_attention_power = check_int("self_attention_power", self.self_attention_power)
        if self.map_source not in ("attention", "output"):
            raise ValueError(f"map_source must be 'attention' or 'output', got {self.map_source!r}")
        if self.joint_softmax not in ("all", "text"):
            raise ValueError(f"joint_softmax must be 'all' or 'text', got {self.joint_softmax!r}")
        start, end = self.timestep_window
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"timestep_window must satisfy 0 <= start < end <= 1, got {self.timestep_window}")
        if self.background_floor not in ("none", "median"):
            raise ValueError(f"background_floor must be 'none' or 'median', got {self.background_floor!r}")
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
        self.neglect_ratio = check_finite("neglect_ratio", self.neglect_ratio)
        if not 0.0 <= self.neglect_ratio < 1.0:
            raise ValueError(f"neglect_ratio must be in [0, 1), got {self.neglect_ratio}")
        choices = {"aggregation": MASK_AGGREGATIONS, "token_rescaling": MASK_RESCALINGS,
                   "self_attention_mode": SELF_ATTENTION_MODES, "self_attention_stop": SELF_ATTENTION_STOPS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self.self_attention_sharpness = check_finite("self_attention_sharpness", self.self_attention_sharpness)
        if not 1.0 <= self.self_attention_sharpness <= MAX_SHARPNESS:
            raise ValueError(f"self_attention_sharpness must be in [1, {MAX_SHARPNESS:g}], got "
                             f"{self.self_attention_sharpness}")


# GeneratorConfig(compile=True) marks the capture's step counters dynamic by a source-name pattern
# (generation.DYNAMIC_STORE_INTS), which torch reads as a regular expression from 2.8.
COMPILE_MIN_TORCH = "2.8"
# The kernels of ``capture.class_mass`` (named here so that configs load without diffusers).
CAPTURE_KERNELS = ("auto", "sdpa", "explicit")


@config_dataclass
class GeneratorConfig:
    """How images are generated.

    ``num_inference_steps`` and ``guidance_scale`` default (``None``) to what the model's own
    pipeline recommends (SD 1.x/2.x: 50 and 7.5, DiffuMask's settings; SDXL: 50 and 5; SD3: 28 and
    7; Flux dev: 28 and 3.5; Flux schnell: 4 and 0; PixArt, Sana: 20 and 4.5); ``scheduler``
    ``None`` keeps the model's scheduler, else names a scheduler class diffusers exports. A
    ``guidance_scale`` at or below 1 is refused for a model whose pipeline would then skip
    classifier-free guidance (all but Flux, whose guidance is a model input).

    ``classes_per_prompt``: how many of the classes one prompt names, e.g. 2: "a photo of a circle
    and a ring", one mask per named class; a pair ``(min, max)`` draws the count per prompt,
    uniformly in ``[min, max]`` (scenes with a varying number of objects, like real photos).

    Prompt wording (templates, names, synonyms) is the vocabulary's job, not the generator's:
    see :class:`~ondemand_seg.vocabulary.Vocabulary`.

    Speed, same masks: ``compile`` runs the denoiser, capture included, through ``torch.compile``
    (inductor; the first batches of each batch size pay the compilation); ``channels_last`` stores
    its convolution weights channels-last (UNet families; a transformer's only convolution is its
    patch embedding). See :class:`~ondemand_seg.generation.generator.CapturingPipeline`.
    ``capture_kernel``: how the class tokens' attention mass is computed (``"auto"``: a fused SDPA
    kernel on CUDA, the explicit softmax elsewhere; ``"sdpa"``, ``"explicit"``: that one, to
    compare them), see :func:`~ondemand_seg.generation.capture.class_mass`.
    """

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    classes_per_prompt: int | tuple[int, int] = 1
    batch_size: int = 4
    scheduler: str | None = None
    compile: bool = False
    channels_last: bool = False
    capture_kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.num_inference_steps is not None:
            self.num_inference_steps = check_int("num_inference_steps", self.num_inference_steps, minimum=1)
        if self.guidance_scale is not None:
            # Whether a scale <= 1 is meaningful depends on the model (ModelSpec.check_generator).
            self.guidance_scale = check_finite("guidance_scale", self.guidance_scale)
            if self.guidance_scale < 0:
                raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        self.classes_per_prompt = check_count_range("classes_per_prompt", self.classes_per_prompt)
        self.batch_size = check_int("batch_size", self.batch_size, minimum=1)
        if self.scheduler is not None:
            scheduler_class(self.scheduler)
        self.compile = check_bool("compile", self.compile)
        if self.compile and torch.__version__ < COMPILE_MIN_TORCH:
            raise ValueError(f"compile=True needs torch >= {COMPILE_MIN_TORCH} (regular expressions in "
                             f"torch.compiler.config.dynamic_sources), this is torch {torch.__version__}")
        self.channels_last = check_bool("channels_last", self.channels_last)
        if self.capture_kernel not in CAPTURE_KERNELS:
            raise ValueError(f"capture_kernel must be one of {CAPTURE_KERNELS}, got {self.capture_kernel!r}")


@config_dataclass
class QualityConfig:
    """The gate every sample passes before it may reach training.

    ``black_level``: an image whose brightest value (in [0, 1]) is at most this is "all black"; in
    [0, 1), since at 1 every image would be. ``constant_level``: an image each of whose channels'
    values (in [0, 1]) has a standard deviation at most this is "constant": one colour, drawn by
    a broken decoder even where the attention maps (and so the mask) show objects; in [0, 0.5].
    ``range_margin`` and ``max_out_of_range``: an image more than ``max_out_of_range`` of whose
    decoded values (before clamping to [0, 1]) lie more than ``range_margin`` outside [0, 1] is
    "out of range": a decoder giving [0, 255] or [-1, 1] values, which clamped would look white or
    half black. A VAE's ordinary overshoot (a few percent of values a little outside [0, 1]) stays
    inside the margin; ``max_out_of_range`` in [0, 1] (1: not checked), ``range_margin`` >= 0.
    """

    min_foreground: float = 0.005
    max_foreground: float = 0.98
    black_level: float = 0.02
    constant_level: float = 0.01
    range_margin: float = 0.25
    max_out_of_range: float = 0.05
    max_consecutive_rejects: int = 50

    def __post_init__(self) -> None:
        self.min_foreground = check_finite("min_foreground", self.min_foreground)
        self.max_foreground = check_finite("max_foreground", self.max_foreground)
        self.black_level = check_finite("black_level", self.black_level)
        # Images are in [0, 1]: at 1 every image counts as black, below 0 none does.
        if not 0.0 <= self.black_level < 1.0:
            raise ValueError(f"black_level must be in [0, 1), got {self.black_level}")
        # The standard deviation of values in [0, 1] is at most 0.5.
        self.constant_level = check_finite("constant_level", self.constant_level)
        if not 0.0 <= self.constant_level <= 0.5:
            raise ValueError(f"constant_level must be in [0, 0.5], got {self.constant_level}")
        self.range_margin = check_finite("range_margin", self.range_margin)
        if self.range_margin < 0.0:
            raise ValueError(f"range_margin must be >= 0, got {self.range_margin}")
        self.max_out_of_range = check_finite("max_out_of_range", self.max_out_of_range)
        if not 0.0 <= self.max_out_of_range <= 1.0:
            raise ValueError(f"max_out_of_range must be in [0, 1], got {self.max_out_of_range}")
        self.max_consecutive_rejects = check_int("max_consecutive_rejects", self.max_consecutive_rejects)
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


SECTIONS: dict[str, type] = {"mask": MaskConfig, "generator": GeneratorConfig, "quality": QualityConfig}


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
    image_size: ``(height, width)``; mask, generator, quality: the three config sections.
    :meth:`to_dict` is the preset file's form: saved, it can be passed back as arguments
    (``DiffuMaskStream(model, classes, **config.to_dict())``) or shipped as ``ondemand_seg.json``.
    """

    vocabulary: Vocabulary
    label_space: tuple[str, ...]
    image_size: tuple[int, int]
    mask: MaskConfig
    generator: GeneratorConfig
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
