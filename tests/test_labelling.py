import pytest
import torch

from ondemand_seg import MaskConfig
from ondemand_seg.generation.capture import CapturedAttention
from ondemand_seg.masks.labelling import finite_samples, masks_from_attention

ONLY_LATENT = {1: 1.0}  # one map at the latent grid; with latent size == image size nothing is resized


def captured(maps, self_attention=None, factor=None, seen=(), latent_size=None):
    """CapturedAttention of hand-made ``{factor: [B, K, h, w]}`` maps."""
    if latent_size is None:
        latent_size = tuple(maps[min(maps)].shape[-2:])
    return CapturedAttention(maps, self_attention, factor, set(seen), latent_size)


def images_like(batch, size):
    return torch.full((batch, 3, *size), 0.5)


def expected_labels(values, class_id, gamma, band):
    """The labelling rule for a single used slot, written out: class at or above γ + band, ignore
    within the band, background below."""
    return torch.where(values >= gamma + band, class_id, torch.where(values >= gamma - band, 255, 0))


def ramp(width=20):
    """0, 1/19, ..., 1: no value falls on a γ ± band boundary used below."""
    return torch.linspace(0, 1, width).view(1, width)


def test_fixed_threshold_labels_a_ramp_by_the_rule():
    maps = {1: ramp()[None, None].expand(2, 1, 1, 20).clone()}
    config = MaskConfig(resolution_weights=ONLY_LATENT, threshold=0.3, ignore_band=0.1)
    fused, masks = masks_from_attention(captured(maps), images_like(2, (1, 20)), torch.tensor([[4], [9]]),
                                        [["dog"], ["cat"]], config)
    assert fused.shape == (2, 1, 1, 20) and masks.shape == (2, 1, 20) and masks.dtype == torch.long
    assert torch.allclose(fused[:, 0], ramp().expand(2, 1, 20), atol=1e-6)
    assert torch.equal(masks[0], expected_labels(fused[0, 0], 4, 0.3, 0.1))
    assert torch.equal(masks[1], expected_labels(fused[1, 0], 9, 0.3, 0.1))
    assert set(masks[0].unique().tolist()) == {0, 4, 255}


def test_class_thresholds_apply_per_class_and_the_rest_keep_the_default():
    maps = {1: ramp()[None, None].expand(3, 1, 1, 20).clone()}
    config = MaskConfig(resolution_weights=ONLY_LATENT, threshold=0.3, ignore_band=0.05,
                        class_thresholds={"dog": 0.7})
    fused, masks = masks_from_attention(captured(maps), images_like(3, (1, 20)), torch.tensor([[4], [9], [4]]),
                                        [["dog"], ["cat"], ["dog"]], config)
    assert torch.equal(masks[0], expected_labels(fused[0, 0], 4, 0.7, 0.05))
    assert torch.equal(masks[1], expected_labels(fused[1, 0], 9, 0.3, 0.05))
    assert torch.equal(masks[2], masks[0])
    assert (masks[1] == 9).sum() > (masks[0] == 4).sum() > 0, "a stricter γ labels fewer pixels"


def test_class_thresholds_follow_slot_order_in_multi_class_prompts():
    # Two classes in one prompt with opposite ramps; only the second slot's class has its own γ.
    dog, cat = ramp().flip(-1), ramp()
    maps = {1: torch.stack([dog, cat])[None]}
    config = MaskConfig(resolution_weights=ONLY_LATENT, threshold=0.3, ignore_band=0.0, class_thresholds={"cat": 0.8})
    images, ids = images_like(1, (1, 20)), torch.tensor([[4, 9]])
    fused, masks = masks_from_attention(captured(maps), images, ids, [["dog", "cat"]], config)
    assert torch.allclose(fused[0], torch.stack([dog, cat]), atol=1e-6)
    # A slot only competes once it reaches its own γ: below 0.8 cat loses to dog even where its map is higher.
    assert torch.equal(masks[0] == 9, cat >= 0.8)
    assert torch.equal(masks[0] == 4, (dog >= 0.3) & (cat < 0.8))
    assert ((masks[0] == 4) & (cat > dog)).any()
    # Named the other way round, the stricter γ sits on the first slot.
    _, swapped = masks_from_attention(captured(maps), images, ids, [["cat", "dog"]], config)
    assert torch.equal(swapped[0] == 4, dog >= 0.8) and torch.equal(swapped[0] == 9, (cat >= 0.3) & (dog < 0.8))


