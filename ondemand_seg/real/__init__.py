"""Real images: pseudo-masks for a user's own (unlabelled) images from the model's attention."""
from ondemand_seg.real.images import ImageFolderImages, image_files, to_rgb_tensor
from ondemand_seg.real.labeler import LABELLING_FAMILIES, DiffuMaskLabeler, LabelConfig, PseudoLabel
from ondemand_seg.real.dataset import PseudoLabelledDataset, read_tags

__all__ = ["LABELLING_FAMILIES", "DiffuMaskLabeler", "ImageFolderImages", "LabelConfig", "PseudoLabel",
           "PseudoLabelledDataset", "image_files", "read_tags", "to_rgb_tensor"]
