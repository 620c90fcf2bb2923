import pytest
import torch
import torch.nn.functional as F

from ondemand_seg.masks.maps import (
    aggregate_heads,
    calibrate_threshold,
    fuse_resolutions,
    head_weights,
    labels_from_maps,
    neglected_classes,
    normalize_maps,
    otsu_thresholds,
    propagate_self_attention,
    refine_with_affinity,
    rescale_token_mass,
    separation,
    sharpen_attention,
)


def blob(size, top, left, height, width, value=1.0):
    m = torch.zeros(size, size)
    m[top : top + height, left : left + width] = value
    return m


def test_normalize_maps_max_and_minmax():
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    assert torch.allclose(normalize_maps(maps, "max"), maps / 5)
    assert torch.allclose(normalize_maps(maps, "minmax"), (maps - 1) / 4)
    flat = torch.full((1, 1, 3, 3), 7.0)
    assert normalize_maps(flat, "minmax").abs().max() == 0
    with pytest.raises(ValueError, match="'sum'"):
        normalize_maps(maps, "sum")


def test_normalize_maps_median_removes_the_floor_under_the_median():
    # A 3x3 map: a floor of 2 on six pixels (the median), an object of 3 pixels at 4, 5 and 6.
    maps = torch.tensor([[[[2.0, 2.0, 2.0], [2.0, 4.0, 5.0], [2.0, 1.0, 6.0]]]])
    out = normalize_maps(maps, "median")
    expected = (maps.clamp_min(2.0) - 2.0) / 4.0
    assert torch.allclose(out, expected)
    assert out[0, 0, 2, 1] == 0, "below the floor is clipped to 0, not negative"
    # minmax keeps the floor at a fifth of the range, above a low γ such as 0.15.
    assert (normalize_maps(maps, "minmax")[maps == 2.0] > 0.15).all() and (out[maps == 2.0] == 0).all()
    assert normalize_maps(torch.full((1, 1, 3, 3), 7.0), "median").abs().max() == 0


def test_normalize_maps_is_per_map():
    maps = torch.stack([blob(4, 0, 0, 2, 2, 3.0), blob(4, 2, 2, 2, 2, 0.5)])[None]
    out = normalize_maps(maps)
    assert out[0, 0].max() == 1 and out[0, 1].max() == 1


def test_fuse_resolutions_upsamples_and_weights():
    coarse = blob(4, 0, 0, 2, 2)[None, None]  # top-left quarter
    fine = blob(8, 4, 4, 4, 4)[None, None]  # bottom-right quarter
    only_fine = fuse_resolutions({2: coarse, 1: fine}, {1: 1.0, 2: 0.0}, (16, 16))
    assert only_fine.shape == (1, 1, 16, 16)
    assert only_fine[0, 0, 12, 12] == 1 and only_fine[0, 0, 2, 2] == 0
    mostly_coarse = fuse_resolutions({2: coarse, 1: fine}, {1: 1.0, 2: 3.0}, (16, 16))
    assert mostly_coarse[0, 0, 2, 2] > mostly_coarse[0, 0, 13, 13] > mostly_coarse[0, 0, 2, 13]


def test_fuse_resolutions_names_missing_factor():
    with pytest.raises(ValueError, match=r"factor\(s\) \[4\].*captured factors: \[1, 2\]"):
        fuse_resolutions({1: torch.rand(1, 1, 8, 8), 2: torch.rand(1, 1, 4, 4)}, {1: 1, 2: 1, 4: 1}, (8, 8))


def test_labels_threshold_and_ignore_band():
    fused = torch.tensor([0.1, 0.35, 0.42, 0.5, 0.9]).view(1, 1, 1, 5)
    labels = labels_from_maps(fused, torch.tensor([[7]]), torch.tensor([[0.4]]), ignore_band=0.05)
    assert labels.tolist() == [[[0, 255, 255, 7, 7]]]
    no_band = labels_from_maps(fused, torch.tensor([[7]]), torch.tensor([[0.4]]), ignore_band=0.0)
    assert no_band.tolist() == [[[0, 0, 7, 7, 7]]]


