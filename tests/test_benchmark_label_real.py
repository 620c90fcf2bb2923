"""benchmarks/label_real.py: its IoU and presence scores on hand-made masks, and one tiny run as
users run it (in this process), writing its JSON rows."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import label_real  # noqa: E402
from ondemand_seg.real import PseudoLabel  # noqa: E402
from ondemand_seg.toyworld import TOY_CLASSES, ToySample  # noqa: E402


def sample(mask, names):
    return ToySample(np.zeros((*mask.shape, 3), np.uint8), mask, "", names)


def test_scores_leave_out_ignore_pixels_and_gated_masks():
    truth = np.zeros((4, 4), np.uint8)
    truth[:2] = 1  # circle on the top half
    ours = np.zeros((4, 4), np.uint8)
    ours[:3] = 1  # one row too many
    ours[3, 0] = 255
    labels = [PseudoLabel(ours, ("circle",), (), None, 0), PseudoLabel(None, ("circle",), (), "empty mask", 1)]
    scored = label_real.score([sample(truth, ["circle"]), sample(truth, ["circle"])], labels, TOY_CLASSES)
    assert scored["per_class"]["circle"] == 8 / 12 and scored["left_out"] == 1
    assert scored["ignore_share"] == 1 / 16
    found = label_real.presence([sample(truth, ["circle"])], [PseudoLabel(ours, ("circle", "ring"), (), None, 0)])
    assert found == {"precision": 0.5, "recall": 1.0}
    assert label_real.strengths("0.02+0.1") == (0.02, 0.1)


@pytest.mark.slow
def test_a_tiny_run_writes_tagged_and_untagged_rows(tmp_path):
    out = tmp_path / "label_real.json"
    assert label_real.main(["--models", "toy", "--n", "3", "--generated-n", "0", "--strengths", "0.1",
                            "--recipes", "preset", "--absent-ratios", "0.9", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["set"], r["tags"]) for r in rows] == [("1 object", True), ("1-3 objects", True), ("1-3 objects", False)]
    assert all(0 <= r["mean_iou"] <= 1 for r in rows)
