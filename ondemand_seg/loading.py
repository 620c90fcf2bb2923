"""Model loading and validation: which pipeline a ``model`` argument names, checked before any
weights load (its folder's files included), and loaded on a device in whichever process generates."""
from __future__ import annotations

import difflib
import numbers
import os
import re
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from .families import ModelSpec, cached_hub_reader, describe, family_of, folder_reader
from .files import read_json_object
from .model_folder import check_model_folder, component_classes, passed_as_none

ModelSource = Union[str, os.PathLike, Callable[[], object]]

TOY_MODEL = "toy"
TOY_MODEL_DIR = Path(__file__).parent / "models" / "toy"
TOY_MMDIT_MODEL = "toy-mmdit"
# The toy architecture with self-attention at its finest grid, trained without the localisation
# loss: attention that was never taught where objects are, as in real Stable Diffusion.
TOY_UNAIDED_MODEL = "toy-unaided"
# Built-in model names and the folders shipped inside the package.
BUILTIN_MODELS = {TOY_MODEL: TOY_MODEL_DIR, TOY_MMDIT_MODEL: Path(__file__).parent / "models" / "toy-mmdit",
                  TOY_UNAIDED_MODEL: Path(__file__).parent / "models" / "toy-unaided"}
_TRAINERS = {TOY_MODEL: "benchmarks/toy/train_toy_model.py", TOY_MMDIT_MODEL: "benchmarks/toy/train_toy_mmdit.py",
             TOY_UNAIDED_MODEL: "benchmarks/toy/train_toy_model.py --attn-weight 0 --self-attn-16"}
