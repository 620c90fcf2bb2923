"""Model loading and validation: which pipeline a ``model`` argument names, checked before any
weights load, and loaded on a device in whichever process generates."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

ModelSource = Union[str, os.PathLike, Callable[[], object]]

TOY_MODEL = "toy"
TOY_MODEL_DIR = Path(__file__).parent / "models" / "toy"
RANDOM_WEIGHTS_MODEL = "random-weights"
PRESET_FILE = "ondemand_seg.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(model: ModelSource) -> ModelSource:
    """The folder behind a built-in name (``"toy"``), else ``model`` unchanged."""
    if isinstance(model, str) and model == TOY_MODEL:
        if not (TOY_MODEL_DIR / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the embedded toy model is missing from this install ({TOY_MODEL_DIR}); train it with "
                "python benchmarks/toy/train_toy_model.py and copy the result there"
            )
        return TOY_MODEL_DIR
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


def check_model_source(model: ModelSource) -> int:
    """Validate ``model`` without loading weights; return the VAE's downsampling factor.

    A local folder must be a diffusers pipeline folder (``model_index.json``); a string that
    looks like a path but does not exist is an error rather than a hub request.
    """
    if callable(model) or model == RANDOM_WEIGHTS_MODEL:
        return 8
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a hub id, a local diffusers folder or a callable, got {type(model).__name__}")
    path = Path(resolve_model(model)).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model folder {str(path)!r} is not a diffusers pipeline folder: it has no model_index.json")
        vae_config = path / "vae" / "config.json"
        if vae_config.is_file():
            return 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)
        return 8
    if path.exists():
        raise ValueError(f"model {str(path)!r} is a file; give a diffusers pipeline folder or a hub id")
    if not _HUB_ID.match(str(model)):
        raise FileNotFoundError(f"model folder {str(model)!r} does not exist (and it is not a hub id like 'org/name')")
    return 8


def check_image_size(image_size: int | Sequence[int], multiple: int = 8) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair, each a positive multiple of the VAE factor."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in size):
        raise ValueError(f"image_size must be an int or (height, width) of positive ints, got {image_size!r}")
    if any(s % multiple for s in size):
        raise ValueError(
            f"image_size {image_size!r} is not a multiple of {multiple} on each side (this model's VAE downsamples by {multiple})"
        )
    return size


def pick_device(device: str | torch.device | None, slot: int = 0) -> torch.device:
    """The device for generation: as given, else CUDA (GPU ``slot`` modulo the visible count) or CPU."""
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", slot % torch.cuda.device_count())


def load_pipeline(model: ModelSource, device: torch.device, scheduler: str | None = None):
    """Load a Stable Diffusion pipeline on ``device``: fp16 on CUDA, fp32 elsewhere.

    The safety checker is dropped: it replaces flagged images with black ones, which would only
    become rejected samples.
    """
    from diffusers import StableDiffusionPipeline

    if device.type == "cuda" and torch.cuda._is_in_bad_fork():
        raise RuntimeError(
            "CUDA cannot be initialised in a forked DataLoader worker; create the DataLoader with "
            "multiprocessing_context='spawn' (or 'forkserver') when generating on the GPU"
        )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if callable(model):
        pipeline = model()
    elif model == RANDOM_WEIGHTS_MODEL:
        from .testing import build_tiny_pipeline

        pipeline = build_tiny_pipeline()
    else:
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(
                str(resolve_model(model)), dtype=dtype, safety_checker=None, requires_safety_checker=False, use_safetensors=True
            )
        except (OSError, ValueError) as error:
            raise RuntimeError(f"could not load a Stable Diffusion pipeline from {str(model)!r}: {error}") from error
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
    return pipeline if pipeline.unet.dtype == dtype else pipeline.to(dtype=dtype)
