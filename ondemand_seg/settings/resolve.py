"""The one place where a model's preset and a caller's explicit settings are merged.

Like diffusers' ``from_pretrained(..., **kwargs)`` over a saved config, :func:`resolve_config`
starts from the defaults, applies what the model has and its pipeline recommends, the model
folder's ``ondemand_seg.json`` preset, then the caller's arguments, field by field:
``mask={"threshold": 0.3}`` or ``mask=MaskConfig(threshold=0.3)`` changes γ and keeps every other
field the preset sets. The library's datasets, the command line and the trainer all go through
it, and the result prints and saves as JSON in the preset's form.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from ..pipelines.builtin import read_preset
from ..pipelines.loading import check_model_source
from .config import SECTIONS, DiffuMaskConfig, merge_section
from .label_spaces import check_class_spelling, class_ids, validate_label_space
from .validation import check_classes, check_image_size, check_names
from .vocabulary import Vocabulary, default_vocabulary, load_vocabulary, vocabulary_from

_TOP_LEVEL = ("vocabulary", "label_space", "image_size", *SECTIONS)
# Settings renamed since they were published, and their names now.
RENAMED = {"sampler": "generator"}
# The image side for a model known only once loaded (a callable, an uncached hub id): every
# supported family can generate at it.
DEFAULT_IMAGE_SIZE = 512


def check_option_names(settings: Mapping[str, Any], what: str) -> None:
    """An error naming any key of ``settings`` that is not a setting (a renamed one with its new name)."""
    renamed = [f"{old!r} is now {RENAMED[old]!r}" for old in sorted(set(settings) & set(RENAMED))]
    if renamed:
        raise ValueError(f"renamed setting(s): {'; '.join(renamed)} (GeneratorConfig, formerly SamplerConfig)")
    unknown = sorted(set(settings) - set(_TOP_LEVEL))
    if unknown:
        raise ValueError(f"{what} {unknown}; the settings are {', '.join(_TOP_LEVEL)}")


def resolve_config(model: Any, classes: Sequence[str] = (), **overrides: Any) -> DiffuMaskConfig:
    """Defaults, then what ``model`` itself has and recommends, then its preset, then ``overrides``,
    merged field by field.

    The model layer (:meth:`~ondemand_seg.families.ModelSpec.defaults`: its pipeline's steps and
    guidance, its image size, the attention grids it has) is read from the folder's configs without
    loading weights; for a model known only once loaded (a callable, an uncached hub id) the
    fields left ``None`` are filled in the generating process, by the same rules.

    Args:
        model: what :func:`~ondemand_seg.loading.read_preset` reads a preset from (a folder, a
            built-in name, a hub id or a callable: the last two have none).
        classes: classes to generate, each in the label space; when ``vocabulary`` is given, any
            class it lacks is added to it as free text (zero-shot).
        overrides: ``vocabulary`` (a built-in name, a .json/.yaml path, a :class:`Vocabulary`, a
            full mapping in the file form, or a mapping without ``classes`` whose fields replace
            those of the preset's vocabulary), ``label_space`` (class names; default the
            vocabulary's), ``image_size`` (int or ``(H, W)``), and ``mask`` / ``generator`` /
            ``quality`` (config instances or dicts of fields). ``None`` means "not given".
    Raises:
        ValueError: an unknown option, field or class, a bad value, an image size or attention
            resolution the model cannot take, a guidance scale that turns its guidance off, an
            unsupported pipeline class or a broken model folder, naming it. TypeError: a value of the
            wrong type (the model first), naming it. FileNotFoundError: a model folder that does not
            exist, or a hub model neither cached nor downloadable (``HF_HUB_OFFLINE``).
    """
    spec = check_model_source(model)
    classes = check_classes(classes)
    check_option_names(overrides, "unknown option(s)")
    preset = read_preset(model)
    check_option_names(preset, "the model preset names unknown option(s)")

    given_vocabulary = overrides.get("vocabulary")
    labels = overrides.get("label_space")
    patch = isinstance(given_vocabulary, Mapping) and "classes" not in given_vocabulary
    if labels is None and (given_vocabulary is None or patch):
        labels = preset.get("label_space")
    if isinstance(labels, str):
        raise TypeError(f"label_space must be a list of class names, got the string {labels!r} (a built-in label "
                        f"space is chosen with vocabulary={labels!r})")
    if labels is not None:
        labels = validate_label_space(check_names("label_space", labels))
    vocabulary = None
    for layer in (preset.get("vocabulary"), given_vocabulary):
        if layer is None:
            continue
        if isinstance(layer, Vocabulary):
            vocabulary = layer
        elif isinstance(layer, Mapping) and "classes" not in layer:
            base = vocabulary or default_vocabulary(labels)
            vocabulary = vocabulary_from({**base.to_dict(), **layer})
        elif isinstance(layer, Mapping):
            vocabulary = vocabulary_from(layer)
        elif isinstance(layer, (str, os.PathLike)):
            vocabulary = load_vocabulary(layer)
        else:
            raise TypeError(f"vocabulary must be a built-in name, a file path, a Vocabulary or a mapping, got "
                            f"{layer!r} ({type(layer).__name__})")
    vocabulary = vocabulary or default_vocabulary(labels)
    aliases = {word: label for label, words in vocabulary.synonyms.items() for word in words}
    aliases.update({words: label for label, words in vocabulary.prompt_names.items()})
    check_class_spelling(classes, labels if labels is not None else vocabulary.label_space, aliases)
    if given_vocabulary is not None:
        # Free-text classes only when a vocabulary is asked for: otherwise a misspelt class would
        # silently become a new zero-shot class instead of an error.
        vocabulary = vocabulary.with_classes([c for c in classes if c != "background"])
    label_space = validate_label_space(labels if labels is not None else vocabulary.label_space)
    if classes:
        class_ids(classes, label_space)
    size = overrides.get("image_size")
    if size is None:
        size = preset.get("image_size", spec.default_size if spec is not None else DEFAULT_IMAGE_SIZE)
    size = check_image_size(size, spec)
    model_layer = spec.defaults(size) if spec is not None else {}
    sections = {name: merge_section(cls, model_layer.get(name), preset.get(name), overrides.get(name))
                for name, cls in SECTIONS.items()}
    if spec is not None:
        spec.check_mask(sections["mask"])
        spec.check_generator(sections["generator"])
    unknown = sorted(set(sections["mask"].class_thresholds) - set(label_space))
    if unknown:
        raise ValueError(f"class_thresholds names classes outside the label space: {unknown}")
    return DiffuMaskConfig(vocabulary, label_space, size, **sections)