def three_levels(size=(10, 10)):
    """A map with background 0 over half the pixels, a weak object (0.3) over 48% and a strong one
    (1.0) over 2%: Otsu cuts between background and the weak object."""
    m = torch.zeros(size)
    flat = m.view(-1)
    flat[50:98] = 0.3
    flat[98:] = 1.0
    return m


def test_otsu_picks_gamma_from_the_map_where_a_fixed_gamma_misses():
    maps = {1: three_levels()[None, None]}
    weak = three_levels() == 0.3
    fixed = MaskConfig(resolution_weights=ONLY_LATENT, threshold=0.4)
    _, fixed_masks = masks_from_attention(captured(maps), images_like(1, (10, 10)), torch.tensor([[6]]), [["dog"]], fixed)
    assert (fixed_masks[0][weak] == 0).all() and (fixed_masks[0] == 6).sum() == 2
    otsu = MaskConfig(resolution_weights=ONLY_LATENT, threshold_mode="otsu")
    fused, otsu_masks = masks_from_attention(captured(maps), images_like(1, (10, 10)), torch.tensor([[6]]), [["dog"]], otsu)
    assert (otsu_masks[0][weak] == 6).all() and (otsu_masks[0][three_levels() == 0] == 0).all()
    # Otsu ignores the fixed γ and any class name: the same map gives the same mask.
    otsu_other = MaskConfig(resolution_weights=ONLY_LATENT, threshold_mode="otsu", threshold=0.9)
    _, again = masks_from_attention(captured(maps), images_like(1, (10, 10)), torch.tensor([[6]]), [["cat"]], otsu_other)
    assert torch.equal(again, otsu_masks)


def test_background_floor_keeps_a_token_s_spread_attention_out_of_the_mask():
    # A token that attends everywhere at 0.5 and on its object (4 of 100 pixels) at 1.0, plus a
    # faint spot: min-max normalisation leaves the floor at 0.5, above a fixed γ of 0.4.
    values = torch.full((10, 10), 0.5)
    values[2:4, 2:4] = 1.0
    values[8, 8] = 0.0
    maps = {1: values[None, None]}
    object_pixels = values == 1.0
    plain = MaskConfig(resolution_weights=ONLY_LATENT, threshold=0.4, ignore_band=0.0)
    _, spread = masks_from_attention(captured(maps), images_like(1, (10, 10)), torch.tensor([[3]]), [["dog"]], plain)
    assert (spread[0] == 3).sum() == 99, "without the floor removed every pixel but the faint one is the class"
    floored = MaskConfig(resolution_weights=ONLY_LATENT, threshold=0.4, ignore_band=0.0, background_floor="median")
    fused, masks = masks_from_attention(captured(maps), images_like(1, (10, 10)), torch.tensor([[3]]), [["dog"]], floored)
    assert torch.equal(masks[0] == 3, object_pixels) and (masks[0][~object_pixels] == 0).all()
    assert fused.min() == 0 and fused.max() == 1


def test_resolutions_are_fused_at_image_size_with_their_weights():
    coarse = torch.zeros(1, 1, 2, 2)
    coarse[0, 0, 0, 0] = 1.0  # top-left
    fine = torch.zeros(1, 1, 4, 4)
    fine[0, 0, 2:, 2:] = 1.0  # bottom-right
    maps = captured({1: fine, 2: coarse}, latent_size=(4, 4))
    ids = torch.tensor([[3]])
    fused, masks = masks_from_attention(maps, images_like(1, (8, 8)), ids, [["dog"]], MaskConfig(resolution_weights={1: 1.0}))
    assert fused.shape == (1, 1, 8, 8) and (masks[0, 4:, 4:] == 3).all() and (masks[0, :4, :4] == 0).all()
    fused, masks = masks_from_attention(maps, images_like(1, (8, 8)), ids, [["dog"]],
                                        MaskConfig(resolution_weights={1: 1.0, 2: 4.0}))
    assert masks[0, 0, 0] == 3 and fused[0, 0, 0, 0] > fused[0, 0, 7, 7]
    with pytest.raises(ValueError, match=r"factor\(s\) \[4\].*captured factors: \[1, 2\]"):
        masks_from_attention(maps, images_like(1, (8, 8)), ids, [["dog"]], MaskConfig(resolution_weights={1: 1, 4: 1}))
    # Weights not set (no model to ask): every captured factor, equally.
    unset, _ = masks_from_attention(maps, images_like(1, (8, 8)), ids, [["dog"]], MaskConfig())
    equal, _ = masks_from_attention(maps, images_like(1, (8, 8)), ids, [["dog"]],
                                    MaskConfig(resolution_weights={1: 1.0, 2: 1.0}))
    assert torch.equal(unset, equal)


