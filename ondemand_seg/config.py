"""Configuration as plain dataclasses, with DiffuMask's defaults, that round-trip to JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MaskConfig:
    """How captured cross-attention becomes a label mask.

    ``resolution_weights`` is keyed by the latent downsampling factor of an attention map
    (1 = the latent grid itself, 2 = half of it, ...). For SD at 512 px (64×64 latents) the paper's
    64/32/16 maps are factors 1/2/4, averaged with equal weight in the authors' code.

    Beyond the paper's fixed γ: ``threshold_mode="otsu"`` picks γ per image and class from the
    fused map itself; ``class_thresholds`` holds per-class γ (e.g. from
    :func:`~ondemand_seg.masks.calibrate_threshold` on a few labelled images); ``refine="affinity"``
    spreads the map along the image's colour affinities; ``self_attention_factor`` propagates it
    through the UNet's self-attention at that latent factor, ``self_attention_power`` times.
    """

    resolution_weights: dict[int, float] = field(default_factory=lambda: {1: 1.0, 2: 1.0, 4: 1.0})
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

    def __post_init__(self) -> None:
        self.resolution_weights = {int(k): float(v) for k, v in self.resolution_weights.items()}
        self.timestep_window = tuple(self.timestep_window)
        if not self.resolution_weights or any(w < 0 for w in self.resolution_weights.values()):
            raise ValueError(f"resolution_weights must be non-empty and >= 0, got {self.resolution_weights}")
        if sum(self.resolution_weights.values()) <= 0:
            raise ValueError(f"resolution_weights sum to zero: {self.resolution_weights}")
        bad = [k for k in self.resolution_weights if k < 1 or k & (k - 1)]
        if bad:
            raise ValueError(f"resolution_weights keys are latent downsampling factors (1, 2, 4, ...), got {bad}")
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


@dataclass
class SamplerConfig:
    """How images are generated. Defaults follow DiffuMask's generation script (SD v1.x)."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    templates: tuple[str, ...] = ("a photograph of a {}",)
    classes_per_prompt: int = 1
    batch_size: int = 4
    scheduler: str | None = None

    def __post_init__(self) -> None:
        self.templates = tuple(self.templates)
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not self.templates:
            raise ValueError("templates is empty: give at least one prompt template such as 'a photo of a {}'")
        for template in self.templates:
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} must contain exactly one '{{}}' for the class name")
        if self.classes_per_prompt < 1:
            raise ValueError(f"classes_per_prompt must be >= 1, got {self.classes_per_prompt}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
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
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s): {unknown}")
    return cls(**data)
