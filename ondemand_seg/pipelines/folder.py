"""Checks of a diffusers pipeline folder before any weights load: every component is a diffusers
or transformers class named as data (nothing the folder names is imported), every file a loader
will open is a regular file in the form its reader expects, and every config value has the type
its class declares. A broken folder is an error at construction naming the file and the field,
not a hang or a deep error in a DataLoader worker at the first draw."""
from __future__ import annotations

import collections.abc
import difflib
import importlib
import inspect
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..settings.files import check_regular_file, folder_files, read_text
from .families import Family, family_of, folder_reader

# The libraries a folder may name components from. Each is imported by its own name and its
# classes looked up as attributes (both load only their own submodules); a folder naming any
# other module is refused, because importing a module runs its code. diffusers' own loader
# resolves these two the same way (``_get_library_or_raise``).
COMPONENT_LIBRARIES = ("diffusers", "transformers")
_CLASS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# safetensors dtypes and their sizes in bits (the format's own table; sub-byte floats are packed).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}
# The reference reader refuses headers above 100 MB.
SAFETENSORS_MAX_HEADER = 100_000_000


def library_class(library: Any, class_name: Any, where: str) -> type:
    """The class ``class_name`` of ``library`` (diffusers or transformers), looked up without
    importing anything the name points to; an error naming ``where`` (the entry) otherwise."""
    if library not in COMPONENT_LIBRARIES:
        raise ValueError(f"{where} comes from {library!r}; only {' and '.join(COMPONENT_LIBRARIES)} classes are "
                         "loaded (a folder's own modules are never imported: importing runs their code)")
    if not isinstance(class_name, str) or not _CLASS_NAME.match(class_name):
        raise ValueError(f"{where}: {class_name!r} is not a class name")
    module = importlib.import_module(library)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or cls.__module__.split(".")[0] != library:
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(class_name, names, n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{where}: {library} {module.__version__} has no class {class_name!r}{hint}")
    return cls


def pipeline_class(index: dict, where: str) -> type:
    """The diffusers pipeline class ``model_index.json`` names in ``_class_name``.

    A class name only: the ``[module, class]`` form asks diffusers to run a custom pipeline's code
    from the folder, which the library never does.
    """
    name = index.get("_class_name")
    if not name:
        raise ValueError(f"{where} names no pipeline class (_class_name)")
    if not isinstance(name, str):
        raise ValueError(f"{where}: _class_name must be a diffusers pipeline class name, got {name!r} (a custom "
                         "pipeline's code in the folder is never run)")
    from diffusers import DiffusionPipeline

    cls = library_class("diffusers", name, f"{where}: _class_name")
    if not issubclass(cls, DiffusionPipeline):
        raise ValueError(f"{where}: _class_name {name!r} is not a diffusers pipeline")
    return cls


def passed_as_none(index: dict, family: Family) -> dict:
    """Components the loader passes as ``None``: those saved as absent (``[null, null]``, e.g. SD3
    without its T5 encoder) and SD's safety checker, which only blacks out images."""
    extra = {name: None for name, entry in index.items() if isinstance(entry, list) and entry == [None, None]}
    if family.name == "sd":
        extra.update(safety_checker=None, requires_safety_checker=False)
    return extra


def component_classes(index: dict, where: str) -> tuple[type, dict[str, type]]:
    """The pipeline class and each component's class that ``model_index.json`` names, read as data.

    Every component the pipeline class requires must be named as ``[library, class]`` with a
    diffusers or transformers class (or saved as absent, ``[null, null]``, where the loader passes
    ``None``). Subclasses of a supported pipeline are recognised by their bases.
    Raises:
        ValueError: naming the entry at fault.
    """
    cls = pipeline_class(index, where)
    family = family_of(cls)
    skipped = passed_as_none(index, family)
    parameters = inspect.signature(cls.__init__).parameters
    optional = set(getattr(cls, "_optional_components", ()))
    required = [name for name, p in parameters.items()
                if name != "self" and p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    missing = [name for name in required if name not in index and name not in skipped and name not in optional]
    if missing:
        raise ValueError(f"{where} names no {', '.join(missing)}: a {cls.__name__} needs them")
    absent = [name for name in required if name in skipped and name not in optional and name not in family.may_be_absent
              and index.get(name) == [None, None]]
    if absent:
        # Loaded as None, the pipeline would fail at the first draw (the denoiser's dtype of None).
        raise ValueError(f"{where} saves {', '.join(absent)} as absent ([null, null]), and a {cls.__name__} cannot "
                         f"run without {'it' if len(absent) == 1 else 'them'}")
    classes = {}
    for name, entry in index.items():
        if name.startswith("_") or name in skipped or (not isinstance(entry, list) and name not in required):
            continue
        if not _CLASS_NAME.match(name):
            # A component's name is the folder it loads from: "..", "/usr" would read outside the model.
            raise ValueError(f"{where}: component name {name!r} is not a plain folder name")
        if not isinstance(entry, list) or len(entry) != 2 or not all(isinstance(part, str) for part in entry):
            raise ValueError(f"{where}: component {name!r} must be [library, class name], got {entry!r}")
        what = f"{where}: component {name!r} ({entry[0]}.{entry[1]})"
        classes[name] = library_class(*entry, what)
        component_kind(classes[name], what)
    return cls, classes


def component_kind(cls: type, where: str = "") -> str:
    """``"network"``, ``"scheduler"``, ``"tokenizer"`` or ``"processor"`` (image processors); an
    error naming ``where`` for any other class (an ``Auto*`` class, a pipeline), which
    ``from_pretrained`` would resolve from the folder's own files instead of a fixed class."""
    from diffusers import ModelMixin, SchedulerMixin
    from transformers import (
        FeatureExtractionMixin,
        ImageProcessingMixin,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        ProcessorMixin,
    )

    if issubclass(cls, (ModelMixin, PreTrainedModel)):
        return "network"
    if issubclass(cls, SchedulerMixin):
        return "scheduler"
    if issubclass(cls, PreTrainedTokenizerBase):
        return "tokenizer"
    if issubclass(cls, (ImageProcessingMixin, FeatureExtractionMixin, ProcessorMixin)):
        return "processor"
    raise ValueError(f"{where}: {cls.__name__} is not a model, scheduler, tokenizer or image processor class")


def check_model_folder(path: str | os.PathLike) -> None:
    """Check a pipeline folder's files as ``from_pretrained`` will need them, without loading weights.

    Every file in the folder is a regular file. ``model_index.json`` names the pipeline and its
    components as diffusers/transformers classes of a known kind (:func:`component_classes`);
    each component's folder exists and holds no code; its config files parse and their values
    have the types its class declares. A network has ``config.json`` from which it builds (on the
    meta device: shapes only, no memory) and ``.safetensors`` weights whose headers agree with
    their bytes and give every parameter it has, with its shape and kind of dtype (and every shard
    its index names); a scheduler builds from its ``scheduler_config.json``; a tokenizer loads, and
    its vocabulary and prompt length fit its text encoder's.
    Raises:
        ValueError: naming the file (and the field or entry) at fault.
    """
    root = Path(path)
    check_regular_files(root)
    read = folder_reader(root)
    index_file = root / "model_index.json"
    index = read("model_index.json")
    if index is None:
        raise ValueError(f"{index_file} is missing")
    pipeline, classes = component_classes(index, str(index_file))
    family = family_of(pipeline)
    tokenizers, encoders = {}, {}
    for name, cls in classes.items():
        folder = root / name
        if not folder.is_dir():
            raise ValueError(f"{folder} is missing (model_index.json names a {cls.__name__} there)")
        code = sorted(folder.glob("*.py"))
        if code:
            raise ValueError(f"{code[0]} is code in a component folder, which diffusers would treat as the component's "
                             "own (trust_remote_code); a model folder for this library holds none")
        configs = {file.name: read(f"{name}/{file.name}") for file in sorted(folder.glob("*config.json"))}
        kind = component_kind(cls)
        if kind == "scheduler":
            if "scheduler_config.json" not in configs:
                raise ValueError(f"{folder / 'scheduler_config.json'} is missing (a {cls.__name__} needs it)")
            file = folder / "scheduler_config.json"
            family.check_scheduler(cls.__name__, f"{index_file}: component {name!r}")
            check_config_types(cls, configs["scheduler_config.json"], file)
            _built(lambda: cls.from_config(configs["scheduler_config.json"]), file, cls)
        elif kind == "network":
            if "config.json" not in configs:
                raise ValueError(f"{folder / 'config.json'} is missing (a {cls.__name__} needs it)")
            check_config_types(cls, configs["config.json"], folder / "config.json")
            scaling = configs["config.json"].get("scaling_factor")
            if isinstance(scaling, (int, float)) and not scaling > 0:
                # The pipeline divides latents by it before decoding: 0 gives inf, then NaN images.
                raise ValueError(f"{folder / 'config.json'}: scaling_factor must be > 0, got {scaling!r}")
            # Read once: the tensor count bounds the build, then the headers are checked against it.
            headers = {file.name: check_safetensors(file) for file in sorted(folder.glob("*.safetensors"))}
            stored = sum(map(len, headers.values())) if headers else None
            model = _built(lambda: meta_model(cls, configs["config.json"], stored), folder / "config.json", cls)
            check_weights(folder, cls, read, model, headers)
            encoders[name] = model.config
        elif kind == "tokenizer":
            for file in sorted(folder.iterdir()):
                if file.suffix in (".json", ".txt"):
                    read_text(file)
            tokenizers[name] = _built(lambda: cls.from_pretrained(str(folder)), folder, cls)
    check_tokenizers_fit(tokenizers, encoders, root)


def _built(build, where: Path, cls: type):
    """``build()``, or an error naming ``where`` and what the library raised (a config the class
    cannot be built from fails here, not in a worker at the first draw)."""
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - every library error becomes one naming the file
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{where}: a {cls.__name__} cannot be built from it ({type(error).__name__}: "
                         f"{detail[:300]})") from None


def meta_model(cls: type, config: dict, stored: int | None = None) -> torch.nn.Module:
    """``cls`` built from ``config`` on the meta device: every parameter's name, shape and dtype,
    and no memory for them.

    ``stored``: how many tensors the weights hold. Building stops, with an error, once it has made
    far more torch calls than a model of that many tensors needs: a config asking for millions of
    layers (``layers_per_block: 10000000``) would otherwise take hours to build, shapes only.
    """
    budget = _TorchCallBudget(None if stored is None else _CALLS_PER_TENSOR * stored + _CALLS_SLACK)
    with torch.device("meta"), budget:
        if cls.__module__.startswith("transformers"):
            return cls._from_config(cls.config_class.from_dict(dict(config)))
        return cls.from_config(config)


# Building a layer makes a handful of torch calls per parameter (allocation, initialisation); a
# config whose model needs many times more than its weights hold is not these weights' config.
_CALLS_PER_TENSOR = 32
_CALLS_SLACK = 20_000


class _TorchCallBudget(torch.overrides.TorchFunctionMode):
    """Counts torch calls and raises once more than ``limit`` were made (``None``: no limit)."""

    def __init__(self, limit: int | None) -> None:
        super().__init__()
        self.limit, self.calls = limit, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if self.limit is not None and self.calls > self.limit:
            raise ValueError(f"it describes a far larger model than its weights: building it took more than "
                             f"{self.limit:,} torch calls, and the weights hold "
                             f"{(self.limit - _CALLS_SLACK) // _CALLS_PER_TENSOR} tensors (a layer count or "
                             "size edited?)")
        return func(*args, **(kwargs or {}))


def check_tokenizers_fit(tokenizers: dict[str, Any], encoders: dict[str, Any], root: Path) -> None:
    """Each tokenizer fits the text encoder it feeds (``tokenizer_2`` feeds ``text_encoder_2``):
    its vocabulary no larger (its ids would index past the embedding) and not under half of it (a
    tokenizer missing its vocabulary file loads with a handful of tokens and encodes every prompt
    as unknowns), and a CLIP tokenizer's ``model_max_length`` (the length prompts are padded to)
    within its encoder's position embeddings."""
    for name, tokenizer in tokenizers.items():
        encoder = name.replace("tokenizer", "text_encoder", 1)
        config = encoders.get(encoder)
        if config is None:
            continue
        size, expected = len(tokenizer), getattr(config, "vocab_size", None)
        if expected is not None and (size > expected or size < expected / 2):
            raise ValueError(f"{root / name} has {size} tokens, but {root / encoder} embeds {expected}: the tokenizer's "
                             "vocabulary files are missing or belong to another model")
        # CLIP prompts are padded to model_max_length (SD, SDXL, SD3's and Flux's CLIP parts); other
        # encoders are given the pipeline's own max_sequence_length.
        length, positions = tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"{root / name}: model_max_length must be a positive int, got {length!r}")
        clip = getattr(config, "model_type", None) == "clip_text_model"
        if clip and isinstance(positions, int) and length > positions:
            raise ValueError(f"{root / name}: model_max_length {length} is more than the {positions} positions "
                             f"{root / encoder / 'config.json'} has (max_position_embeddings): prompts padded to it "
                             "cannot be encoded")


def check_regular_files(folder: Path) -> None:
    """Every file under ``folder`` is a regular file (or a symlink to one), so no loader or
    fingerprint blocks opening a FIFO or reads a device, symlinked sub-folders included; an error
    naming the first that is not."""
    for file in folder_files(folder):
        check_regular_file(file)


def check_weights(folder: Path, cls: type, read, model: torch.nn.Module, headers: dict[str, dict]) -> None:
    """The ``.safetensors`` files of a network's folder (``headers``: file name -> its header, as
    :func:`check_safetensors` read and checked it against the bytes): shard indexes name files of
    this folder that exist, and the files the loader will read hold every parameter ``model`` (built
    from the config) has, with its shape and a dtype of the same kind."""
    if not headers:
        raise ValueError(f"{folder} holds no .safetensors weights (a {cls.__name__} needs them; only safetensors "
                         "are loaded)")
    # The one name each library's loader reads (no variant is asked for): diffusers' models and
    # transformers' models name their weights differently.
    from diffusers import ModelMixin

    stem = "diffusion_pytorch_model" if issubclass(cls, ModelMixin) else "model"
    if not (folder / f"{stem}.safetensors").exists() and not (folder / f"{stem}.safetensors.index.json").exists():
        raise ValueError(f"{folder} has no {stem}.safetensors (nor {stem}.safetensors.index.json), the file a "
                         f"{cls.__name__} loads; it holds {', '.join(sorted(headers))} (variants such as "
                         f"{stem}.fp16.safetensors are not loaded)")
    loaded = [f"{stem}.safetensors"] if f"{stem}.safetensors" in headers else []
    for file in sorted(folder.glob(f"{stem}.safetensors.index.json")):
        shard_map = read(f"{folder.name}/{file.name}").get("weight_map") or {}
        if not isinstance(shard_map, dict):
            raise ValueError(f"{file}: weight_map must map tensor names to shard files, got {shard_map!r}")
        outside = sorted({str(s) for s in shard_map.values() if not isinstance(s, str) or Path(s).name != s or s == ".."})
        if outside:
            raise ValueError(f"{file} names shard(s) that are not files of {folder}: {outside}")
        absent = sorted({shard for shard in shard_map.values() if shard not in headers})
        if absent:
            raise ValueError(f"{file} names shard(s) that are missing or not .safetensors files: {absent}")
        if file.name.endswith(".safetensors.index.json"):
            loaded = sorted(set(shard_map.values()))
    tensors = {name: entry for file in (loaded or headers) for name, entry in headers[file].items()}
    check_tensors_fit(model, tensors, folder)


def check_tensors_fit(model: torch.nn.Module, tensors: dict[str, tuple[str, list[int]]], folder: Path) -> None:
    """Every parameter of ``model`` is among ``tensors`` (name: (safetensors dtype, shape)) with
    its shape, and a floating-point parameter is stored as floating point. A parameter shared under
    several names (tied weights) counts as present under any of them; diffusers' renaming of its
    deprecated attention keys is applied first, as its loader does."""
    tensors = dict(tensors)
    fix_keys = getattr(model, "_fix_state_dict_keys_on_load", None)
    if fix_keys is not None:
        fix_keys(tensors)
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    missing = sorted(names[0] for names in names_of.values()
                     if not any(n in tensors for n in names) and not any(p.search(names[0]) for p in ignored))
    if missing:
        raise ValueError(f"{folder}: the weights lack {len(missing)} tensor(s) its config.json asks for, such as "
                         f"{missing[:3]} (weights of another model, or renamed tensors)")
    # Buffers the model rebuilds itself (position ids) may be stored too; anything else unused
    # means the config describes a smaller model than the weights (layers, blocks left out).
    known = set(model.state_dict()) | {name for name, _ in model.named_buffers()}
    ignored_extra = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unused = sorted(n for n in tensors if n not in known and not any(p.search(n) for p in ignored_extra))
    if unused:
        raise ValueError(f"{folder}: the weights hold {len(unused)} tensor(s) its config.json has no place for, such "
                         f"as {unused[:3]} (the config describes another model, or a field was edited)")
    for name, parameter in model.named_parameters():
        if name not in tensors:
            continue
        dtype, shape = tensors[name]
        if list(parameter.shape) != list(shape):
            raise ValueError(f"{folder}: tensor {name!r} is {list(shape)} in the weights but {list(parameter.shape)} "
                             "by config.json (the config belongs to another model, or a field was edited)")
        if parameter.is_floating_point() and dtype[0] not in "FB" or dtype == "BOOL":
            raise ValueError(f"{folder}: tensor {name!r} is stored as {dtype}, but it is a floating-point weight")


# ------------------------------------------------------------------------------ config types
def check_config_types(cls: type, config: dict, file: Path) -> None:
    """Each value of ``config`` has the type ``cls`` declares for it; an error naming the file and
    the field otherwise.

    diffusers classes declare their config as annotated ``__init__`` parameters, checked here
    (a value equal to the parameter's default always passes, as do types JSON cannot hold; NaN
    never, nor an infinity other than the default); transformers configs validate themselves (strict dataclass fields) when built from the dict.
    """
    for field, value in config.items():
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{file}: {field} is NaN; a config value must be a number")
    config_class = getattr(cls, "config_class", None)
    if config_class is not None and cls.__module__.startswith("transformers"):
        try:
            config_class.from_dict(dict(config))
        except Exception as error:  # noqa: BLE001 - transformers raises its own error classes; each is reported
            detail = " ".join(str(error).split())
            raise ValueError(f"{file}: {detail}") from None
        return
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - annotations naming types only importable for type checkers
        return
    parameters = inspect.signature(cls.__init__).parameters
    for field, value in config.items():
        hint, parameter = hints.get(field), parameters.get(field)
        if hint is None or parameter is None or (value == parameter.default
                                                  and type(value) is type(parameter.default)):
            continue
        if value is None and parameter.default is None:
            continue
        if isinstance(value, float) and math.isinf(value):
            # Some defaults are infinite (DPM-Solver's lambda_min_clipped: -inf); other values are not.
            raise ValueError(f"{file}: {field} is {value}; it must be finite here")
        if _fits(value, hint) is False:
            raise ValueError(f"{file}: {field} must be {_describe(hint)}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether a JSON value fits a type hint: ``True``, ``False``, or ``None`` when the hint names a
    type JSON cannot hold (not checked). A JSON list stands for a tuple; ``tuple[int]`` is read as
    diffusers writes it, a tuple of ints of any length."""
    if hint is typing.Any:
        return True
    if hint is np.ndarray:  # JSON has no arrays of its own: diffusers reads a list into one
        return isinstance(value, list)
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        results = [_fits(value, a) for a in args]
        return True if True in results else None if None in results else False
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (tuple, list) or origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False
            results = [_fits(v, h) for v, h in zip(value, args)]
        else:
            results = [_fits(v, args[0]) for v in value]
        return False if False in results else None if None in results else True
    if hint is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return None


def _describe(hint: Any) -> str:
    text = str(hint) if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))
    return text.replace("typing.", "").replace("NoneType", "null")


# ------------------------------------------------------------------------------ safetensors
def check_safetensors(file: str | os.PathLike) -> dict[str, tuple[str, list[int]]]:
    """Check a ``.safetensors`` file's header without reading its tensors: the header length fits
    the file; the header is a JSON object with unique keys and string metadata; every tensor has a
    known dtype and a shape of non-negative ints whose size is its byte range; and the byte ranges
    follow one another without gap or overlap, covering the data exactly (as the reference reader
    requires).

    Returns:
        ``{tensor name: (dtype, shape)}``.
    Raises:
        ValueError: naming the file, the tensor and what is wrong (a truncated or corrupt file).
    """
    file = check_regular_file(file)
    size = file.stat().st_size
    with open(file, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file} is not a safetensors file: {size} bytes, shorter than its 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, SAFETENSORS_MAX_HEADER):
            raise ValueError(f"{file} is truncated or corrupt: its header claims {length} bytes, but the file has "
                             f"{size - 8} after the length")
        raw = stream.read(length)
    try:
        # Decoded as UTF-8 first: Python's json would also take UTF-16/32 bytes and a byte-order
        # mark, which the reference reader (and so the loader) refuses.
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as error:  # invalid JSON, not UTF-8, a repeated key, nested too deeply
        raise ValueError(f"{file} is corrupt: its header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file} is corrupt: its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{file} is corrupt: its __metadata__ must map strings to strings, got {metadata!r}")
    data = size - 8 - length
    spans, tensors = [], {}
    for name, tensor in header.items():
        if not isinstance(tensor, dict):
            raise ValueError(f"{file} is corrupt: tensor {name!r} is described by {tensor!r}, not an object")
        offsets, dtype, shape = tensor.get("data_offsets"), tensor.get("dtype"), tensor.get("shape")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{file} is corrupt: tensor {name!r} has no valid data_offsets ({offsets!r})")
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise ValueError(f"{file} is corrupt: tensor {name!r} has unknown dtype {dtype!r} (safetensors has "
                             f"{', '.join(SAFETENSORS_DTYPE_BITS)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ValueError(f"{file} is corrupt: tensor {name!r} has shape {shape!r}; a shape is a list of "
                             "non-negative ints")
        bits = SAFETENSORS_DTYPE_BITS[dtype] * _product(shape)
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise ValueError(f"{file} is corrupt: tensor {name!r} is {dtype} of shape {shape}, "
                             f"{bits / 8:g} bytes, but its data_offsets {offsets} hold {offsets[1] - offsets[0]}")
        if offsets[1] > data:
            raise ValueError(f"{file} is truncated: tensor {name!r} ends at byte {offsets[1]} of the data, but the "
                             f"file holds {data} bytes of data")
        spans.append((offsets[0], offsets[1], name))
        tensors[name] = (dtype, shape)
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves a gap of {start - end} bytes before it"
            raise ValueError(f"{file} is corrupt: tensor {name!r} at bytes {start}-{stop} {what}")
        end = stop
    if end != data:
        raise ValueError(f"{file} is corrupt: its tensors cover {end} bytes, but it holds {data} bytes of data")
    return tensors


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"repeated key(s) {repeated}")
    return dict(pairs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _product(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total
