import json

import pytest

from ondemand_seg.config import MaskConfig, QualityConfig, SamplerConfig, from_dict, to_dict


def test_configs_round_trip_through_json():
    mask = MaskConfig(resolution_weights={1: 0.5, 4: 2.0}, timestep_window=(0.5, 1.0), class_thresholds={"dog": 0.3},
                      refine="affinity", self_attention_factor=2)
    again = from_dict(MaskConfig, json.loads(json.dumps(to_dict(mask))))
    assert again == mask
    sampler = SamplerConfig(templates=("a {} at dawn", "a photo of a {}"), num_inference_steps=20)
    assert from_dict(SamplerConfig, json.loads(json.dumps(to_dict(sampler)))) == sampler


@pytest.mark.parametrize(
    "cls, options, message",
    [
        (MaskConfig, dict(threshold=1.2), "threshold for 'threshold' must be in \\(0, 1\\), got 1.2"),
        (MaskConfig, dict(class_thresholds={"dog": 0.0}), "threshold for 'dog'"),
        (MaskConfig, dict(resolution_weights={3: 1.0}), "latent downsampling factors"),
        (MaskConfig, dict(timestep_window=(0.8, 0.2)), "timestep_window"),
        (MaskConfig, dict(threshold_mode="magic"), "threshold_mode must be 'fixed' or 'otsu', got 'magic'"),
        (MaskConfig, dict(threshold_mode="otsu", class_thresholds={"dog": 0.3}), "need threshold_mode 'fixed'"),
        (MaskConfig, dict(refine="crf"), "refine must be 'none' or 'affinity', got 'crf'"),
        (MaskConfig, dict(self_attention_factor=3), "self_attention_factor"),
        (SamplerConfig, dict(templates=()), "templates is empty"),
        (SamplerConfig, dict(templates=("a dog",)), "must contain exactly one"),
        (SamplerConfig, dict(num_inference_steps=0), "num_inference_steps must be >= 1, got 0"),
        (QualityConfig, dict(min_foreground=0.5, max_foreground=0.4), "min_foreground < max_foreground"),
    ],
)
def test_bad_values_are_named(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown MaskConfig option\(s\): \['gamma'\]"):
        from_dict(MaskConfig, {"gamma": 0.4})