def test_labels_highest_class_wins_with_own_threshold():
    dog = torch.tensor([0.9, 0.3, 0.50, 0.0])
    cat = torch.tensor([0.6, 0.8, 0.45, 0.0])
    fused = torch.stack([dog, cat]).view(1, 2, 1, 4)
    ids = torch.tensor([[12, 8]])
    labels = labels_from_maps(fused, ids, torch.tensor([[0.4, 0.4]]), ignore_band=0.0)
    assert labels.tolist() == [[[12, 8, 12, 0]]]
    # A stricter threshold for dog hands the third pixel to cat, which clears its own.
    labels = labels_from_maps(fused, ids, torch.tensor([[0.6, 0.4]]), ignore_band=0.0)
    assert labels.tolist() == [[[12, 8, 8, 0]]]


def test_labels_ignore_unused_slots():
    fused = torch.ones(2, 2, 3, 3)
    ids = torch.tensor([[5, 0], [5, 9]])
    labels = labels_from_maps(fused, ids, torch.full((2, 2), 0.4), 0.05)
    assert set(labels[0].unique().tolist()) == {5}
    assert set(labels[1].unique().tolist()) <= {5, 9}


def test_otsu_cuts_between_modes_per_map():
    low = torch.rand(1, 1, 16, 16) * 0.2
    high = blob(16, 4, 4, 8, 8, 0.7)[None, None]
    maps = torch.cat([low + high, low * 0.5 + high * 0.5], dim=1)  # modes near (0.1, 0.8) and (0.05, 0.4)
    cuts = otsu_thresholds(maps)
    assert cuts.shape == (1, 2)
    assert 0.2 < cuts[0, 0] < 0.7 and 0.1 < cuts[0, 1] < 0.35


def test_calibrate_threshold_finds_the_gap():
    truth = blob(16, 2, 2, 6, 6).bool()
    inside = 0.55 + 0.1 * torch.rand(16, 16)
    outside = 0.5 * torch.rand(16, 16)
    fused = torch.where(truth, inside, outside)
    gamma = calibrate_threshold([fused, fused.flip(0)], [truth, truth.flip(0)])
    assert 0.5 <= gamma <= 0.55
    with pytest.raises(ValueError, match="as many truths as maps"):
        calibrate_threshold([fused], [])


def test_affinity_refinement_snaps_a_blurry_map_to_the_object_edge():
    truth = blob(32, 8, 8, 12, 12).bool()
    image = torch.full((1, 3, 32, 32), 0.5)
    image[0, 0][truth] = 1.0
    image[0, 1][truth] = 0.0
    blurry = F.avg_pool2d(truth.float()[None, None], 9, stride=1, padding=4)
    blurry = torch.roll(blurry, shifts=(2, 2), dims=(2, 3))  # off by two pixels, like coarse attention
    def iou(m):
        pred = normalize_maps(m)[0, 0] >= 0.5
        return (pred & truth).sum() / (pred | truth).sum()
    refined = refine_with_affinity(blurry, image, iterations=10)
    assert refined.shape == blurry.shape and 0 <= refined.min() and refined.max() <= 1
    assert iou(refined) > iou(blurry) + 0.05