RANDOM_WEIGHTS_MODEL = "random-weights"
PRESET_FILE = "ondemand_seg.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(model: ModelSource) -> ModelSource:
    """The folder behind a built-in name (``"toy"``, ``"toy-mmdit"``, ``"toy-unaided"``), else ``model`` unchanged."""
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
    if not path.exists() and not path.is_symlink():
        return {}
    return read_json_object(path, "a JSON object of settings")


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
        raise TypeError(f"model must be a hub id, a local diffusers folder or a callable, got {model!r} "
                        f"({type(model).__name__})")
    if not str(model).strip():
        raise ValueError(f"model is an empty name ({model!r}); give a hub id, a local diffusers folder or a callable")
    path = Path(resolve_model(model)).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ValueError(f"model folder {str(path)!r} is not a diffusers pipeline folder: it has no model_index.json")
        try:
            check_model_folder(path)
            return describe(folder_reader(path))
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"model folder {str(path)!r}: {error}") from None
    if path.exists():
        raise ValueError(f"model {str(path)!r} is a file; give a diffusers pipeline folder or a hub id")
    if not _HUB_ID.match(str(model)):
        raise FileNotFoundError(f"model folder {str(model)!r} does not exist (and it is not a hub id like 'org/name')")
    reader = cached_hub_reader(str(model))
    if reader is None and _hub_offline():
        raise FileNotFoundError(f"model {str(model)!r} is neither a local folder nor in the Hugging Face cache, and "
                                "HF_HUB_OFFLINE is set, so it cannot be downloaded")
    if reader is None:
        return None
    component_classes(reader("model_index.json"), f"model {str(model)!r}: model_index.json")
    return describe(reader)


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def scheduler_names() -> list[str]:
    """The scheduler classes ``diffusers`` exports (those of the installed version)."""
    import diffusers

    return sorted(name for name in dir(diffusers) if name.endswith("Scheduler") and not name.startswith("Flax"))


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class called ``name``; an error naming it (and close names) otherwise."""
    import diffusers
    from diffusers import SchedulerMixin

    if not isinstance(name, str):
        raise TypeError(f"scheduler must be a diffusers scheduler class name (str) or None, got {name!r} "
                        f"({type(name).__name__})")
    cls = getattr(diffusers, name, None) if name in scheduler_names() else None
    if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
        return cls
    if cls is not None:
        backends = ", ".join(getattr(cls, "_backends", ())) or "an optional package"
        raise ValueError(f"diffusers scheduler {name!r} needs {backends}, which is not installed")
    close = difflib.get_close_matches(name, scheduler_names(), n=3)
    hint = (f"did you mean {' or '.join(map(repr, close))}?" if close
            else f"diffusers has {', '.join(scheduler_names())}")
    raise ValueError(f"unknown diffusers scheduler {name!r}; {hint}")


def check_image_size(image_size: int | Sequence[int], spec: ModelSpec | None = None) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair of positive ints, each a multiple of
    :attr:`~ondemand_seg.families.ModelSpec.size_multiple` when the model is known (what its
    pipeline and its attention tokens need), of 8 otherwise (every supported VAE's factor)."""
    if isinstance(image_size, numbers.Integral):
        size = (image_size, image_size)
    elif isinstance(image_size, Sequence) and not isinstance(image_size, str):
        size = tuple(image_size)
    else:
        size = ()
    if len(size) != 2 or any(not isinstance(s, numbers.Integral) or isinstance(s, bool) or s <= 0 for s in size):
        raise ValueError(f"image_size must be an int or (height, width) of positive ints, got {image_size!r}")
    size = tuple(int(s) for s in size)  # numpy ints too, as plain ints for JSON and PIL
    if spec is not None:
        spec.check_image_size(size)
    elif any(s % 8 for s in size):
        raise ValueError(f"image_size {image_size!r} is not a multiple of 8 on each side (the VAEs of the supported "
                         "families downsample by 8 or more; this model is known only once loaded)")
    return size


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` when it names one this machine has (``None`` stays ``None``:
    the default, CUDA when available); an error naming it otherwise.

    Raises:
        TypeError: not a str or ``torch.device``. ValueError: an unknown device name, CUDA (or
            another accelerator) that is not available, or a device index beyond the count.
    """
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str like 'cpu' or 'cuda:1', a torch.device or None, got {device!r} "
                        f"({type(device).__name__})")
    name = str(device)
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {name!r} is not a torch device name ({error})") from None
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None)
    if parsed.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    elif backend is not None and hasattr(backend, "is_available") and hasattr(backend, "device_count"):
        available = backend.is_available()
        count = backend.device_count() if available else 0
    else:
        raise ValueError(f"device {name!r}: ondemand_seg generates on cpu, cuda, mps or xpu devices")
    if not available:
        raise ValueError(f"device {name!r} is not available on this machine (torch.{parsed.type}.is_available() is "
                         "False); give device='cpu' or leave it None")
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"device {name!r}: this machine has {count} {parsed.type} device(s)")
    return parsed


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
        family = family_of(type(pipeline))
    elif model == RANDOM_WEIGHTS_MODEL:
        from .testing import build_tiny_pipeline

        pipeline = build_tiny_pipeline()
        family = family_of(type(pipeline))
    else:
        source = str(resolve_model(model))
        try:
            index = _model_index(source)
            # Checked again here, in the process that loads: a hub model's index was not at hand before.
            family = family_of(component_classes(index, f"{source}/model_index.json")[0])
        except (OSError, ValueError) as error:
            raise ValueError(f"model {str(model)!r}: {error}") from error
        # diffusers only accepts None for the few components it declares optional.
        extra = passed_as_none(index, family)
        dtype = family.gpu_dtype if device.type == "cuda" else torch.float32
        try:
            pipeline = DiffusionPipeline.from_pretrained(source, dtype=dtype, use_safetensors=True,
                                                         trust_remote_code=False, **extra)
        except (OSError, ValueError) as error:
            raise RuntimeError(f"could not load a {family.title} pipeline from {str(model)!r}: {error}") from error
    dtype = family.gpu_dtype if device.type == "cuda" else torch.float32
    if getattr(pipeline, "safety_checker", None) is not None:
        pipeline.safety_checker = None
    if scheduler is not None:
        pipeline.scheduler = scheduler_class(scheduler).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(device)
    return pipeline if getattr(pipeline, family.denoiser).dtype == dtype else pipeline.to(dtype=dtype)
