"""Model loading and validation: which pipeline a ``model`` argument names, checked before any
weights load, and loaded on a device in whichever process generates."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from .families import ModelSpec, cached_hub_reader, describe, family_of, folder_reader

ModelSource = Union[str, os.PathLike, Callable[[], object]]

TOY_MODEL = "toy"
TOY_MODEL_DIR = Path(__file__).parent / "models" / "toy"
TOY_MMDIT_MODEL = "toy-mmdit"
# Built-in model names and the folders shipped inside the package.
BUILTIN_MODELS = {TOY_MODEL: TOY_MODEL_DIR, TOY_MMDIT_MODEL: Path(__file__).parent / "models" / "toy-mmdit"}
_TRAINERS = {TOY_MODEL: "benchmarks/toy/train_toy_model.py", TOY_MMDIT_MODEL: "benchmarks/toy/train_toy_mmdit.py"}
RANDOM_WEIGHTS_MODEL = "random-weights"
PRESET_FILE = "ondemand_seg.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(model: ModelSource) -> ModelSource:
    """The folder behind a built-in name (``"toy"``, ``"toy-mmdit"``), else ``model`` unchanged."""
    if isinstance(model, str) and model in BUILTIN_MODELS:
        folder = BUILTIN_MODELS[model]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the embedded {model!r} model is missing from this install ({folder}); train it with "
                f"python {_TRAINERS[model]} and copy the result there"
            )
        return folder
    return model


def read_preset(model: ModelSource) -> dict:
    """Recommended settings a model folder ships in ``ondemand_seg.json`` (vocabulary, image size,
    mask, sampler and quality options, in :class:`~ondemand_seg.config.DiffuMaskConfig`'s form);
    empty when there are none."""
    if model == RANDOM_WEIGHTS_MODEL:
        from .testing import TINY_IMAGE_SIZE

        return {"image_size": TINY_IMAGE_SIZE}
    if callable(model) or not isinstance(model, (str, os.PathLike)):
        return {}
    path = Path(resolve_model(model)).expanduser() / PRESET_FILE
    if not path.is_file():
        return {}
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(preset, dict):
        raise ValueError(f"{path} must hold a JSON object of settings, got {type(preset).__name__}")
    return preset


def check_model_source(model: ModelSource) -> ModelSpec | None:
    """Validate ``model`` without loading weights and describe it when its configs are at hand.

    A local folder must be a diffusers pipeline folder (``model_index.json``) of a supported
    family; a string that looks like a path but does not exist is an error rather than a hub
    request. Returns the model's :class:`~ondemand_seg.families.ModelSpec` for folders and for hub
    ids whose configs are in the local cache; ``None`` when the model is only known once loaded
    (a callable, ``"random-weights"``, an uncached hub id).
    """
    if callable(model) or model == RANDOM_WEIGHTS_MODEL:
        return None
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a hub id, a local diffusers folder or a callable, got {type(model).__name__}")
    path = Path(resolve_model(model)).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model folder {str(path)!r} is not a diffusers pipeline folder: it has no model_index.json")
        try:
            return describe(folder_reader(path))
        except ValueError as error:
            raise ValueError(f"model folder {str(path)!r}: {error}") from None
    if path.exists():
        raise ValueError(f"model {str(path)!r} is a file; give a diffusers pipeline folder or a hub id")
    if not _HUB_ID.match(str(model)):
        raise FileNotFoundError(f"model folder {str(model)!r} does not exist (and it is not a hub id like 'org/name')")
    reader = cached_hub_reader(str(model))
    return None if reader is None else describe(reader)


def check_image_size(image_size: int | Sequence[int], spec: ModelSpec | None = None) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair of positive ints, each a multiple of the model's
    pixels per attention token when the model is known (8 otherwise: every supported VAE's factor)."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in size):
        raise ValueError(f"image_size must be an int or (height, width) of positive ints, got {image_size!r}")
    if spec is not None:
        spec.check_image_size(size)
    elif any(s % 8 for s in size):
        raise ValueError(f"image_size {image_size!r} is not a multiple of 8 on each side (the VAEs of the supported "
                         "families downsample by 8 or more; this model is known only once loaded)")
    return size


def pick_device(device: str | torch.device | None, slot: int = 0) -> torch.device:
    """The device for generation: as given, else CUDA (GPU ``slot`` modulo the visible count) or CPU."""
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", slot % torch.cuda.device_count())


def _model_index(model: ModelSource) -> dict:
    """The ``model_index.json`` of a folder or hub id."""
    from diffusers import DiffusionPipeline

    path = Path(str(model)).expanduser()
    if path.is_dir():
        return folder_reader(path)("model_index.json")
    return dict(DiffusionPipeline.load_config(str(model)))


def load_pipeline(model: ModelSource, device: torch.device, scheduler: str | None = None):
    """Load a supported text-to-image pipeline on ``device``: half precision on CUDA (the family's:
    fp16, or bf16 for Flux and Sana), fp32 elsewhere.

    Folders and hub ids load through ``DiffusionPipeline.from_pretrained`` (safetensors only), which
    picks the pipeline class the folder names. The safety checker of SD 1.x/2.x is dropped: it
    replaces flagged images with black ones, which would only become rejected samples.
    Raises:
        ValueError: the pipeline is of a family the library cannot capture from (naming its class
            and the supported ones), or ``scheduler`` names no diffusers scheduler.
    """
    from diffusers import DiffusionPipeline

    if device.type == "cuda" and torch.cuda._is_in_bad_fork():
        raise RuntimeError(
            "CUDA cannot be initialised in a forked DataLoader worker; create the DataLoader with "
            "multiprocessing_context='spawn' (or 'forkserver') when generating on the GPU"
        )
    if callable(model):
        pipeline = model()
        family = family_of(type(pipeline).__name__)
    elif model == RANDOM_WEIGHTS_MODEL:
        from .testing import build_tiny_pipeline

        pipeline = build_tiny_pipeline()
        family = family_of(type(pipeline).__name__)
    else:
        source = str(resolve_model(model))
        try:
            index = _model_index(source)
            family = family_of(index.get("_class_name") or "")
        except (OSError, ValueError) as error:
            raise ValueError(f"model {str(model)!r}: {error}") from error
        # Components saved as absent ([null, null], e.g. SD3 without its T5 encoder) are passed as
        # None: diffusers only accepts that for the few components it declares optional.
        extra = {name: None for name, entry in index.items() if isinstance(entry, list) and entry == [None, None]}
        if family.name == "sd":
            extra.update(safety_checker=None, requires_safety_checker=False)
        dtype = family.gpu_dtype if device.type == "cuda" else torch.float32
        try:
            pipeline = DiffusionPipeline.from_pretrained(source, dtype=dtype, use_safetensors=True, **extra)
        except (OSError, ValueError) as error:
            raise RuntimeError(f"could not load a {family.title} pipeline from {str(model)!r}: {error}") from error
    dtype = family.gpu_dtype if device.type == "cuda" else torch.float32
    if getattr(pipeline, "safety_checker", None) is not None:
        pipeline.safety_checker = None
    if scheduler is not None:
        import diffusers

        scheduler_class = getattr(diffusers, scheduler, None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            raise ValueError(f"unknown diffusers scheduler {scheduler!r}")
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(device)
    return pipeline if getattr(pipeline, family.denoiser).dtype == dtype else pipeline.to(dtype=dtype)
