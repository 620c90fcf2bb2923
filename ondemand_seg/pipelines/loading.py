"""Model loading and validation: which pipeline a ``model`` argument names, checked before any
weights load (its folder's files included), and loaded on a device in whichever process generates."""
from __future__ import annotations

import difflib
import os
import re
import threading
from pathlib import Path

import torch

from ..settings.files import folder_files
from .builtin import RANDOM_WEIGHTS_MODEL, ModelSource, resolve_model
from .families import ModelSpec, cached_hub_reader, describe, family_of, folder_reader
from .folder import check_model_folder, component_classes, passed_as_none

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# diffusers and transformers build a model's modules under process-wide patches before its weights
# arrive (accelerate's init_empty_weights swaps nn.Module.register_parameter): two threads loading
# at once (two streams, or a stream and its copy) undo each other's, and every module built after
# stays on the meta device ("Cannot copy out of meta tensor"). Re-entrant: a callable model may load
# another through load_pipeline. Made anew in a forked child, where another thread may have held it.
_LOADING = threading.RLock()


def _new_loading_lock() -> None:
    global _LOADING
    _LOADING = threading.RLock()


os.register_at_fork(after_in_child=_new_loading_lock)


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
        state = _folder_state(path)
        if state is not None and state in _CHECKED_FOLDERS:
            return _CHECKED_FOLDERS[state]
        try:
            check_model_folder(path)
            spec = describe(folder_reader(path))
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"model folder {str(path)!r}: {error}") from None
        if state is not None:
            if len(_CHECKED_FOLDERS) >= 32:
                _CHECKED_FOLDERS.pop(next(iter(_CHECKED_FOLDERS)))
            _CHECKED_FOLDERS[state] = spec
        return spec
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


# Folders already checked in this process, by their files' names, sizes and modification times:
# every dataset built on one folder would otherwise build its networks on the meta device again.
_CHECKED_FOLDERS: dict[tuple, ModelSpec] = {}


def _folder_state(folder: Path) -> tuple | None:
    """What a folder's check depends on, as a key: every file's relative name, size and
    modification time (``None`` when a file cannot be stat'ed: the check itself will say why)."""
    entries = []
    try:
        for file in folder_files(folder):
            stat = os.stat(file)
            entries.append((os.path.relpath(file, folder), stat.st_size, stat.st_mtime_ns, stat.st_mode))
    except (OSError, ValueError):
        return None
    return (str(folder.resolve()), tuple(sorted(entries)))


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
    with _LOADING:  # one load at a time in a process (see _LOADING)
        if callable(model):
            pipeline = model()
            family = family_of(type(pipeline))
        elif model == RANDOM_WEIGHTS_MODEL:
            from .tiny import build_tiny_pipeline

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
