import dataclasses
import json
import shutil

import pytest
import torch

from ondemand_seg import (
    DiffuMaskConfig,
    GeneratorConfig,
    MaskConfig,
    QualityConfig,
    resolve_config,
)
from ondemand_seg.generation.generator import DiffuMaskGenerator
from ondemand_seg.pipelines.builtin import PRESET_FILE, TOY_MODEL, TOY_MODEL_DIR
from ondemand_seg.settings.config import from_dict, given_fields, merge_section, to_dict
from ondemand_seg.settings.label_spaces import VOC_CLASSES
from ondemand_seg.settings.resolve import DEFAULT_IMAGE_SIZE
from ondemand_seg.settings.vocabulary import (
    Vocabulary,
    default_vocabulary,
    load_vocabulary,
)

PRESET_MASK = {"resolution_weights": {"1": 2.0, "2": 1.0}, "timestep_window": [0.5, 1.0], "threshold": 0.45}


def model_folder(path, preset):
    """A copy of the toy model (so it passes the model check and is described as the toy is) with
    ``preset`` as its preset."""
    shutil.copytree(TOY_MODEL_DIR, path, ignore=shutil.ignore_patterns(PRESET_FILE), dirs_exist_ok=True)
    (path / PRESET_FILE).write_text(json.dumps(preset))
    return path


@pytest.fixture
def folder(tmp_path):
    return model_folder(tmp_path / "model", {"mask": PRESET_MASK})


def test_configs_round_trip_through_json():
    mask = MaskConfig(resolution_weights={1: 0.5, 4: 2.0}, timestep_window=(0.5, 1.0), class_thresholds={"dog": 0.3},
                      refine="affinity", self_attention_factor=2)
    again = from_dict(MaskConfig, json.loads(json.dumps(to_dict(mask))))
    assert again == mask and again.resolution_weights == {1: 0.5, 4: 2.0} and again.timestep_window == (0.5, 1.0)
    sampler = GeneratorConfig(num_inference_steps=20, scheduler="DPMSolverMultistepScheduler", classes_per_prompt=2)
    assert from_dict(GeneratorConfig, json.loads(json.dumps(to_dict(sampler)))) == sampler
    quality = QualityConfig(min_foreground=0.01, max_consecutive_rejects=7)
    assert from_dict(QualityConfig, json.loads(json.dumps(to_dict(quality)))) == quality


