import pytest
import torch

from ondemand_seg.noise import NoiseFilter, sample_agreement


def square(value, top, left, size=8, shape=(16, 16)):
    m = torch.zeros(shape, dtype=torch.long)
    m[top : top + size, left : left + size] = value
    return m


def logits_for(prediction, classes=4):
    return torch.nn.functional.one_hot(prediction, classes).permute(0, 3, 1, 2).float()


def test_sample_agreement():
    pred = torch.stack([square(2, 0, 0), square(2, 0, 0), square(2, 0, 0), torch.zeros(16, 16, dtype=torch.long)])
    masks = torch.stack([square(2, 0, 0), square(2, 8, 8), square(3, 0, 0), torch.zeros(16, 16, dtype=torch.long)])
    assert sample_agreement(pred, masks).tolist() == [1.0, 0.0, 0.0, 1.0]
    half = square(2, 0, 0)
    half[:, 4:] = 255  # ignored pixels do not count
    assert sample_agreement(pred[:1], half[None]).item() == 1.0


def test_noise_filter_drops_a_planted_bad_sample_after_warmup():
    pred = torch.stack([square(2, 0, 0)] * 3)
    masks = torch.stack([square(2, 0, 0), square(2, 1, 1), square(1, 8, 8)])  # the last one is planted noise
    noise = NoiseFilter(cutoff=0.3, warmup=5)
    assert torch.equal(noise(4, logits_for(pred), masks), masks), "no filtering during warm-up"
    kept = noise(5, logits_for(pred), masks)
    assert torch.equal(kept[:2], masks[:2])
    assert (kept[2] == 255).all()
    assert noise.counts == {"scored": 3, "dropped": 1, "relabelled": 0}


def test_noise_filter_relabels_with_prediction():
    pred = square(2, 0, 0)[None]
    mask = square(1, 8, 8)
    mask[0, 0] = 255
    noise = NoiseFilter(cutoff=0.5, warmup=0, mode="relabel")
    out = noise(0, logits_for(pred), mask[None])
    assert out[0, 0, 0] == 255 and out[0, 3, 3] == 2 and out[0, 12, 12] == 0
    assert noise.counts["relabelled"] == 1


def test_bad_settings():
    with pytest.raises(ValueError, match="cutoff"):
        NoiseFilter(cutoff=2)
    with pytest.raises(ValueError, match="'fix'"):
        NoiseFilter(mode="fix")
