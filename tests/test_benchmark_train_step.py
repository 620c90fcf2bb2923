"""benchmarks/train_step.py: both forms of the trainer's model are timed and the rows say which is which."""
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import train_step  # noqa: E402


def stand_in_trainer(flags: list[str]) -> list[dict]:
    """The metrics rows of a train_deeplab.py run: one ``train`` row per step, 0.25 s each, then ``final``."""
    steps = int(flags[flags.index("--steps") + 1])
    return [*({"event": "train", "step": s + 1, "train_s": 0.25} for s in range(steps)), {"event": "final"}]


@pytest.mark.parametrize("trainer", ["stand-in", pytest.param("train_deeplab.py", marks=pytest.mark.slow)])
def test_times_full_and_cropped_model_per_crop_size(tmp_path, monkeypatch, trainer):
    runs = []

    def run_rows(flags):
        runs.append(flags)
        return stand_in_trainer(flags) if trainer == "stand-in" else common.run_rows(flags)

    monkeypatch.setattr(train_step, "run_rows", run_rows)
    out = tmp_path / "step.json"
    assert train_step.main(["--crop-sizes", "16", "32", "--batch-size", "2", "--rounds", "1",
                            "--work-dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["crop_size"] for r in rows] == [16, 32]
    for r, flags in zip(rows, runs):
        # The trainer's own step at the same size and batch: the warm-up steps and the timed ones.
        assert flags[flags.index("--crop-size") + 1] == str(r["crop_size"]) and "--real-only" in flags
        assert flags[flags.index("--batch-size") + 1] == "2" and flags[flags.index("--steps") + 1] == "3"
        assert r["convs_cropped"] == 6 and r["full_s_per_step"] > 0 and r["cropped_s_per_step"] > 0
        assert r["speedup"] == r["full_s_per_step"] / r["cropped_s_per_step"]
        if trainer == "stand-in":
            assert r["cropped_s_per_step"] == 0.25
