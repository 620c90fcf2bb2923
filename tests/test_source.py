import dataclasses

import numpy as np
import pytest
from PIL import Image

from ondemand_seg.generation import seeding
from ondemand_seg.generation.generator import DiffuMaskGenerator, RawSample
from ondemand_seg.settings.config import DiffuMaskConfig, MaskConfig
from ondemand_seg.settings.label_spaces import voc_palette


def raw_sample(index=3, attempt=1):
    rng = np.random.default_rng(index)
    mask = np.zeros((16, 24), dtype=np.uint8)
    mask[2:8, 4:12] = 12
    mask[0] = 255
    return RawSample(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8), mask, "a photograph of a dog", index, attempt)


def test_pil_pair_is_what_voc_segmentation_yields():
    sample = raw_sample()
    image, target = sample.pil()
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (24, 16)
    assert isinstance(target, Image.Image) and target.mode == "P" and target.size == (24, 16)
    assert target.getpalette() == voc_palette()
    assert np.array_equal(np.array(image), sample.image)
    assert np.array_equal(np.array(target), sample.mask), "ids (255 included) are kept, not recoloured"
    # The pair is a fresh view each time: editing one leaves the sample alone.
    target.putpixel((0, 0), 3)
    assert sample.mask[0, 0] == 255 and np.array(sample.pil()[1])[0, 0] == 255


def test_augment_seed_is_the_seeding_layout_per_use():
    sample = raw_sample(index=3, attempt=1)
    assert sample.augment_seed(7) == seeding.augment_seed(7, 3, 1, 0)
    assert sample.augment_seed(7, use=2) == seeding.augment_seed(7, 3, 1, 2)
    seeds = {sample.augment_seed(7, use) for use in range(4)} | {raw_sample(attempt=0).augment_seed(7)}
    assert len(seeds) == 5


def test_settings_are_resolved_and_checked_before_any_model_loads(fast):
    loaded = []
    source = DiffuMaskGenerator(lambda: loaded.append(1), ["dog", "bird"], seed=4, **fast)
    assert isinstance(source.config, DiffuMaskConfig)
    assert source.image_size == (64, 64) and source.class_ids == [12, 3]
    assert source.label_space == source.config.label_space and source.label_space[12] == "dog"
    assert source.vocabulary is source.config.vocabulary
    assert source.mask_config is source.config.mask and source.quality_config is source.config.quality
    assert source.generator_config.batch_size == fast["generator"].batch_size == source.config.generator.batch_size
    with pytest.raises(TypeError, match="unexpected keyword argument 'prompt_names'"):
        DiffuMaskGenerator(lambda: loaded.append(1), ["dog"], prompt_names={"dog": "puppy"}, **fast)
    with pytest.raises(ValueError, match="unknown class 'dragon'"):
        DiffuMaskGenerator(lambda: loaded.append(1), ["dragon"], **fast)
    assert not loaded


def test_prompt_is_drawn_from_seed_index_and_attempt(fast):
    options = dict(fast, vocabulary="voc")
    source = DiffuMaskGenerator(lambda: None, ["dog", "bird", "cat"], seed=1, **options)
    same = DiffuMaskGenerator(lambda: None, ["dog", "bird", "cat"], seed=1, **options)
    prompts = [source.prompt(i) for i in range(12)]
    assert prompts == [same.prompt(i) for i in range(12)]
    for prompt in prompts:
        assert len(prompt.class_names) == 1 and prompt.class_ids == (source.label_space.index(prompt.class_names[0]),)
    assert len({p.text for p in prompts}) > 3
    assert any(source.prompt(i, attempt=1) != source.prompt(i) for i in range(12))
    other = DiffuMaskGenerator(lambda: None, ["dog", "bird", "cat"], seed=2, **options)
    assert [other.prompt(i) for i in range(12)] != prompts


def test_a_count_range_draws_each_prompts_class_count_from_the_seed(fast):
    options = dict(fast, vocabulary="voc", generator=dataclasses.replace(fast["generator"], classes_per_prompt=(1, 3)))
    classes = ["dog", "bird", "cat", "horse"]
    source = DiffuMaskGenerator(lambda: None, classes, seed=1, **options)
    prompts = [source.prompt(i) for i in range(40)]
    assert prompts == [DiffuMaskGenerator(lambda: None, classes, seed=1, **options).prompt(i) for i in range(40)]
    counts = [len(p.class_names) for p in prompts]
    assert set(counts) == {1, 2, 3}
    for prompt in prompts:  # distinct classes, each named in the text
        assert len(set(prompt.class_names)) == len(prompt.class_names)
        assert prompt.class_ids == tuple(source.label_space.index(n) for n in prompt.class_names)
    # More classes asked for than there are: every class, once.
    few = DiffuMaskGenerator(lambda: None, ["dog", "cat"], seed=1, **dict(options, generator=dataclasses.replace(
        fast["generator"], classes_per_prompt=(3, 3))))
    assert {len(few.prompt(i).class_names) for i in range(5)} == {2}


def test_draw_returns_the_indices_in_order_whatever_the_batch(tiny_sd1, fast):
    source = DiffuMaskGenerator(tiny_sd1, ["dog", "bird"], **fast)
    drawn = source.samples([5, 1])
    assert [s.index for s in drawn] == [5, 1]
    for sample in drawn:
        assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
        assert sample.mask.shape == (64, 64) and sample.mask.dtype == np.uint8
        assert sample.prompt == source.prompt(sample.index, sample.attempt).text
    alone = DiffuMaskGenerator(tiny_sd1, ["dog", "bird"], **fast).samples([1])[0]
    assert np.array_equal(alone.mask, drawn[1].mask)
    assert np.abs(alone.image.astype(int) - drawn[1].image.astype(int)).max() <= 1
    assert source.stats()["accepted"] == 2


def test_neglected_classes_are_counted_and_kept_out_of_the_masks(tiny_sd1, fast):
    two = dataclasses.replace(fast["generator"], classes_per_prompt=2)
    keep_all = DiffuMaskGenerator(tiny_sd1, ["dog", "bird"], **{**fast, "generator": two})
    strict = DiffuMaskGenerator(tiny_sd1, ["dog", "bird"], **{**fast, "generator": two, "mask": MaskConfig(neglect_ratio=0.99)})
    kept, pruned = keep_all.samples(range(6)), strict.samples(range(6))
    classes = [set(np.unique(s.mask).tolist()) - {0, 255} for s in pruned]
    assert keep_all.counts()["neglected_classes"] == 0
    assert strict.counts()["neglected_classes"] == sum(
        len(set(np.unique(k.mask).tolist()) - {0, 255}) - len(c) for k, c in zip(kept, classes)) > 0
    assert all(len(c) >= 1 for c in classes), "the strongest class is never neglected"
    for k, p in zip(kept, pruned):
        assert np.array_equal(k.image, p.image), "the rule changes labels, never the image"
