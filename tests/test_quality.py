import pytest
import torch

from ondemand_seg import DiffuMaskStream, QualityConfig, TooManyRejects
from ondemand_seg.masks.quality import REJECT_REASONS, GateStats, RejectCounter, gate
from ondemand_seg.pipelines.builtin import RANDOM_WEIGHTS_MODEL


def good():
    image = torch.rand(3, 8, 8)
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[2:6, 2:6] = 12
    return image, mask


def test_gate_reasons():
    cfg = QualityConfig()
    image, mask = good()
    nan = image.clone()
    nan[0, 0, 0] = float("nan")
    full = torch.full_like(mask, 12)
    full_with_ignore = full.clone()
    full_with_ignore[0] = 255
    empty = torch.zeros_like(mask)
    empty[0] = 255
    images = torch.stack([image, nan, torch.zeros_like(image), image, image, image])
    masks = torch.stack([mask, mask, mask, empty, full, full_with_ignore])
    assert gate(images, masks, cfg) == [None, "non-finite image", "all-black image", "empty mask", "full mask", "full mask"]


def test_a_one_colour_image_is_rejected_under_its_own_reason_even_with_a_good_mask():
    image, mask = good()
    grey = torch.full_like(image, 0.5)
    tinted = torch.stack([torch.full((8, 8), v) for v in (0.9, 0.2, 0.4)])
    speckled = grey + 0.005 * torch.randn_like(grey)  # decoder noise on one colour: still constant
    faint = grey.clone()
    faint[:, 2:6, 2:6] = 0.55  # a faint object on one colour is an image, not a constant
    images = torch.stack([image, grey, tinted, speckled, faint])
    reasons = gate(images, torch.stack([mask] * 5), QualityConfig())
    assert reasons == [None, "constant image", "constant image", "constant image", None]
    strict = QualityConfig(constant_level=0.001)
    assert gate(images[1:4], torch.stack([mask] * 3), strict) == ["constant image", "constant image", None]
    assert gate(torch.zeros_like(image)[None], mask[None], QualityConfig()) == ["all-black image"], "black stays black"
    stats = GateStats()
    stats.add(reasons)
    assert stats.as_dict()["constant image"] == 3


def test_gate_rejects_non_finite_attention_under_its_own_reason():
    cfg = QualityConfig()
    image, mask = good()
    nan = image.clone()
    nan[0, 0, 0] = float("nan")
    images, masks = torch.stack([image, image, nan, image]), torch.stack([mask] * 4)
    finite_maps = torch.tensor([True, False, False, True])
    # A good-looking mask does not save a sample whose attention was corrupt; a broken image is named first.
    assert gate(images, masks, cfg, finite_maps=finite_maps) == [None, "non-finite attention", "non-finite image", None]
    assert gate(images, masks, cfg) == [None, None, "non-finite image", None], "None means not checked"
    with pytest.raises(ValueError, match=r"finite_maps must be a \[4\] bool tensor .* got torch.bool of shape \(3,\)"):
        gate(images, masks, cfg, finite_maps=finite_maps[:3])
    with pytest.raises(ValueError, match=r"got torch.int64 of shape \(4,\)"):
        gate(images, masks, cfg, finite_maps=finite_maps.long())


def test_too_many_rejects_explains_each_reason_seen():
    counter = RejectCounter(3)
    with pytest.raises(TooManyRejects) as raised:
        counter.update(["empty mask", "non-finite attention", "non-finite attention"])
    message = str(raised.value)
    assert "'non-finite attention': 2" in message and "'empty mask': 1" in message
    assert "non-finite attention: the captured attention held NaN/inf: a numerics or dtype problem" in message
    assert "empty mask: the threshold is too high" in message
    assert "full mask" not in message and "non-finite image" not in message, "only the reasons seen are explained"
    with pytest.raises(ValueError, match=r"unknown reject reason 'cosmic ray'"):
        RejectCounter(3).update(["cosmic ray"])


def test_reject_counter_raises_after_too_many_in_a_row():
    counter = RejectCounter(3)
    counter.update(["empty mask", "empty mask", None, "full mask", "empty mask"])
    assert counter.by_reason == {"empty mask": 3, "full mask": 1}
    with pytest.raises(TooManyRejects, match="rejected 3 samples in a row"):
        counter.update(["all-black image"])


