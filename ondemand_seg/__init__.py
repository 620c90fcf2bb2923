"""ondemand_seg: an endless, pixel-labelled segmentation dataset from a text-to-image diffusion model.

The package is grouped by the stages a sample passes through:

- ``settings``: what a user sets (config sections, vocabularies, label spaces), checked and merged;
- ``pipelines``: which model a ``model`` argument names, its folder checked, loaded on a device;
- ``generation``: the generator (:class:`DiffuMaskGenerator`), attention capture and seeds;
- ``masks``: captured attention to label masks (pure tensor math), and the quality gate;
- ``data``: the datasets (:class:`DiffuMaskStream`, :class:`DiffuMaskDataset`), transforms,
  augmentation, sharding and resume state;
- ``toyworld``: the procedural world the embedded toy models were trained on;
- ``real``: pseudo-masks for a user's own tagged images (:class:`DiffuMaskLabeler`), a folder of
  them (:class:`ImageFolderImages`) and them as a dataset (:class:`PseudoLabelledDataset`);
- ``exports``: samples written to disk as a VOC tree, WebDataset shards or a Hugging Face dataset.
"""
import importlib
import os

# albumentations asks PyPI for a newer version whenever it is imported (here, in every DataLoader
# worker too) unless this is set; a data library must not touch the network unasked.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.2.0"

# The public names and the module each lives in. They are imported on first use (PEP 562), so
# ``import ondemand_seg`` loads neither diffusers nor albumentations.
_PUBLIC = {
    "AugmentConfig": "data.augment", "DiffuMaskAugment": "data.augment",
    "DiffuMaskDataset": "data.dataset", "DiffuMaskStream": "data.stream",
    "PairAugmentation": "data.transforms", "SegmentationTransform": "data.transforms",
    "DiffuMaskGenerator": "generation.generator",
    "export": "exports.run",
    "TooManyRejects": "masks.quality",
    "DiffuMaskLabeler": "real.labeler", "LabelConfig": "real.labeler", "PseudoLabelledDataset": "real.dataset",
    "ImageFolderImages": "real.images",
    "DiffuMaskConfig": "settings.config", "GeneratorConfig": "settings.config", "MaskConfig": "settings.config",
    "QualityConfig": "settings.config",
    "IGNORE_INDEX": "settings.label_spaces", "VOC_CLASSES": "settings.label_spaces",
    "resolve_config": "settings.resolve",
    "Vocabulary": "settings.vocabulary", "load_vocabulary": "settings.vocabulary",
}
# Names of earlier releases, and what they are called now.
_RENAMED = {"SamplerConfig": "GeneratorConfig", "DiffuMaskSampler": "DiffuMaskGenerator"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _RENAMED:
        raise AttributeError(f"ondemand_seg.{name} is now ondemand_seg.{_RENAMED[name]}")
    raise AttributeError(f"module 'ondemand_seg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
