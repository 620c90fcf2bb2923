"""Property tests of the mask math and the gate on arbitrary maps: NaN, inf, constant and empty
maps, any class count, any γ and ignore band."""
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ondemand_seg import MaskConfig, QualityConfig
from ondemand_seg.generation.capture import CapturedAttention
from ondemand_seg.masks.labelling import finite_samples, masks_from_attention
from ondemand_seg.masks.maps import labels_from_maps, normalize_maps, otsu_thresholds
from ondemand_seg.masks.quality import gate

# Few examples and no example database (nothing written into the checkout): the suite stays fast.
PROPERTY = settings(max_examples=40, deadline=None, database=None)

NON_FINITE = (math.nan, math.inf, -math.inf)
VALUES = st.one_of(st.floats(0, 1e3, width=32), st.sampled_from((0.0, 0.5, 1.0)), st.sampled_from(NON_FINITE))
MAP_KINDS = ("random", "random", "zero", "constant", "all-nan", "one-nan")


@st.composite
def attention(draw, shape):
    """``shape`` maps ``[B, K, h, w]`` of mixed kinds: random values (some non-finite), all zero,
    constant, all NaN, or finite with one NaN pixel."""
    maps = torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=VALUES)).copy())
    for b in range(shape[0]):
        for k in range(shape[1]):
            kind = draw(st.sampled_from(MAP_KINDS))
            if kind == "zero":
                maps[b, k] = 0.0
            elif kind == "constant":
                maps[b, k] = draw(st.floats(0.001, 1000.0))
            elif kind == "all-nan":
                maps[b, k] = math.nan
            elif kind == "one-nan":
                maps[b, k] = maps[b, k].nan_to_num(0.0, posinf=1.0, neginf=0.0)
                maps[b, k].view(-1)[draw(st.integers(0, maps[b, k].numel() - 1))] = math.nan
    return maps


@st.composite
def labelling_case(draw):
    b, k, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    maps = draw(attention((b, k, h, w)))
    class_ids = torch.tensor(draw(st.lists(st.integers(0, 20), min_size=b * k, max_size=b * k))).view(b, k)
    thresholds = torch.tensor(draw(st.lists(st.floats(0.01, 0.99), min_size=b * k, max_size=b * k))).view(b, k)
    band = draw(st.floats(0, 0.49))
    mode = draw(st.sampled_from(("max", "minmax")))
    return maps, class_ids, thresholds, band, mode


def repaired(maps: torch.Tensor) -> torch.Tensor:
    """``maps`` with each map's non-finite pixels set to that map's smallest finite value: the
    same finite peak and floor, so normalisation scales every finite pixel the same way."""
    flat = maps.flatten(-2)
    finite = torch.isfinite(flat)
    floor = torch.where(finite, flat, torch.full_like(flat, math.inf)).amin(-1, keepdim=True)
    floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
    return torch.where(finite, flat, floor).view_as(maps)


@PROPERTY
@given(labelling_case())
def test_normalize_keeps_finite_pixels_in_unit_range_and_marks_the_rest(case):
    maps, _, _, _, mode = case
    out = normalize_maps(maps, mode)
    assert torch.equal(torch.isfinite(out), torch.isfinite(maps))
    known = out[torch.isfinite(out)]
    assert ((known >= 0) & (known <= 1)).all()


@PROPERTY
@given(labelling_case())
def test_labels_are_ids_background_or_ignore_and_unknown_pixels_are_ignore(case):
    maps, class_ids, thresholds, band, mode = case
    labels = labels_from_maps(normalize_maps(maps, mode), class_ids, thresholds, band)
    used = (class_ids > 0)[..., None, None]
    for b in range(maps.shape[0]):
        allowed = {0, 255} | set(class_ids[b].tolist())
        assert set(labels[b].unique().tolist()) <= allowed
    unknown = (used & ~torch.isfinite(maps)).any(1)
    assert (labels[unknown] == 255).all(), "a non-finite pixel is never a class or background"


@PROPERTY
@given(labelling_case())
def test_a_non_finite_pixel_changes_no_other_pixel(case):
    maps, class_ids, thresholds, band, mode = case
    labels = labels_from_maps(normalize_maps(maps, mode), class_ids, thresholds, band)
    clean = labels_from_maps(normalize_maps(repaired(maps), mode), class_ids, thresholds, band)
    known = ((class_ids == 0)[..., None, None] | torch.isfinite(maps)).all(1)
    assert torch.equal(labels[known], clean[known])


