"""ondemand_seg: an endless, pixel-labelled segmentation dataset from a text-to-image diffusion model."""
from .config import MaskConfig, QualityConfig, SamplerConfig
from .dataset import DiffuMaskDataset
from .label_spaces import IGNORE_INDEX, VOC_CLASSES
from .quality import TooManyRejects
from .stream import DiffuMaskStream
from .transforms import SegmentationTransform

__all__ = [
    "DiffuMaskDataset", "DiffuMaskStream", "IGNORE_INDEX", "MaskConfig", "QualityConfig", "SamplerConfig",
    "SegmentationTransform", "TooManyRejects", "VOC_CLASSES",
]
__version__ = "0.1.0"