def test_unused_slots_never_label_pixels():
    # Slot 1 of image 0 is unused (id 0) and its map is the strongest everywhere; image 1 uses both slots.
    strong = torch.ones(4, 4)
    weak = torch.zeros(4, 4)
    weak[:2] = 1.0
    maps = {1: torch.stack([torch.stack([weak, strong]), torch.stack([weak, strong])])}
    config = MaskConfig(resolution_weights=ONLY_LATENT, normalization="max")
    fused, masks = masks_from_attention(captured(maps), images_like(2, (4, 4)), torch.tensor([[5, 0], [5, 7]]),
                                        [["dog"], ["dog", "cat"]], config)
    assert fused.shape == (2, 2, 4, 4)
    assert (masks[0, :2] == 5).all() and (masks[0, 2:] == 0).all(), "the unused slot is skipped, not labelled"
    assert set(masks[1].unique().tolist()) <= {5, 7, 255} and (masks[1, 2:] == 7).all()


def test_unused_slots_take_the_default_threshold_without_a_class_name():
    # class_names lists the used slots only; a per-class γ for the used slot must not shift to the unused one.
    maps = {1: torch.stack([ramp(), ramp()])[None]}
    config = MaskConfig(resolution_weights=ONLY_LATENT, threshold=0.3, ignore_band=0.0, class_thresholds={"dog": 0.8})
    fused, masks = masks_from_attention(captured(maps), images_like(1, (1, 20)), torch.tensor([[5, 0]]), [["dog"]], config)
    assert torch.equal(masks[0], torch.where(fused[0, 0] >= 0.8, 5, 0))


def test_self_attention_propagates_the_maps():
    # A 2x2 latent; the object is at position 0. Position 3 attends to position 0, position 2 to
    # position 3, positions 0 and 1 to themselves: one step reaches 3, two steps reach 2 as well.
    cross = torch.tensor([[1.0, 0.0], [0.0, 0.0]])[None, None]
    attention = torch.eye(4)
    attention[3] = torch.tensor([1.0, 0, 0, 0])
    attention[2] = torch.tensor([0.0, 0, 0, 1])
    record = captured({1: cross}, self_attention=attention[None], factor=1, seen={1})
    ids, names, images = torch.tensor([[2]]), [["dog"]], images_like(1, (2, 2))
    _, plain = masks_from_attention(record, images, ids, names, MaskConfig(resolution_weights=ONLY_LATENT))
    assert plain[0].flatten().tolist() == [2, 0, 0, 0]
    one = MaskConfig(resolution_weights=ONLY_LATENT, self_attention_factor=1)
    _, once = masks_from_attention(record, images, ids, names, one)
    assert once[0].flatten().tolist() == [2, 0, 0, 2]
    two = MaskConfig(resolution_weights=ONLY_LATENT, self_attention_factor=1, self_attention_power=2)
    _, twice = masks_from_attention(record, images, ids, names, two)
    assert twice[0].flatten().tolist() == [2, 0, 2, 2]
    identity = captured({1: cross}, self_attention=torch.eye(4)[None], factor=1, seen={1})
    fused, same = masks_from_attention(identity, images, ids, names, two)
    assert torch.equal(same, plain) and torch.allclose(fused, cross)


def test_self_attention_at_a_coarser_factor_adds_its_change_at_image_size():
    # Self-attention at factor 2 of a 4x4 latent (2x2 positions); the top-left quarter spreads to the bottom-right.
    cross = torch.zeros(1, 1, 4, 4)
    cross[0, 0, :2, :2] = 1.0
    attention = torch.eye(4)
    attention[3] = torch.tensor([1.0, 0, 0, 0])
    record = captured({1: cross}, self_attention=attention[None], factor=2, seen={1, 2}, latent_size=(4, 4))
    config = MaskConfig(resolution_weights=ONLY_LATENT, self_attention_factor=2)
    fused, masks = masks_from_attention(record, images_like(1, (8, 8)), torch.tensor([[2]]), [["dog"]], config)
    assert fused.shape == (1, 1, 8, 8)
    assert (masks[0, :3, :3] == 2).all() and (masks[0, 5:, 5:] == 2).all()
    assert (masks[0, :3, 5:] == 0).all() and (masks[0, 5:, :3] == 0).all()


