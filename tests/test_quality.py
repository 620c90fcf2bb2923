import pytest
import torch

from ondemand_seg import DiffuMaskStream, QualityConfig, TooManyRejects
from ondemand_seg.loading import RANDOM_WEIGHTS_MODEL
from ondemand_seg.quality import GateStats, RejectCounter, gate


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


def test_reject_counter_raises_after_too_many_in_a_row():
    counter = RejectCounter(3)
    counter.update(["empty mask", "empty mask", None, "full mask", "empty mask"])
    assert counter.by_reason == {"empty mask": 3, "full mask": 1}
    with pytest.raises(TooManyRejects, match="rejected 3 samples in a row"):
        counter.update(["all-black image"])


def test_gate_stats_count():
    stats = GateStats()
    stats.add([None, "empty mask", None])
    assert stats.as_dict()["generated"] == 3 and stats.as_dict()["accepted"] == 2
    assert stats.as_dict()["empty mask"] == 1


def test_stream_stops_with_a_clear_error_instead_of_looping(fast):
    # No mask can cover 99% foreground on a random model: every sample is rejected as empty.
    stream = DiffuMaskStream(RANDOM_WEIGHTS_MODEL, ["dog"], quality=QualityConfig(min_foreground=0.99, max_foreground=1.0, max_consecutive_rejects=5), **fast)
    with pytest.raises(TooManyRejects, match=r"5 samples in a row .*'empty mask': 5"):
        next(iter(stream))
    assert stream.stats()["empty mask"] >= 5 and stream.stats()["accepted"] == 0


def test_rejected_sample_is_redrawn_not_passed_on(fast, monkeypatch):
    import ondemand_seg.source as source

    real_gate = source.gate
    calls = []

    def reject_first_batch(images, masks, config):
        calls.append(images.shape[0])
        reasons = real_gate(images, masks, config)
        return ["non-finite image"] * len(reasons) if len(calls) == 1 else reasons

    monkeypatch.setattr(source, "gate", reject_first_batch)
    stream = DiffuMaskStream(RANDOM_WEIGHTS_MODEL, ["dog"], num_samples=4, augment=False, **fast)
    images = [image for image, _ in stream]
    assert len(images) == 4
    assert stream.stats()["non-finite image"] == 4 and stream.stats()["accepted"] == 4
