"""What decides a sample sequence, written down as data: saved with a stream's position, so that a
resume under other settings is refused, naming what changed, instead of silently continuing with
a different sequence; and the identity of a model's weights without reading them whole."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Settings that change speed but never a sample (GeneratorConfig documents compile, channels_last
# and the capture kernel as "same masks"; the reject limit only decides when to give up).
SPEED_ONLY = {"generator": ("compile", "channels_last", "capture_kernel"), "quality": ("max_consecutive_rejects",)}
# Bytes of a large file read for its digest: its start, middle and end.
_CHUNK = 1 << 16
_WHOLE_FILE_LIMIT = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """A sha256 of a file's size and content: whole when it is small (configs, vocabularies), else
    of its start, middle and end plus, for safetensors, its header (tensor names, shapes, offsets).

    Reading gigabytes of weights to name them would cost more than loading them; a retrained or
    edited model changes its bytes all over, so three windows tell such models apart.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as stream:
        if size <= _WHOLE_FILE_LIMIT:
            digest.update(stream.read())
            return digest.hexdigest()
        if path.suffix == ".safetensors":
            length = int.from_bytes(stream.read(8), "little")
            digest.update(stream.read(min(length, size - 8)))
        for offset in (0, size // 2, max(0, size - _CHUNK)):
            stream.seek(offset)
            digest.update(stream.read(_CHUNK))
    return digest.hexdigest()


def folder_digest(folder: str | os.PathLike) -> str:
    """A sha256 over every file of a folder (relative names and :func:`file_digest`), so the same
    model copied elsewhere keeps its digest and a changed file changes it."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for directory, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = Path(directory) / name
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
            digest.update(file_digest(path).encode())
    return digest.hexdigest()


def model_fingerprint(model: Any) -> str:
    """What a ``model`` argument loads, as a string: ``folder:<digest>`` for a local folder or a
    built-in model (wherever it lies), ``hub:<id>@<digest>`` for a hub model in the local cache,
    ``hub:<id>`` for one that is not, ``callable:<module>.<name>`` for a callable (its weights are
    known only to it) and ``random-weights``."""
    from ..pipelines.builtin import RANDOM_WEIGHTS_MODEL, resolve_model

    if callable(model):
        return f"callable:{getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', type(model).__name__)}"
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