def test_missing_self_attention_names_the_factors_seen():
    record = captured({1: torch.rand(1, 1, 4, 4)}, self_attention=None, factor=1, seen={4, 2})
    config = MaskConfig(resolution_weights=ONLY_LATENT, self_attention_factor=1)
    with pytest.raises(ValueError, match=r"no self-attention was recorded at latent factor 1; "
                                         r"this model's self-attention layers run at factors \[2, 4\]"):
        masks_from_attention(record, images_like(1, (4, 4)), torch.tensor([[1]]), [["dog"]], config)
    nothing = captured({1: torch.rand(1, 1, 4, 4)}, self_attention=None, factor=1, seen=())
    with pytest.raises(ValueError, match=r"at factors \[\]"):
        masks_from_attention(nothing, images_like(1, (4, 4)), torch.tensor([[1]]), [["dog"]], config)


def test_affinity_refinement_reads_the_image():
    maps = {1: torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))}
    ids, names = torch.tensor([[1]]), [["dog"]]
    flat = images_like(1, (8, 8))
    split = flat.clone()
    split[..., :, 4:] = 1.0  # a colour edge down the middle
    refine = MaskConfig(resolution_weights=ONLY_LATENT, refine="affinity")
    on_flat, _ = masks_from_attention(captured(maps), flat, ids, names, refine)
    on_split, _ = masks_from_attention(captured(maps), split, ids, names, refine)
    assert not torch.allclose(on_flat, on_split), "affinity refinement follows the image's colours"
    plain = MaskConfig(resolution_weights=ONLY_LATENT)
    a, _ = masks_from_attention(captured(maps), flat, ids, names, plain)
    b, _ = masks_from_attention(captured(maps), split, ids, names, plain)
    assert torch.equal(a, b), "without refinement the image is not read"
    assert 0 <= on_split.min() and on_split.max() <= 1


def test_finite_samples_flags_any_non_finite_recording_per_sample():
    fine, coarse = torch.rand(3, 2, 4, 4), torch.rand(3, 2, 2, 2)
    coarse[1, 1, 0, 0] = float("nan")  # sample 1: one pixel of its second class at one resolution
    self_attention = torch.rand(3, 16, 16)
    self_attention[2, 5, 7] = float("inf")  # sample 2: its self-attention only
    record = captured({1: fine, 2: coarse}, self_attention=self_attention, factor=1, latent_size=(4, 4))
    assert finite_samples(record).tolist() == [True, False, False]
    assert finite_samples(captured({1: fine, 2: coarse}, latent_size=(4, 4))).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="no attention was captured"):
        finite_samples(captured({}, latent_size=(4, 4)))


def test_a_nan_pixel_costs_that_pixel_not_the_class():
    # One NaN attention pixel used to make the whole max-normalised map NaN and its class vanish.
    dog, cat = ramp(), ramp().flip(-1)
    dog[0, 3] = float("nan")
    maps = {1: torch.stack([dog, cat])[None]}
    for normalization in ("max", "minmax"):
        config = MaskConfig(resolution_weights=ONLY_LATENT, threshold=0.3, ignore_band=0.05, normalization=normalization)
        fused, masks = masks_from_attention(captured(maps), images_like(1, (1, 20)), torch.tensor([[4, 9]]),
                                            [["dog", "cat"]], config)
        assert masks[0, 0, 3] == 255, "the unknown pixel is ignored, neither background nor a class"
        assert (masks[0] == 4).sum() >= 8 and (masks[0] == 9).sum() >= 8, normalization
        assert torch.isfinite(fused[0, 0]).sum() == 19 and torch.isfinite(fused[0, 1]).all()
    otsu = MaskConfig(resolution_weights=ONLY_LATENT, threshold_mode="otsu")
    _, masks = masks_from_attention(captured(maps), images_like(1, (1, 20)), torch.tensor([[4, 9]]),
                                    [["dog", "cat"]], otsu)
    assert masks[0, 0, 3] == 255 and (masks[0] == 4).any() and (masks[0] == 9).any()
