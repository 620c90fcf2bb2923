"""The models that ship inside the package, named by string (``"toy"``, ``"toy-mmdit"``,
``"toy-unaided"``, ``"random-weights"``), and the settings a model folder recommends (its preset)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

from ..settings.files import read_json_object

ModelSource = Union[str, os.PathLike, Callable[[], object]]

_MODELS_DIR = Path(__file__).parents[1] / "models"
TOY_MODEL = "toy"
TOY_MODEL_DIR = _MODELS_DIR / "toy"
TOY_MMDIT_MODEL = "toy-mmdit"
# The toy architecture with self-attention at its finest grid, trained without the localisation
# loss: attention that was never taught where objects are, as in real Stable Diffusion.
TOY_UNAIDED_MODEL = "toy-unaided"
# Built-in model names and the folders shipped inside the package.
BUILTIN_MODELS = {TOY_MODEL: TOY_MODEL_DIR, TOY_MMDIT_MODEL: _MODELS_DIR / "toy-mmdit",
                  TOY_UNAIDED_MODEL: _MODELS_DIR / "toy-unaided"}
_TRAINERS = {TOY_MODEL: "train/toy/train_toy_model.py", TOY_MMDIT_MODEL: "train/toy/train_toy_mmdit.py",
             TOY_UNAIDED_MODEL: "train/toy/train_toy_model.py --attn-weight 0 --self-attn-16"}
RANDOM_WEIGHTS_MODEL = "random-weights"
PRESET_FILE = "ondemand_seg.json"

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
        from .tiny import TINY_IMAGE_SIZE

        return {"image_size": TINY_IMAGE_SIZE}
    if callable(model) or not isinstance(model, (str, os.PathLike)):
        return {}
    folder = Path(resolve_model(model)).expanduser()
    path = folder / PRESET_FILE
    if not path.exists() and not path.is_symlink():
        return {}
    preset = read_json_object(path, "a JSON object of settings")
    vocabulary = preset.get("vocabulary")
    if isinstance(vocabulary, str) and Path(vocabulary).suffix:
        # A vocabulary file a preset names ships with the model: relative to its folder, not to
        # wherever the program runs, and inside it (a downloaded folder must not read, or echo
        # in errors, files elsewhere on the machine).
        inside = (folder / vocabulary).resolve().is_relative_to(folder.resolve())
        if Path(vocabulary).is_absolute() or ".." in Path(vocabulary).parts or not inside:
            raise ValueError(f"{path}: vocabulary {vocabulary!r} is not a file of the model folder; a preset names its "
                             "vocabulary file relative to the folder, inside it (give another file as vocabulary=)")
        preset = {**preset, "vocabulary": str(folder / vocabulary)}
    return preset
