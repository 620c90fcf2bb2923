"""Reading the small text files users and model folders hand the library (configs, presets,
vocabularies), with one error for each way such a file can be wrong, naming the file."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any


def check_regular_file(path: str | os.PathLike) -> Path:
    """``path`` when it is a regular file (a symlink to one counts); an error naming it otherwise.

    Opening a FIFO blocks until a writer appears and a device file may never end, so anything but a
    regular file is refused before it is opened.
    Raises:
        FileNotFoundError: nothing is there (or a dangling symlink). ValueError: a folder, FIFO,
            socket or device.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except OSError as error:
        raise ValueError(f"{path} cannot be read: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ValueError(f"{path} is {kind}; a regular file is needed here")
    return path


def open_regular_file(path: str | os.PathLike):
    """``path`` opened for binary reading when it is a regular file at the moment it is opened (a
    symlink to one counts); an error naming it otherwise.

    :func:`check_regular_file` followed by ``open`` leaves a moment in which the file can be
    replaced by a FIFO, whose ``open`` blocks until a writer appears: here the file is opened
    without blocking and what was opened is checked.
    Raises:
        FileNotFoundError: nothing is there. ValueError: a folder, FIFO, socket or device, or unreadable.
    """
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; a regular file is needed here") from None
    except OSError as error:
        raise ValueError(f"{path} cannot be read: {error.strerror or error}") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ValueError(f"{path} is {kind}; a regular file is needed here")
    if hasattr(os, "O_NONBLOCK"):  # reads of a regular file never block; the flag only guarded the open
        os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


# More files than any model folder holds (sharded weights, tokenizers, configs): walking further
# means a link leads somewhere else (a symlinked "/"), which would take as long as the disk.
MAX_FOLDER_FILES = 10_000


def folder_files(folder: str | os.PathLike) -> list[Path]:
    """Every file under ``folder``, sorted, following symlinked sub-folders as the loaders do (a
    component folder linked from a shared cache is read through its link), each real folder once.

    Raises:
        ValueError: more than :data:`MAX_FOLDER_FILES` files (a link leading out of the model).
    """
    folder = Path(folder)
    files, seen = [], set()
    for directory, subfolders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:  # a link back to a folder already walked (a loop, or a second path to it)
            subfolders.clear()
            continue
        seen.add(real)
        subfolders.sort()
        files += [Path(directory) / name for name in names]
        if len(files) > MAX_FOLDER_FILES:
            raise ValueError(f"{folder} holds more than {MAX_FOLDER_FILES:,} files (through {directory}): a model "
                             "folder holds far fewer; a symlinked folder leads outside it")
    return sorted(files)


# Larger than any config, preset, vocabulary or tokenizer file (the largest tokenizers are tens of
# MB); reading a bigger one whole would take the memory of a model.
MAX_TEXT_BYTES = 512 * 2**20


def read_text(path: str | os.PathLike) -> str:
    """A regular file's text, which must be UTF-8 (what JSON, YAML and tokenizer files are read as)
    and at most :data:`MAX_TEXT_BYTES`."""
    path = check_regular_file(path)
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise ValueError(f"{path} is {size / 2**20:.0f} MiB, larger than any text file a model or setting has "
                         f"({MAX_TEXT_BYTES // 2**20} MiB)")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        hint = " (it starts with a UTF-16 byte-order mark: save it as UTF-8)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ValueError(f"{path} is not UTF-8 text{hint}: {error}") from None


def read_json(path: str | os.PathLike) -> Any:
    """A regular UTF-8 file parsed as JSON; an error naming the file when it is not."""
    text = read_text(path)
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: it is nested too deeply") from None


def _unique_keys(pairs: list[tuple[str, Any]], path: str | os.PathLike) -> dict:
    """An object's pairs as a dict; a key given twice is an error naming it, since JSON parsers
    differ on which of the two values counts."""
    data = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"{path} is not valid JSON: the key {key!r} appears twice in one object")
        data[key] = value
    return data


def read_json_object(path: str | os.PathLike, what: str = "a JSON object") -> dict:
    """:func:`read_json` of a file that must hold an object (``what`` says of what, for the error)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold {what}, got {type(data).__name__}")
    return data


def check_output_file(path: str | os.PathLike) -> Path:
    """``path`` when a file can be written there: not a folder, and its folder exists and is
    writable or can be created. Checked before any work, so a long run does not fail at its end.

    Raises:
        ValueError: naming the path and why.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file path")
    existing = next(folder for folder in path.parents if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"{path} cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{path} cannot be written: {existing} is not writable")
    if path.exists():
        if not path.is_file():
            raise ValueError(f"{path} cannot be written: it is not a regular file")
        try:  # append mode leaves the file as it is; os.access says yes to root for read-only files
            open(path, "ab").close()
        except OSError as error:
            raise ValueError(f"{path} cannot be written: {error.strerror or error}") from None
    return path