def test_propagate_self_attention():
    cross = torch.zeros(1, 1, 4)
    cross[0, 0, 0] = 1.0
    identity = torch.eye(4)[None]
    assert torch.equal(propagate_self_attention(cross, identity), cross)
    blocks = torch.block_diag(torch.full((2, 2), 0.5), torch.full((2, 2), 0.5))[None]
    spread = propagate_self_attention(cross, blocks, power=2)
    assert spread[0, 0].tolist() == [0.5, 0.5, 0.0, 0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mode", ["max", "minmax"])
def test_one_non_finite_pixel_stays_one_unknown_pixel(bad, mode):
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    poisoned = maps.clone()
    poisoned[0, 0, 0, 0] = bad
    out = normalize_maps(poisoned, mode)
    assert out[0, 0, 0, 0].isnan(), "the unknown pixel is marked, not given a value"
    clean = normalize_maps(torch.tensor([[[[2.0, 2.0], [3.0, 5.0]]]]), mode)  # same finite min and max
    assert torch.equal(out.flatten()[1:], clean.flatten()[1:]), "the other pixels are scaled as without it"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_median_floor_comes_from_the_finite_pixels_only(bad):
    maps = torch.tensor([[[[bad, 2.0], [3.0, 5.0]]]])
    out = normalize_maps(maps, "median")  # floor: the median of 2, 3, 5
    assert out[0, 0, 0, 0].isnan() and out.flatten()[1:].tolist() == [0.0, 0.0, 1.0]
    none_known = normalize_maps(torch.full((1, 1, 2, 2), float("nan")), "median")
    assert none_known.isnan().all()


def test_all_non_finite_map_is_all_unknown_and_its_neighbour_is_untouched():
    maps = torch.stack([torch.full((3, 3), float("nan")), blob(3, 0, 0, 2, 2, 4.0)])[None]
    out = normalize_maps(maps)
    assert out[0, 0].isnan().all() and torch.equal(out[0, 1], blob(3, 0, 0, 2, 2))


def test_labels_non_finite_pixels_are_ignore_never_a_class_or_background():
    # The attack: one NaN pixel in the dog map used to turn the whole map NaN and every pixel background.
    dog = torch.tensor([[0.9, 0.1, float("nan"), 0.8]])
    cat = torch.tensor([[0.0, 0.7, 0.9, float("inf")]])
    fused = normalize_maps(torch.stack([dog, cat])[None])
    labels = labels_from_maps(fused, torch.tensor([[12, 8]]), torch.full((1, 2), 0.4), ignore_band=0.05)
    assert labels.tolist() == [[[12, 8, 255, 255]]]
    # A non-finite value in an unused slot changes nothing.
    unused = labels_from_maps(fused, torch.tensor([[0, 8]]), torch.full((1, 2), 0.4), ignore_band=0.05)
    assert unused.tolist() == [[[0, 8, 8, 255]]]


def test_labels_reject_bad_threshold_and_band():
    fused, ids = torch.rand(1, 1, 2, 2), torch.tensor([[3]])
    with pytest.raises(ValueError, match=r"thresholds must be finite, got \[\[nan\]\]"):
        labels_from_maps(fused, ids, torch.tensor([[float("nan")]]), 0.05)
    with pytest.raises(ValueError, match="ignore_band must be a finite number >= 0, got -0.1"):
        labels_from_maps(fused, ids, torch.tensor([[0.4]]), -0.1)


def test_otsu_skips_non_finite_pixels():
    low = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.2
    maps = low + blob(16, 4, 4, 8, 8, 0.7)[None, None]
    clean = otsu_thresholds(maps)
    poisoned = maps.clone()
    poisoned[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    cut = otsu_thresholds(poisoned)
    assert 0.2 < cut[0, 0] < 0.7 and abs(float(cut[0, 0] - clean[0, 0])) < 0.05
    nothing = otsu_thresholds(torch.full((1, 1, 4, 4), float("nan")))
    assert torch.isfinite(nothing).all() and 0 < nothing[0, 0] < 1


def test_calibrate_threshold_ignores_non_finite_pixels():
    # Known pixels: 6 sure (0.8) and 4 faint (0.5) object pixels, 8 background pixels at 0.55, so a
    # γ above 0.55 wins (IoU 6/10 against 10/18). Ten unknown object pixels counted as misses would
    # tip it below 0.5 (10/28 against 6/20).
    truth = torch.tensor([True] * 20 + [False] * 8)
    fused = torch.tensor([float("nan")] * 10 + [0.8] * 6 + [0.5] * 4 + [0.55] * 8)
    assert 0.55 < calibrate_threshold([fused], [truth]) <= 0.8


def test_a_class_far_fainter_than_the_strongest_is_neglected():
    # Image 0: slot 1 peaks at 0.04 against slot 0's 0.8 (neglected at ratio 0.5); image 1: both drawn.
    maps = torch.zeros(2, 3, 4, 4)
    maps[0, 0, 1, 1], maps[0, 1, 2, 2] = 0.8, 0.04
    maps[1, 0, 1, 1], maps[1, 1, 2, 2] = 0.5, 0.6
    ids = torch.tensor([[4, 7, 0], [4, 7, 0]])
    assert neglected_classes({1: maps}, {1: 1.0}, ids, 0.5).tolist() == [[False, True, False], [False, False, False]]
    assert not neglected_classes({1: maps}, {1: 1.0}, ids, 0.0).any(), "ratio 0 keeps every class"
    # Unused slots are never neglected, even when empty; a single named class never is.
    assert neglected_classes({1: maps}, {1: 1.0}, torch.tensor([[4, 0, 0], [0, 7, 0]]), 0.9).tolist() == [
        [False, False, False], [False, False, False]]


def test_neglect_compares_weighted_peaks_over_the_fused_grids():
    fine, coarse = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)
    fine[0, 0, 0, 0], fine[0, 1, 3, 3] = 1.0, 0.1    # slot 1 faint on the fine grid
    coarse[0, 0, 0, 0], coarse[0, 1, 1, 1] = 0.2, 1.0  # and strong on the coarse one
    ids = torch.tensor([[3, 5]])
    maps = {1: fine, 2: coarse}
    assert neglected_classes(maps, {1: 1.0, 2: 0.0}, ids, 0.5).tolist() == [[False, True]]
    # Equal weights: peaks 0.6 and 0.55, both kept.
    assert neglected_classes(maps, {1: 1.0, 2: 1.0}, ids, 0.5).tolist() == [[False, False]]
    with pytest.raises(ValueError, match=r"factor\(s\) \[4\]"):
        neglected_classes(maps, {1: 1.0, 4: 1.0}, ids, 0.5)


def test_a_slot_with_no_finite_value_is_not_called_neglected():
    maps = torch.zeros(1, 2, 3, 3)
    maps[0, 0, 1, 1] = 0.9
    maps[0, 1] = float("nan")
    # Its pixels must stay unknown (255) in labels_from_maps, which an unused slot would not give.
    assert neglected_classes({1: maps}, {1: 1.0}, torch.tensor([[2, 6]]), 0.5).tolist() == [[False, False]]
    maps[0, 0] = float("nan")
    assert not neglected_classes({1: maps}, {1: 1.0}, torch.tensor([[2, 6]]), 0.5).any()


def heads_of(*maps):
    """``[1, 1, M, h, w]`` layer-head maps from ``[h, w]`` ones."""
    return torch.stack(maps)[None, None]


def test_mean_aggregation_is_the_plain_mean():
    maps = heads_of(blob(8, 0, 0, 4, 4), blob(8, 2, 2, 4, 4))
    assert torch.equal(head_weights(maps, "mean"), torch.ones(1, 1, 2))
    assert torch.allclose(aggregate_heads(maps, "mean"), maps.mean(2))


def test_agreement_drops_the_head_that_looks_elsewhere():
    noise = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    on_object = [blob(8, 2, 2, 4, 4) + noise, blob(8, 2, 3, 4, 4), blob(8, 3, 2, 4, 4)]
    elsewhere = 1 - blob(8, 2, 2, 4, 4)  # the complement: mass everywhere but the object
    weights = head_weights(heads_of(*on_object, elsewhere), "agreement")
    assert weights.shape == (1, 1, 4) and weights[0, 0, 3] == 0 and (weights[0, 0, :3] > 0.5).all()
    fused = aggregate_heads(heads_of(*on_object, elsewhere), "agreement")[0, 0]
    assert fused.shape == (8, 8) and fused[4, 4] > fused[0, 0] + 0.5


def test_entropy_weighs_peaked_maps_over_diffuse_ones():
    peaked, diffuse = blob(8, 2, 2, 2, 2), torch.ones(8, 8)
    weights = head_weights(heads_of(peaked, diffuse), "entropy")[0, 0]
    assert torch.allclose(weights.sum(), torch.tensor(1.0)) and weights[0] > 0.99


def test_aggregation_of_constant_maps_falls_back_to_the_mean_and_keeps_unknown_pixels_unknown():
    constant = heads_of(torch.ones(4, 4), torch.ones(4, 4))
    assert torch.equal(head_weights(constant, "agreement"), torch.ones(1, 1, 2))
    with_nan = heads_of(blob(4, 0, 0, 2, 2), blob(4, 0, 0, 2, 2))
    with_nan[0, 0, 1, 3, 3] = float("nan")
    for mode in ("mean", "agreement", "entropy"):
        fused = aggregate_heads(with_nan, mode)[0, 0]
        assert fused[3, 3].isnan() and torch.isfinite(fused.flatten()[:-1]).all(), mode


def test_aggregation_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="aggregation must be one of .* got 'max'"):
        head_weights(heads_of(torch.ones(2, 2)), "max")