@PROPERTY
@given(labelling_case())
def test_a_class_above_its_threshold_somewhere_finite_is_never_lost(case):
    maps, class_ids, thresholds, band, mode = case
    labels = labels_from_maps(normalize_maps(maps, mode), class_ids, thresholds, band)
    # Where every used map is finite, the values the class should be judged by are its map's own,
    # scaled by its finite peak (and floor).
    reference = normalize_maps(repaired(maps), mode)
    used = class_ids > 0
    for b in range(maps.shape[0]):
        clear = torch.isfinite(maps[b][used[b]]).all(0)  # [h, w]
        for k in torch.nonzero(used[b]).flatten().tolist():
            others = reference[b][used[b] & (torch.arange(len(used[b])) != k)]
            wins = clear & (reference[b, k] >= thresholds[b, k] + band)
            if len(others):
                wins &= (reference[b, k] > others).all(0)
            assert (labels[b][wins] == class_ids[b, k]).all()


@PROPERTY
@given(st.integers(1, 3), st.integers(1, 3), st.data())
def test_otsu_thresholds_stay_in_range_whatever_the_map(b, k, data):
    maps = normalize_maps(data.draw(attention((b, k, 4, 4))))
    cut = otsu_thresholds(maps)
    assert cut.shape == (b, k) and torch.isfinite(cut).all() and ((cut > 0) & (cut < 1)).all()


@st.composite
def recording(draw):
    b, k = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    maps = {1: draw(attention((b, k, 4, 4))), 2: draw(attention((b, k, 2, 2)))}
    self_attention = None
    if draw(st.booleans()):
        self_attention = torch.softmax(torch.from_numpy(
            draw(hnp.arrays(np.float32, (b, 4, 4), elements=st.floats(-5, 5, width=32)))), -1)
        if draw(st.booleans()):
            self_attention[draw(st.integers(0, b - 1)), 0, 0] = draw(st.sampled_from(NON_FINITE))
    record = CapturedAttention(maps, self_attention, 2 if self_attention is not None else None, {1, 2}, (4, 4))
    config = MaskConfig(
        threshold=draw(st.floats(0.01, 0.99)), ignore_band=draw(st.floats(0, 0.49)),
        normalization=draw(st.sampled_from(("max", "minmax"))), threshold_mode=draw(st.sampled_from(("fixed", "otsu"))),
        refine=draw(st.sampled_from(("none", "affinity"))), refine_iterations=2,
        self_attention_factor=2 if self_attention is not None else None)
    class_ids = torch.tensor(draw(st.lists(st.integers(0, 20), min_size=b * k, max_size=b * k))).view(b, k)
    return record, config, class_ids


@PROPERTY
@given(recording())
def test_full_labelling_flags_every_corrupt_sample_and_labels_only_known_ids(case):
    record, config, class_ids = case
    b = class_ids.shape[0]
    images = torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    names = [["dog"] * int((row > 0).sum()) for row in class_ids]
    fused, masks = masks_from_attention(record, images, class_ids, names, config)
    finite = finite_samples(record)
    recorded = list(record.maps.values()) + ([record.self_attention] if record.self_attention is not None else [])
    assert finite.tolist() == [all(torch.isfinite(r[i]).all() for r in recorded) for i in range(b)]
    for i in range(b):
        assert set(masks[i].unique().tolist()) <= {0, 255} | set(class_ids[i].tolist())
    unknown = ((class_ids > 0)[..., None, None] & ~torch.isfinite(fused)).any(1)
    assert (masks[unknown] == 255).all()
    assert torch.isfinite(fused[finite]).all(), "a sample with a clean recording has clean maps"
    reasons = gate(images, masks, QualityConfig(), finite_maps=finite)
    assert all(r == "non-finite attention" for r, ok in zip(reasons, finite) if not ok)


@PROPERTY
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=6))
def test_gate_rejects_every_sample_with_non_finite_maps(flags):
    images = torch.rand(len(flags), 3, 8, 8)
    masks = torch.zeros(len(flags), 8, 8, dtype=torch.long)
    masks[:, 2:6, 2:6] = 12
    for i, (image_ok, _) in enumerate(flags):
        if not image_ok:
            images[i, 0, 0, 0] = math.nan
    finite_maps = torch.tensor([maps_ok for _, maps_ok in flags])
    reasons = gate(images, masks, QualityConfig(), finite_maps=finite_maps)
    for reason, (image_ok, maps_ok) in zip(reasons, flags):
        expected = None if image_ok and maps_ok else "non-finite image" if not image_ok else "non-finite attention"
        assert reason == expected