@pytest.mark.parametrize(
    "cls, options, message",
    [
        (MaskConfig, dict(threshold=1.2), "threshold for 'threshold' must be in \\(0, 1\\), got 1.2"),
        (MaskConfig, dict(class_thresholds={"dog": 0.0}), "threshold for 'dog'"),
        (MaskConfig, dict(resolution_weights={3: 1.0}), "latent downsampling factors"),
        (MaskConfig, dict(resolution_weights={}), "non-empty"),
        (MaskConfig, dict(resolution_weights={1: 0.0}), "sum to zero"),
        (MaskConfig, dict(timestep_window=(0.8, 0.2)), "timestep_window"),
        (MaskConfig, dict(normalization="sum"), "normalization must be 'max' or 'minmax', got 'sum'"),
        (MaskConfig, dict(ignore_band=0.5), "ignore_band"),
        (MaskConfig, dict(threshold_mode="magic"), "threshold_mode must be 'fixed' or 'otsu', got 'magic'"),
        (MaskConfig, dict(threshold_mode="otsu", class_thresholds={"dog": 0.3}), "need threshold_mode 'fixed'"),
        (MaskConfig, dict(refine="crf"), "refine must be 'none' or 'affinity', got 'crf'"),
        (MaskConfig, dict(refine_iterations=0), "refine_iterations must be >= 1, got 0"),
        (MaskConfig, dict(self_attention_factor=3), "self_attention_factor"),
        (MaskConfig, dict(self_attention_power=0), "self_attention_power must be >= 1, got 0"),
        (MaskConfig, dict(background_floor="mean"), "background_floor must be 'none' or 'median', got 'mean'"),
        (MaskConfig, dict(neglect_ratio=1.0), r"neglect_ratio must be in \[0, 1\), got 1.0"),
        (MaskConfig, dict(neglect_ratio=-0.1), r"neglect_ratio must be in \[0, 1\), got -0.1"),
        (MaskConfig, dict(aggregation="max"), r"aggregation must be one of \('mean', 'agreement', 'entropy'\), got 'max'"),
        (MaskConfig, dict(token_rescaling="softmax"), "token_rescaling must be one of .*, got 'softmax'"),
        (MaskConfig, dict(self_attention_mode="blend"), "self_attention_mode must be one of .*, got 'blend'"),
        (MaskConfig, dict(self_attention_stop="never"), "self_attention_stop must be one of .*, got 'never'"),
        (MaskConfig, dict(self_attention_sharpness=0.5), r"self_attention_sharpness must be in \[1, 64\], got 0.5"),
        (MaskConfig, dict(self_attention_sharpness=float("nan")), "self_attention_sharpness"),
        (GeneratorConfig, dict(num_inference_steps=0), "num_inference_steps must be >= 1, got 0"),
        (GeneratorConfig, dict(classes_per_prompt=0), "classes_per_prompt must be >= 1, got 0"),
        (GeneratorConfig, dict(classes_per_prompt=(3, 1)), r"classes_per_prompt must be \(min, max\) with min <= max, got \(3, 1\)"),
        (GeneratorConfig, dict(classes_per_prompt=[1, 2, 3]), r"a count or a \(min, max\) pair, got \[1, 2, 3\]"),
        (GeneratorConfig, dict(classes_per_prompt=[0, 2]), "classes_per_prompt must be >= 1, got 0"),
        (GeneratorConfig, dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (QualityConfig, dict(min_foreground=0.5, max_foreground=0.4), "min_foreground < max_foreground"),
        (QualityConfig, dict(max_consecutive_rejects=0), "max_consecutive_rejects must be >= 1, got 0"),
    ],
)
def test_bad_values_are_named(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown MaskConfig option\(s\): \['gamma'\]"):
        from_dict(MaskConfig, {"gamma": 0.4})
    # Prompt wording moved to the vocabulary: the sampler has no templates any more.
    with pytest.raises(ValueError, match=r"unknown GeneratorConfig option\(s\): \['templates'\]"):
        from_dict(GeneratorConfig, {"templates": ["a photo of a {class}"]})


def test_given_fields_remember_what_the_constructor_was_given():
    assert given_fields(MaskConfig(threshold=0.3)) == {"threshold": 0.3}
    assert given_fields(MaskConfig()) == {}
    assert set(given_fields(MaskConfig({1: 1.0}, (0.5, 1.0)))) == {"resolution_weights", "timestep_window"}
    assert given_fields(MaskConfig(timestep_window=[0.0, 1.0])) == {"timestep_window": (0.0, 1.0)}
    replaced = dataclasses.replace(MaskConfig(threshold=0.3), ignore_band=0.1)
    assert set(given_fields(replaced)) == {f.name for f in dataclasses.fields(MaskConfig)}
    assert given_fields(GeneratorConfig(batch_size=2)) == {"batch_size": 2}
    assert given_fields(QualityConfig(black_level=0.1)) == {"black_level": 0.1}
    # Remembering does not change equality: configs with the same values are equal.
    assert MaskConfig(threshold=0.4) == MaskConfig()


def test_merge_section_layers_field_by_field():
    preset = {"threshold": 0.3, "ignore_band": 0.1}
    merged = merge_section(MaskConfig, None, preset, MaskConfig(ignore_band=0.02), {"refine": "affinity"})
    assert (merged.threshold, merged.ignore_band, merged.refine) == (0.3, 0.02, "affinity")
    assert merged.resolution_weights == MaskConfig().resolution_weights
    assert merge_section(MaskConfig) == MaskConfig()
    assert merge_section(GeneratorConfig, {"batch_size": 2}, {"batch_size": 3}).batch_size == 3
    with pytest.raises(ValueError, match=r"unknown MaskConfig option\(s\): \['gamma'\]"):
        merge_section(MaskConfig, {"gamma": 0.3})
    with pytest.raises(TypeError, match="MaskConfig settings must be a MaskConfig or a dict of its fields"):
        merge_section(MaskConfig, GeneratorConfig())
    with pytest.raises(ValueError, match="threshold for 'threshold'"):
        merge_section(MaskConfig, {"threshold": 2.0})


def test_partial_mask_override_keeps_the_presets_other_fields(folder):
    preset = resolve_config(folder).mask
    assert preset.resolution_weights == {1: 2.0, 2: 1.0} and preset.timestep_window == (0.5, 1.0)
    assert preset.threshold == 0.45
    for override in ({"threshold": 0.3}, MaskConfig(threshold=0.3)):
        mask = resolve_config(folder, mask=override).mask
        assert mask.threshold == 0.3, override
        assert mask == dataclasses.replace(preset, threshold=0.3), f"{override} changed more than γ"


def test_an_explicit_default_value_overrides_the_preset(folder):
    mask = resolve_config(folder, mask=MaskConfig(timestep_window=(0.0, 1.0))).mask
    assert mask.timestep_window == (0.0, 1.0) == MaskConfig().timestep_window
    assert mask.resolution_weights == {1: 2.0, 2: 1.0} and mask.threshold == 0.45
    assert resolve_config(folder, mask={"timestep_window": [0.0, 1.0]}).mask == mask


def test_a_replaced_config_counts_as_fully_given(folder):
    full = dataclasses.replace(MaskConfig(), threshold=0.3)
    assert resolve_config(folder, mask=full).mask == full
    assert resolve_config(folder, mask=full).mask.resolution_weights == MaskConfig().resolution_weights


def test_none_means_not_given(folder):
    assert resolve_config(folder, mask=None, vocabulary=None, image_size=None) == resolve_config(folder)


def test_sampler_and_quality_sections_merge_the_same_way(tmp_path):
    folder = model_folder(tmp_path / "m", {"generator": {"num_inference_steps": 7, "batch_size": 3},
                                           "quality": {"min_foreground": 0.1, "max_consecutive_rejects": 9}})
    config = resolve_config(folder, generator=GeneratorConfig(batch_size=5), quality={"max_foreground": 0.9})
    assert (config.generator.num_inference_steps, config.generator.batch_size) == (7, 5)
    # Not given anywhere: the model's own pipeline recommends it (StableDiffusionPipeline: 7.5).
    assert config.generator.guidance_scale == 7.5 and GeneratorConfig().guidance_scale is None
    assert (config.quality.min_foreground, config.quality.max_foreground, config.quality.max_consecutive_rejects) == (
        0.1, 0.9, 9)


def test_unknown_options_fields_and_preset_keys_are_named(tmp_path, folder):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['masks'\]; the settings are vocabulary, label_space"):
        resolve_config(folder, masks={"threshold": 0.3})
    with pytest.raises(ValueError, match=r"unknown MaskConfig option\(s\): \['gamma'\]"):
        resolve_config(folder, mask={"gamma": 0.3})
    with pytest.raises(ValueError, match=r"unknown QualityConfig option\(s\): \['min_fg'\]"):
        resolve_config(folder, quality={"min_fg": 0.1})
    bad_key = model_folder(tmp_path / "bad-key", {"mask": PRESET_MASK, "colour": "red"})
    with pytest.raises(ValueError, match=r"the model preset names unknown option\(s\) \['colour'\]"):
        resolve_config(bad_key)
    bad_field = model_folder(tmp_path / "bad-field", {"mask": {"gamma": 0.3}})
    with pytest.raises(ValueError, match=r"unknown MaskConfig option\(s\): \['gamma'\]"):
        resolve_config(bad_field)
    # Templates belong to the vocabulary now; a preset that still puts them in the sampler is named.
    old = model_folder(tmp_path / "old", {"generator": {"templates": ["a {}"]}})
    with pytest.raises(ValueError, match=r"unknown GeneratorConfig option\(s\): \['templates'\]"):
        resolve_config(old)


def test_toy_config_round_trips_through_its_dict(tmp_path):
    config = resolve_config(TOY_MODEL)
    preset = json.loads((TOY_MODEL_DIR / PRESET_FILE).read_text())
    assert config.vocabulary == load_vocabulary(preset["vocabulary"])
    assert config.image_size == (preset["image_size"],) * 2
    assert config.generator.classes_per_prompt == preset["generator"]["classes_per_prompt"]
    assert config.mask.timestep_window == tuple(preset["mask"]["timestep_window"])
    data = config.to_dict()
    assert resolve_config(TOY_MODEL, **data) == config
    assert resolve_config(TOY_MODEL, **json.loads(config.to_json())) == config
    # Over a model with no preset too: the dict holds every setting.
    assert resolve_config(lambda: None, **data) == config
    # Saved, it is a preset file: a folder shipping it resolves to the same config.
    saved = config.save(tmp_path / "nested" / "copy" / PRESET_FILE)
    assert json.loads(saved.read_text()) == data
    model_folder(saved.parent, data)
    assert resolve_config(saved.parent) == config


def test_defaults_without_a_preset():
    config = resolve_config(lambda: None)
    assert isinstance(config, DiffuMaskConfig)
    assert config.label_space == VOC_CLASSES and config.vocabulary == default_vocabulary()
    assert config.image_size == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    assert (config.mask, config.generator, config.quality) == (MaskConfig(), GeneratorConfig(), QualityConfig())
    assert resolve_config(lambda: None, image_size=(64, 96)).image_size == (64, 96)
    assert resolve_config(lambda: None, image_size=64).image_size == (64, 64)


def test_image_size_is_checked_against_the_model(tmp_path):
    with pytest.raises(ValueError, match="not a multiple of 8"):
        resolve_config(lambda: None, image_size=36)
    with pytest.raises(ValueError, match="positive ints"):
        resolve_config(lambda: None, image_size=(64, 64, 3))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_config(str(tmp_path / "no-such-model"))


def test_vocabulary_mapping_without_classes_patches_the_preset_vocabulary():
    templates = ["a picture of a {class}"]
    config = resolve_config(TOY_MODEL, vocabulary={"templates": templates})
    toy = load_vocabulary("toy")
    assert config.vocabulary.templates == tuple(templates)
    assert config.vocabulary == dataclasses.replace(toy, templates=tuple(templates))
    assert config.label_space == toy.label_space
    # Without a preset vocabulary, the patch applies to the default one.
    plain = resolve_config(lambda: None, vocabulary={"templates": templates}).vocabulary
    assert plain.classes == default_vocabulary().classes and plain.templates == tuple(templates)
    with pytest.raises(ValueError, match=r"unknown keys \['template'\]"):
        resolve_config(TOY_MODEL, vocabulary={"template": templates})


def test_vocabulary_patch_keeps_a_preset_label_space(tmp_path):
    folder = model_folder(tmp_path / "m", {"label_space": ["background", "blob", "dog"]})
    config = resolve_config(folder, ["blob"], vocabulary={"templates": ["a picture of a {class}"]})
    assert config.label_space == ("background", "blob", "dog")
    assert config.vocabulary == dataclasses.replace(resolve_config(folder).vocabulary, templates=("a picture of a {class}",))


def test_vocabulary_override_forms():
    voc = resolve_config(TOY_MODEL, vocabulary="voc")
    assert voc.vocabulary == load_vocabulary("voc") and voc.label_space == VOC_CLASSES
    farm = {"name": "farm", "classes": ["cow", "goat"], "templates": ["a photo of a {class}"]}
    config = resolve_config(TOY_MODEL, vocabulary=farm)
    assert config.vocabulary.classes == ("cow", "goat") and config.label_space == ("background", "cow", "goat")
    given = Vocabulary.plain(["cow"])
    assert resolve_config(TOY_MODEL, vocabulary=given).vocabulary == given


def test_label_space_override():
    names = ("background", "blob", "dog")
    config = resolve_config(lambda: None, label_space=list(names))
    assert config.label_space == names
    assert config.vocabulary == default_vocabulary(names) and config.vocabulary.classes == ("blob", "dog")
    # With a preset vocabulary the label space still comes from the override.
    toy = resolve_config(TOY_MODEL, label_space=["background", "circle", "square"])
    assert toy.label_space == ("background", "circle", "square") and toy.vocabulary == load_vocabulary("toy")
    with pytest.raises(ValueError, match="label_space\\[0\\] must be 'background'"):
        resolve_config(lambda: None, label_space=["dog", "cat"])


def test_free_text_classes_join_a_given_vocabulary_and_are_errors_otherwise():
    config = resolve_config(lambda: None, ["red panda", "dog"], vocabulary="voc")
    assert config.vocabulary.classes == load_vocabulary("voc").classes + ("red panda",)
    assert config.label_space == VOC_CLASSES + ("red panda",)
    # Without a vocabulary asked for, an unknown class is more likely a typo than a zero-shot class.
    with pytest.raises(ValueError, match="unknown class 'red panda'"):
        resolve_config(lambda: None, ["red panda"])
    with pytest.raises(ValueError, match="unknown class 'sqare'"):
        resolve_config(TOY_MODEL, ["sqare"])
    with pytest.raises(ValueError, match="'background' cannot be generated"):
        resolve_config(TOY_MODEL, ["background"], vocabulary="toy")


def test_class_thresholds_must_name_label_space_classes():
    assert resolve_config(TOY_MODEL, mask={"class_thresholds": {"circle": 0.3}}).mask.class_thresholds == {"circle": 0.3}
    with pytest.raises(ValueError, match=r"class_thresholds names classes outside the label space: \['dog'\]"):
        resolve_config(TOY_MODEL, mask={"class_thresholds": {"dog": 0.3}})


def test_sample_source_resolves_the_same_way(tmp_path):
    preset = {"label_space": ["background", "blob", "dog"], "image_size": 32,
              "vocabulary": {"templates": ["a {class} drawing"]}, "mask": PRESET_MASK}
    folder = model_folder(tmp_path / "m", preset)
    source = DiffuMaskGenerator(folder, ["blob"])
    assert source.config == resolve_config(folder, ["blob"])
    assert source.label_space == ("background", "blob", "dog") and source.class_ids == [1]
    assert source.image_size == (32, 32)
    assert source.mask_config.threshold == 0.45 and source.mask_config.resolution_weights == {1: 2.0, 2: 1.0}
    assert source.vocabulary.templates == ("a {class} drawing",)
    assert source.prompt(0).text == "a blob drawing"
    # The sampler fields nobody set are the model's own pipeline defaults (StableDiffusionPipeline's).
    assert source.generator_config == GeneratorConfig(num_inference_steps=50, guidance_scale=7.5)
    assert source.quality_config == QualityConfig()
    explicit = DiffuMaskGenerator(folder, ["dog"], image_size=64, mask=MaskConfig(threshold=0.5))
    assert explicit.image_size == (64, 64) and explicit.mask_config.threshold == 0.5
    assert explicit.mask_config.resolution_weights == {1: 2.0, 2: 1.0}, "the preset's other fields stay"
    assert explicit.mask_config.timestep_window == (0.5, 1.0)
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        DiffuMaskGenerator(folder, ["cat"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'prompt_names'"):
        DiffuMaskGenerator(folder, ["dog"], prompt_names={"dog": "puppy"})


def test_speed_options_are_booleans_and_round_trip():
    sampler = GeneratorConfig(compile=True, channels_last=True)
    assert from_dict(GeneratorConfig, json.loads(json.dumps(to_dict(sampler)))) == sampler
    assert (GeneratorConfig().compile, GeneratorConfig().channels_last) == (False, False)
    with pytest.raises(TypeError, match=r"compile must be True or False, got 'yes' \(str\)"):
        GeneratorConfig(compile="yes")
    with pytest.raises(TypeError, match=r"channels_last must be True or False, got 1 \(int\)"):
        GeneratorConfig(channels_last=1)


def test_compile_names_the_torch_it_needs(monkeypatch):
    from torch.torch_version import TorchVersion

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.7.1"))
    with pytest.raises(ValueError, match=r"compile=True needs torch >= 2.8 .* this is torch 2.7.1"):
        GeneratorConfig(compile=True)
    assert GeneratorConfig(channels_last=True).channels_last, "channels_last works on any torch"
