"""ondemand_seg: an endless, pixel-labelled segmentation dataset from a text-to-image diffusion model."""
import os

# albumentations asks PyPI for a newer version whenever it is imported (here, in every DataLoader
# worker too) unless this is set; a data library must not touch the network unasked.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from .augment import AugmentConfig, DiffuMaskAugment
from .config import DiffuMaskConfig, MaskConfig, QualityConfig, SamplerConfig, resolve_config
from .dataset import DiffuMaskDataset
from .label_spaces import IGNORE_INDEX, VOC_CLASSES
from .quality import TooManyRejects
from .stream import DiffuMaskStream
from .transforms import PairAugmentation, SegmentationTransform
from .vocabulary import Vocabulary, load_vocabulary

__all__ = [
    "AugmentConfig", "DiffuMaskAugment", "DiffuMaskConfig", "DiffuMaskDataset", "DiffuMaskStream", "IGNORE_INDEX",
    "MaskConfig", "PairAugmentation", "QualityConfig", "SamplerConfig", "SegmentationTransform", "TooManyRejects",
    "VOC_CLASSES", "Vocabulary", "load_vocabulary", "resolve_config",
]
__version__ = "0.1.0"