def test_token_rescaling_puts_a_weak_token_on_the_footing_of_a_strong_one():
    # Two positions, three text tokens: a start token that takes most mass everywhere, a class word
    # that takes little but mostly at position 0, and a second class word.
    mass = torch.tensor([[0.80, 0.15, 0.05], [0.80, 0.05, 0.15]])[None, None]  # [B, H, N, T]
    weights = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # [B, K, T]
    plain = rescale_token_mass(mass, weights, "none")
    assert torch.allclose(plain[0, 0], torch.tensor([[0.15, 0.05], [0.05, 0.15]]))
    tokens = rescale_token_mass(mass, weights, "tokens")[0, 0]
    # Each token divided by its own mean (start token 0.8, words 0.1): 1, 1.5 and 0.5, shares of 3.
    assert torch.allclose(tokens[0], torch.tensor([1.5 / 3, 0.5 / 3]), atol=1e-6)
    assert tokens[0, 0] > 3 * plain[0, 0, 0, 0]
    classes = rescale_token_mass(mass, weights, "classes")[0, 0]
    # Objectness (mean class mass 0.1) times the class's share among the classes (0.75 / 0.25).
    assert torch.allclose(classes, torch.tensor([[0.075, 0.025], [0.025, 0.075]]), atol=1e-6)