def test_gate_stats_count():
    stats = GateStats()
    stats.add([None, "empty mask", None, "non-finite attention"])
    assert stats.as_dict()["generated"] == 4 and stats.as_dict()["accepted"] == 2
    assert stats.as_dict()["empty mask"] == 1 and stats.as_dict()["non-finite attention"] == 1
    assert set(stats.as_dict()) == {"generated", "accepted", *REJECT_REASONS}


def test_stream_stops_with_a_clear_error_instead_of_looping(fast):
    # No mask can cover 99% foreground on a random model: every sample is rejected as empty.
    stream = DiffuMaskStream(RANDOM_WEIGHTS_MODEL, ["dog"], quality=QualityConfig(min_foreground=0.99, max_foreground=1.0, max_consecutive_rejects=5), **fast)
    with pytest.raises(TooManyRejects, match=r"5 samples in a row .*'empty mask': 5"):
        next(iter(stream))
    assert stream.stats()["empty mask"] >= 5 and stream.stats()["accepted"] == 0


def test_rejected_sample_is_redrawn_not_passed_on(fast, monkeypatch):
    import ondemand_seg.generation.generator as source

    real_gate = source.gate
    calls = []

    def reject_first_batch(images, masks, config, **checks):
        calls.append(images.shape[0])
        reasons = real_gate(images, masks, config, **checks)
        return ["non-finite image"] * len(reasons) if len(calls) == 1 else reasons

    monkeypatch.setattr(source, "gate", reject_first_batch)
    stream = DiffuMaskStream(RANDOM_WEIGHTS_MODEL, ["dog"], num_samples=4, augment=False, **fast)
    images = [image for image, _ in stream]
    assert len(images) == 4
    assert stream.stats()["non-finite image"] == 4 and stream.stats()["accepted"] == 4


def test_a_nan_in_one_attention_map_is_rejected_counted_and_never_served(tiny_sd1, fast, monkeypatch):
    import numpy as np

    from ondemand_seg.generation.generator import DiffuMaskGenerator

    clean = DiffuMaskGenerator(tiny_sd1, ["dog"], **fast)
    expected = clean.samples([0, 1])
    assert expected[0].attempt == 0, "premise: without the NaN, sample 0's first attempt is accepted"
    source = DiffuMaskGenerator(tiny_sd1, ["dog"], **fast)
    store = source.capturing.store
    real_add, calls = store.add, []

    def add_with_one_nan(class_maps):
        # First layer of the first batch: one attention pixel of image 0 (sample 0, attempt 0).
        if not calls:
            class_maps = class_maps.clone()
            class_maps[0, 0, 0] = float("nan")
        calls.append(class_maps.shape)
        real_add(class_maps)

    monkeypatch.setattr(store, "add", add_with_one_nan)
    drawn = source.samples([0, 1])
    stats, clean_stats = source.stats(), clean.stats()
    assert stats["non-finite attention"] == 1 and clean_stats["non-finite attention"] == 0
    assert stats["generated"] == clean_stats["generated"] + 1 and stats["accepted"] == 2
    assert [(s.index, s.attempt) for s in drawn] == [(0, 1), (1, expected[1].attempt)], \
        "sample 0's corrupt attempt is redrawn, not served"
    assert np.array_equal(drawn[1].mask, expected[1].mask), "the other sample of the batch is untouched"


