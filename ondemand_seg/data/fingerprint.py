"""What decides a sample sequence, written down as data: saved with a stream's position, so that a
resume under other settings is refused, naming what changed, instead of silently continuing with
a different sequence; and the identity of a model's weights without reading them whole."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import types
from pathlib import Path
from typing import Any, Sequence

from ..settings.files import folder_files, open_regular_file

# Settings that change speed but never a sample (GeneratorConfig documents compile, channels_last
# and the capture kernel as "same masks"; the reject limit only decides when to give up).
SPEED_ONLY = {"generator": ("compile", "channels_last", "capture_kernel"), "quality": ("max_consecutive_rejects",)}
# Files up to this size are hashed whole; a larger one by its safetensors header and this many
# evenly spaced windows of _CHUNK bytes (16 MiB read per file).
_WHOLE_FILE_LIMIT = 256 * 2**20
_WINDOWS = 256
_CHUNK = 1 << 16
# The reference safetensors reader refuses headers above 100 MB: a larger length is not a header.
_MAX_HEADER = 100_000_000


def files_digest(files: "Sequence[str | os.PathLike]") -> str:
    """A sha256 of ``files``' names (their bytes as the file system holds them: a name need not be
    UTF-8) and contents (:func:`file_digest`), in the order given.

    Raises:
        TypeError: ``files`` is one path rather than a sequence of them.
    """
    if isinstance(files, (str, bytes, os.PathLike)):
        raise TypeError(f"files must be a sequence of paths, got one path {files!r}; pass [{files!r}]")
    digest = hashlib.sha256()
    for path in map(Path, files):
        digest.update(os.fsencode(path.name) + f"\0{file_digest(path)}\0".encode())
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """A sha256 of a file's size and content: whole up to 256 MiB (configs, vocabularies, small
    models), else of its safetensors header (tensor names, shapes, offsets) and 256 evenly spaced
    64 KiB windows.

    Reading gigabytes of weights to name them would cost as much as loading them; a retrained or
    fine-tuned model changes its bytes all over, and an edit of more than 1/256 of a large file
    changes a window. A smaller in-place edit of a file over 256 MiB can go unnoticed.
    """
    path = Path(path)
    with open_regular_file(path) as stream:  # never blocks on a FIFO put in the file's place
        size = os.fstat(stream.fileno()).st_size
        digest = hashlib.sha256(str(size).encode())
        if size <= _WHOLE_FILE_LIMIT:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest()
        if path.suffix == ".safetensors":
            length = int.from_bytes(stream.read(8), "little")
            if length <= min(size - 8, _MAX_HEADER):  # a corrupt length would read the whole file at once
                digest.update(stream.read(length))
        for k in range(_WINDOWS):
            stream.seek((size - _CHUNK) * k // (_WINDOWS - 1))
            digest.update(stream.read(_CHUNK))
    return digest.hexdigest()


def folder_digest(folder: str | os.PathLike) -> str:
    """A sha256 over every file of a folder (relative names and :func:`file_digest`), so the same
    model copied elsewhere keeps its digest and a changed file changes it, in a symlinked sub-folder
    too (a component linked from a shared cache)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in folder_files(folder):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


def model_fingerprint(model: Any) -> str:
    """What a ``model`` argument loads, as a string: ``folder:<digest>`` for a local folder or a
    built-in model (wherever it lies), ``hub:<id>@<digest>`` for a hub model in the local cache,
    ``hub:<id>`` for one that is not, ``random-weights``, and ``callable:<module>.<name>`` for a
    callable, with the arguments of a ``functools.partial``: a callable's weights are known only
    to it, so two callables of one name that build different models look alike."""
    from ..pipelines.builtin import RANDOM_WEIGHTS_MODEL, resolve_model

    if callable(model):
        return f"callable:{_callable_name(model)}"
    if model == RANDOM_WEIGHTS_MODEL:
        return RANDOM_WEIGHTS_MODEL
    path = Path(resolve_model(model)).expanduser()
    if path.is_dir():
        return f"folder:{folder_digest(path)}"
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(str(model), "model_index.json")
    except ImportError:
        index = None
    if isinstance(index, str):
        return f"hub:{model}@{folder_digest(Path(index).parent)}"
    return f"hub:{model}"


def _callable_name(model: Any) -> str:
    if isinstance(model, functools.partial):
        arguments = ", ".join([*map(repr, model.args), *(f"{k}={v!r}" for k, v in model.keywords.items())])
        return f"{_callable_name(model.func)}({arguments})"
    return f"{getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', type(model).__qualname__)}"


def transform_identity(transform: Any) -> str:
    """What a stream's joint transform does, as a string: a function by its name (as a callable
    model), torchvision's ``StandardTransform`` by its two transforms, the library's augmentations
    by their albumentations pipeline and config, anything else by its ``repr`` (torchvision's list
    their parameters), memory addresses left out. Two functions of one name look alike."""
    if transform is None:
        return "None"
    if isinstance(transform, (functools.partial, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return _callable_name(transform)
    name = f"{type(transform).__module__}.{type(transform).__qualname__}"
    if type(transform).__name__ == "StandardTransform":
        return (f"{name}({transform_identity(getattr(transform, 'transform', None))}, "
                f"{transform_identity(getattr(transform, 'target_transform', None))})")
    parts = [repr(getattr(transform, a)) for a in ("compose", "config") if hasattr(transform, a)] or [repr(transform)]
    return " ".join(re.sub(r" at 0x[0-9a-fA-F]+", "", f"{name}: {'; '.join(parts)}").split())


def sequence_fingerprint(model: Any, config: Any, **settings: Any) -> dict:
    """Everything that decides which sample comes where, in plain data (saved in state dicts).

    ``config``: the resolved :class:`~ondemand_seg.config.DiffuMaskConfig` (speed-only fields left
    out, the vocabulary as a digest of its words); ``settings``: the caller's own (seed, classes,
    reuse, cache size, ...), as JSON-ready values.
    """
    resolved = config.to_dict()
    for section, names in SPEED_ONLY.items():
        for name in names:
            resolved[section].pop(name, None)
    vocabulary = json.dumps(resolved.pop("vocabulary"), sort_keys=True).encode()
    return {**settings, "model": model_fingerprint(model), "vocabulary": hashlib.sha256(vocabulary).hexdigest(),
            **resolved}


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """``"field: saved -> current"`` for each field (``section.field`` inside a section) that differs."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{key}.{change}" for change in fingerprint_differences(old, new)]
        elif old != new:
            changes.append(f"{key}: {_short(old)} -> {_short(new)}")
    return changes


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
