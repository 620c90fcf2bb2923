"""benchmarks/downstream.py's table over seeds and the resume guard the benchmarks share."""
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from common import resumable_runs  # noqa: E402
from downstream import RUNS, summarize, table  # noqa: E402


def test_summary_averages_seeds_and_gaps_only_over_seeds_real_only_has():
    runs = {"real_only/seed0": {"miou": 0.50}, "real_only/seed1": {"miou": 0.60},
            "synthetic_only/seed0": {"miou": 0.40}, "synthetic_only/seed1": {"miou": 0.65},
            "synthetic_only/seed2": {"miou": 0.10}}
    summary = summarize(runs)
    assert summary["real_only"]["mean"] == pytest.approx(0.55) and summary["real_only"]["seeds"] == [0, 1]
    assert summary["real_only"]["std"] == pytest.approx(0.0707107, rel=1e-5) and "gap_points" not in summary["real_only"]
    synthetic = summary["synthetic_only"]
    assert synthetic["mean"] == pytest.approx(0.38333, rel=1e-4) and synthetic["miou"] == [0.40, 0.65, 0.10]
    # Seed 2 has no real-only partner, so it does not enter the gap: (0.10 - 0.05) / 2 = 2.5 points.
    assert synthetic["gap_points"] == pytest.approx(2.5) and synthetic["gap_seeds"] == [0, 1]
    text = table(summary)
    assert "| synthetic_only | 0.383 ± 0.275 | 3 | 0.400, 0.650, 0.100 | +2.5 |" in text
    assert "| real_only | 0.550 ± 0.071 | 2 |" in text


def test_single_seed_has_no_spread():
    summary = summarize({"mixed/seed3": {"miou": 0.5}})
    assert summary["mixed"]["std"] is None and table(summary).endswith("| mixed | 0.500 | 1 | 0.500 | – |")


def test_every_synthetic_candidate_trains_on_the_stream_alone():
    for name, flags in RUNS.items():
        assert ("--synthetic-only" in flags) == name.startswith("synthetic"), name


def test_resume_keeps_runs_of_the_same_settings_and_refuses_others(tmp_path):
    path = tmp_path / "r.json"
    assert resumable_runs(path, {"steps": 600}) == {}
    path.write_text(json.dumps({"config": {"steps": 600, "extra": []}, "runs": {"a/seed0": {"miou": 0.5}}}))
    assert resumable_runs(path, {"steps": 600, "extra": []}) == {"a/seed0": {"miou": 0.5}}
    with pytest.raises(SystemExit, match=r"steps: 600 there, 300 now"):
        resumable_runs(path, {"steps": 300, "extra": []})
    with pytest.raises(SystemExit, match=r"extra: \[\] there, \['--augment', 'basic'\] now"):
        resumable_runs(path, {"steps": 600, "extra": ["--augment", "basic"]})