def test_images_are_judged_as_served_and_masks_only_hold_label_ids():
    image, mask = good()
    overexposed = image + 3.0  # far outside [0, 1]: clamped it would be white
    hot_pixel = torch.zeros(3, 64, 64)
    hot_pixel[:, 5, 5] = 1.0  # black but for one pixel
    big_mask = torch.zeros(64, 64, dtype=torch.long)
    big_mask[10:40, 10:40] = 3
    outside = mask.clone()
    outside[3, 3] = 256  # would wrap to 0 in uint8
    unknown = mask.clone()
    unknown[3, 3] = 13  # beyond a 13-class label space (ids 0-12)
    negative = mask.clone()
    negative[0, 0] = -1
    small = torch.stack([overexposed, image, image, image])
    assert gate(small, torch.stack([mask, outside, unknown, negative]), QualityConfig(), num_classes=13) == [
        "out-of-range image", "invalid label ids", "invalid label ids", "invalid label ids"]
    assert gate(image[None], unknown[None], QualityConfig()) == [None], "without a class count ids are not checked"
    assert gate(image[None], unknown[None], QualityConfig(), num_classes=14) == [None], "13 is an id of 14 classes"
    assert gate(hot_pixel[None], big_mask[None], QualityConfig()) == ["all-black image"]
    white_with_specks = torch.ones(3, 64, 64)
    white_with_specks[:, 0, :30] = 0.0  # under 1% of the pixels: a decoder scaled to [0, 255], clamped
    assert gate(white_with_specks[None], big_mask[None], QualityConfig()) == ["constant image"]


def test_a_decoder_on_another_scale_is_rejected_before_clamping_while_vae_overshoot_passes():
    image, mask = good()
    image = torch.rand(3, 32, 32)
    mask = torch.zeros(32, 32, dtype=torch.long)
    mask[8:24, 8:24] = 12
    dark = image.clone()
    dark.view(-1)[::33] *= 0.003  # 3% of values near black
    on_255 = dark * 255  # clamped it is 97% white: the case the other reasons let through
    on_pm1 = image * 2 - 1  # a [-1, 1] decoder not denormalized: half the values below 0
    overshoot = image * 1.1 - 0.05  # an ordinary VAE's overshoot: ~9% of values a little outside [0, 1]
    spikes = image.clone()
    spikes.view(-1)[::25] = 1.2  # 4% of values further out, still inside the margin
    images = torch.stack([image, on_255, on_pm1, overshoot, spikes])
    masks = torch.stack([mask] * 5)
    assert gate(images, masks, QualityConfig()) == [None, "out-of-range image", "out-of-range image", None, None]
    # Judged on what the decoder gave, before the pipeline clamped it.
    clamped = images.clamp(0, 1)
    assert gate(clamped, masks, QualityConfig()) == [None, None, None, None, None], "premise: clamped, they pass"
    assert gate(clamped, masks, QualityConfig(), decoded=images)[1:3] == ["out-of-range image"] * 2
    inf = image.clone()
    inf[0, 0, 0] = float("inf")
    assert gate(clamped[:1], masks[:1], QualityConfig(), decoded=inf[None]) == ["non-finite image"]
    assert gate(images, masks, QualityConfig(max_out_of_range=1.0))[1:3] == [None, None], "1: not checked"
    assert gate(images, masks, QualityConfig(range_margin=0.0, max_out_of_range=0.02))[3] == "out-of-range image"
    for bad in (dict(range_margin=-0.1), dict(max_out_of_range=1.5), dict(max_out_of_range=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            QualityConfig(**bad)


def test_a_decoder_scaled_to_255_stops_the_stream_under_its_own_reason(fast):
    stream = DiffuMaskStream(RANDOM_WEIGHTS_MODEL, ["dog"], augment=False,
                             quality=QualityConfig(max_consecutive_rejects=4), **fast)
    vae = stream.source.capturing.pipeline.vae
    decode = vae.decode

    def decode_to_255(latents, *args, **kwargs):
        out = decode(latents, *args, **kwargs)
        return ((out[0] * 0.5 + 0.5) * 255 * 2 - 1,)  # what denormalizes to [0, 255]

    vae.decode = decode_to_255
    with pytest.raises(TooManyRejects, match=r"'out-of-range image': 4.*QualityConfig.max_out_of_range"):
        next(iter(stream))
    assert stream.stats()["accepted"] == 0


def test_a_copy_of_the_gate_counts_counts_on_its_own_from_the_counts_it_was_made_with():
    import copy
    import pickle

    for shared in (True, False):
        stats = GateStats(shared=shared)
        stats.add([None, "constant image"])
        for clone in (copy.deepcopy(stats), pickle.loads(pickle.dumps(stats))):
            clone.add([None])
            assert clone.as_dict()["generated"] == 3 and clone.as_dict()["constant image"] == 1
        assert stats.as_dict()["generated"] == 2, "the copies' counts are their own"