def test_class_rescaling_with_one_class_is_the_plain_map_and_unused_slots_stay_empty():
    mass = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(0)).softmax(-1)
    weights = torch.zeros(2, 2, 4)
    weights[:, 0, 1] = 1
    plain, classes = rescale_token_mass(mass, weights, "none"), rescale_token_mass(mass, weights, "classes")
    assert classes.shape == (2, 3, 2, 5)
    assert torch.allclose(classes[:, :, 0], plain[:, :, 0]) and classes[:, :, 1].abs().max() == 0
    tokens = rescale_token_mass(mass, weights, "tokens")
    assert torch.isfinite(tokens).all() and tokens[:, :, 1].abs().max() == 0
    with pytest.raises(ValueError, match="token_rescaling must be one of .* got 'softmax'"):
        rescale_token_mass(mass, weights, "softmax")


def test_sharpened_attention_keeps_rows_stochastic_and_lowers_their_entropy():
    attention = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(0)).softmax(-1)
    assert torch.equal(sharpen_attention(attention, 1.0), attention)
    sharp = sharpen_attention(attention, 4.0)
    assert torch.allclose(sharp.sum(-1), torch.ones(1, 6))
    entropy = lambda a: -(a * a.log()).sum(-1)  # noqa: E731
    assert (entropy(sharp) < entropy(attention)).all()
    assert torch.equal(sharp.argmax(-1), attention.argmax(-1))


def test_separation_is_one_for_two_levels_and_lower_for_a_ramp():
    two_levels = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    ramp = torch.linspace(0, 1, 16)[None, None]
    assert torch.allclose(separation(two_levels), torch.ones(1, 1))
    assert 0.5 < separation(ramp) < 0.9
    assert separation(torch.ones(1, 1, 4)) == 0


def test_separation_stop_stops_once_steps_no_longer_sharpen():
    # Self-attention of two segments of 4 positions each, with a little leak between them: one step
    # fills the segment a seed sits in; further steps only leak mass into the other segment.
    inside = torch.block_diag(torch.full((4, 4), 0.25), torch.full((4, 4), 0.25))
    attention = (0.9 * inside + 0.1 / 8)[None]
    cross = torch.zeros(1, 1, 8)
    cross[0, 0, 1] = 1.0
    one = propagate_self_attention(cross, attention, power=1)
    stopped = propagate_self_attention(cross, attention, power=8, stop="separation")
    fixed = propagate_self_attention(cross, attention, power=8, stop="fixed")
    assert torch.allclose(stopped, one)
    contrast = lambda m: m.amin(-1) / m.amax(-1)  # noqa: E731
    assert contrast(fixed) > 4 * contrast(stopped), "eight steps leak the map into the other segment"
    with pytest.raises(ValueError, match="self_attention_stop must be one of .* got 'never'"):
        propagate_self_attention(cross, attention, stop="never")
