"""benchmarks/downstream.py's table over seeds and the resume guard the benchmarks share."""
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from common import resumable_runs  # noqa: E402
from downstream import RUNS, baseline_runs, summarize, table  # noqa: E402


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
    assert synthetic["ahead"] == 1 and synthetic["paired_sd_points"] == pytest.approx(10.6066, rel=1e-5)
    # Paired t over gaps (+10, -5) points: t = 2.5 / (10.6066 / sqrt 2) = 1/3 with 1 degree of
    # freedom (Cauchy): p = 1 - 2 atan(1/3) / pi.
    assert synthetic["p_paired"] == pytest.approx(1 - 2 * math.atan(1 / 3) / math.pi, rel=1e-6)
    text = table(summary)
    assert "| synthetic_only | 0.383 ± 0.275 | 3 | 0.400, 0.650, 0.100 | +2.5 | 1 of 2 | 0.8 |" in text
    assert "| real_only | 0.550 ± 0.071 | 2 | 0.500, 0.600 | – | – | – |" in text


def test_real_only_runs_of_another_json_are_the_baseline(tmp_path):
    runs = {f"synthetic_only/seed{s}": {"miou": m} for s, m in enumerate([0.62, 0.61, 0.63])}
    real = {f"real_only/seed{s}": {"miou": m} for s, m in enumerate([0.60, 0.595, 0.612])}
    synthetic = summarize(runs, baseline=real)["synthetic_only"]
    assert synthetic["gap_points"] == pytest.approx(-(2 + 1.5 + 1.8) / 3) and synthetic["ahead"] == 3
    assert synthetic["p_paired"] < 0.05
    # Real-only runs in the JSON itself win over the baseline's.
    assert summarize({**runs, "real_only/seed0": {"miou": 0.70}}, baseline=real)["synthetic_only"]["gap_seeds"] == [0]
    path = tmp_path / "real.json"
    path.write_text(json.dumps({"config": {"steps": 600, "extra": []}, "runs": real}))
    assert baseline_runs(path) == real and baseline_runs(None) is None
    with pytest.raises(SystemExit, match=r"--baseline .*missing.json does not exist"):
        baseline_runs(tmp_path / "missing.json")
    path.write_text("[]")
    with pytest.raises(SystemExit, match=r"--baseline .*real.json is not a benchmark results JSON"):
        baseline_runs(path)


def test_single_seed_has_no_spread():
    summary = summarize({"mixed/seed3": {"miou": 0.5}})
    assert summary["mixed"]["std"] is None and table(summary).endswith("| mixed | 0.500 | 1 | 0.500 | – | – | – |")
    # One shared seed: a gap and a count, but no spread to test against.
    one = summarize({"real_only/seed0": {"miou": 0.5}, "synthetic_only/seed0": {"miou": 0.6}})["synthetic_only"]
    assert one["ahead"] == 1 and "p_paired" not in one


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
