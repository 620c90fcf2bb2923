import pytest
import torch

from ondemand_seg.data.label_noise import LabelNoiseFilter, class_agreement


def square(value, top, left, size=8, shape=(16, 16)):
    m = torch.zeros(shape, dtype=torch.long)
    m[top : top + size, left : left + size] = value
    return m


def logits_for(prediction, classes=4):
    return torch.nn.functional.one_hot(prediction, classes).permute(0, 3, 1, 2).float()


def test_class_agreement():
    pred = torch.stack([square(2, 0, 0), square(2, 0, 0), square(2, 0, 0), torch.zeros(16, 16, dtype=torch.long)])
    masks = torch.stack([square(2, 0, 0), square(2, 8, 8), square(3, 0, 0), torch.zeros(16, 16, dtype=torch.long)])
    scores = class_agreement(pred, masks, 4)
    assert scores.shape == (4, 4)
    assert scores[0, 2] == 1.0 and scores[1, 2] == 0.0 and scores[2, 3] == 0.0
    assert scores[:, 0].isnan().all(), "background is never scored"
    assert scores[3].isnan().all() and scores[0, 3].isnan(), "absent classes are not scored"
    half = square(2, 0, 0)
    half[:, 4:] = 255  # ignored pixels do not count on either side
    assert class_agreement(pred[:1], half[None], 4)[0, 2] == 1.0
    two = square(2, 0, 0)
    two[8:, 8:] = 3  # a second class the model misses: scored on its own
    row = class_agreement(pred[:1], two[None], 4)[0]
    assert row[2] == 1.0 and row[3] == 0.0


def test_noise_filter_drops_a_planted_bad_sample_after_warmup():
    pred = torch.stack([square(2, 0, 0)] * 3)
    masks = torch.stack([square(2, 0, 0), square(2, 1, 1), square(2, 8, 8)])  # the last one is planted noise
    noise = LabelNoiseFilter(cutoff=0.3, warmup=5)
    assert torch.equal(noise(4, logits_for(pred), masks), masks), "no filtering during warm-up"
    kept = noise(5, logits_for(pred), masks)
    assert torch.equal(kept[:2], masks[:2])
    # The planted mask's square and the square the model sees are both pruned; the rest stays background.
    assert (kept[2][8:, 8:] == 255).all() and (kept[2][:8, :8] == 255).all() and (kept[2][:8, 8:] == 0).all()
    assert noise.counts["scored"] == 3 and noise.counts["dropped"] == 1 and noise.counts["per_class"] == {2: 1}


def test_noise_filter_prunes_only_the_bad_class_of_a_sample():
    pred = square(2, 0, 0)[None]
    mask = square(2, 0, 0)
    mask[8:, 8:] = 3  # class 3 is noise the model does not see; class 2 agrees
    kept = LabelNoiseFilter(cutoff=0.3, warmup=0, drop_fraction=1.0)(0, logits_for(pred), mask[None])[0]
    assert (kept[8:, 8:] == 255).all() and (kept[:8, :8] == 2).all()


def test_noise_filter_keeps_a_class_the_model_has_not_learnt():
    # The model predicts no class 2 anywhere: every class-2 label scores 0, none is evidence of noise.
    pred = torch.zeros(4, 16, 16, dtype=torch.long)
    masks = torch.stack([square(2, i, i) for i in range(4)])
    noise = LabelNoiseFilter(cutoff=0.3, warmup=0, drop_fraction=0.25)
    assert torch.equal(noise(0, logits_for(pred), masks), masks)
    assert noise.counts["scored"] == 4 and noise.counts["dropped"] == 0
    absolute = LabelNoiseFilter(cutoff=0.3, warmup=0, drop_fraction=1.0)  # a plain cutoff drops them all
    assert (absolute(0, logits_for(pred), masks) == 255).flatten(1).any(1).all()


def test_noise_filter_drop_fraction_bounds_the_pruned_share():
    torch.manual_seed(0)
    noise = LabelNoiseFilter(cutoff=1.0, warmup=0, drop_fraction=0.1, window=1000)
    for _ in range(20):
        pred = torch.stack([square(2, 0, 0)] * 10)
        shifts = torch.randint(0, 8, (10, 2)).tolist()
        masks = torch.stack([square(2, top, left) for top, left in shifts])  # agreement spread from 0 to 1
        noise(0, logits_for(pred), masks)
    share = noise.counts["dropped"] / noise.counts["scored"]
    assert 0.0 < share <= 0.15, share


def test_noise_filter_relabels_with_prediction():
    pred = square(1, 0, 0)[None]
    mask = square(1, 8, 8)
    mask[0, 0] = 255
    noise = LabelNoiseFilter(cutoff=0.5, warmup=0, mode="relabel", drop_fraction=1.0)
    out = noise(0, logits_for(pred), mask[None])
    assert out[0, 0, 0] == 255, "ignore stays ignore"
    assert out[0, 3, 3] == 1 and out[0, 12, 12] == 0, "both sides of the disagreement take the prediction"
    assert noise.counts["relabelled"] == 1


def test_bad_settings():
    with pytest.raises(ValueError, match="cutoff"):
        LabelNoiseFilter(cutoff=2)
    with pytest.raises(ValueError, match="'fix'"):
        LabelNoiseFilter(mode="fix")
    with pytest.raises(ValueError, match="drop_fraction.*0"):
        LabelNoiseFilter(drop_fraction=0)
    with pytest.raises(ValueError, match="window"):
        LabelNoiseFilter(window=0)


def test_noise_filter_never_prunes_or_counts_samples_outside_prunable():
    # The same planted bad label in a real (not prunable) and a synthetic sample: only the synthetic
    # one is pruned, and only synthetic scores enter the counters and the class history.
    pred = torch.stack([square(2, 0, 0)] * 3)
    masks = torch.stack([square(2, 0, 0), square(2, 8, 8), square(2, 8, 8)])
    noise = LabelNoiseFilter(cutoff=0.3, warmup=0, drop_fraction=1.0)
    kept = noise(0, logits_for(pred), masks, prunable=torch.tensor([True, False, True]))
    assert torch.equal(kept[:2], masks[:2]), "a real label was pruned"
    assert (kept[2][8:, 8:] == 255).all()
    assert noise.counts["scored"] == 2 and noise.counts["dropped"] == 1
    assert len(noise.history.get(2, [])) == 0, "history only feeds relative cutoffs (drop_fraction < 1)"
    ranked = LabelNoiseFilter(cutoff=0.3, warmup=0, drop_fraction=0.5)
    ranked(0, logits_for(pred), masks, prunable=torch.tensor([True, False, True]))
    assert sorted(ranked.history[2]) == [0.0, 1.0], "the real sample's score entered the class history"
    with pytest.raises(ValueError, match=r"one flag per sample, shape \[3\], got \[2\]"):
        noise(0, logits_for(pred), masks, prunable=torch.tensor([True, False]))
