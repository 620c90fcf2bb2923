"""benchmarks/train_step.py: both forms of the trainer's model are timed and the rows say which is which."""
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import train_step  # noqa: E402


def test_times_full_and_cropped_model_per_crop_size(tmp_path):
    out = tmp_path / "step.json"
    assert train_step.main(["--crop-sizes", "32", "64", "--batch-size", "2", "--rounds", "1",
                           "--work-dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["crop_size"] for r in rows] == [32, 64]
    for r in rows:
        assert r["convs_cropped"] == 6 and r["full_s_per_step"] > 0 and r["cropped_s_per_step"] > 0
        assert r["speedup"] == r["full_s_per_step"] / r["cropped_s_per_step"]
