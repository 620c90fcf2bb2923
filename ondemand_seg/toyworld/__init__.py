"""ToyWorld: procedural coloured shapes with exact masks, for training and scoring end to end.

Truth is known for every real sample and recoverable by colour (`color_oracle`) for generated ones.
"""
from ondemand_seg.toyworld.voc import write_voc
from ondemand_seg.toyworld.world import TOY_CLASSES, ToySample, ToyWorld, color_oracle

__all__ = ["TOY_CLASSES", "ToySample", "ToyWorld", "color_oracle", "write_voc"]
