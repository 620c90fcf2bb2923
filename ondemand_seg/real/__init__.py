"""Real images: pseudo-masks for a user's own (unlabelled) images from the model's attention."""
from ondemand_seg.real.images import to_rgb_tensor
from ondemand_seg.real.labeler import LABELLING_FAMILIES, DiffuMaskLabeler, LabelConfig, PseudoLabel

__all__ = ["LABELLING_FAMILIES", "DiffuMaskLabeler", "LabelConfig", "PseudoLabel", "to_rgb_tensor"]
