"""benchmarks/compare_runs.py: two results JSONs paired by run name and seed."""
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from compare_runs import main  # noqa: E402


def write(path, runs):
    path.write_text(json.dumps({"config": {}, "runs": {k: {"miou": v} for k, v in runs.items()}}))
    return path


def test_pairs_only_shared_names_and_seeds(tmp_path, capsys):
    first = write(tmp_path / "a.json", {"synthetic_only/seed0": 0.50, "synthetic_only/seed1": 0.62,
                                        "synthetic_only/seed7": 0.90, "mixed/seed0": 0.4})
    second = write(tmp_path / "b.json", {"synthetic_only/seed0": 0.45, "synthetic_only/seed1": 0.64,
                                         "real_only/seed0": 0.3})
    out = tmp_path / "cmp.json"
    assert main([str(first), str(second), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # Seed 7 and the runs only one side has are left out: gains +5 and -2 points.
    assert list(rows) == ["synthetic_only"]
    row = rows["synthetic_only"]
    assert row["seeds"] == [0, 1] and row["per_seed_points"] == pytest.approx([5.0, -2.0])
    assert row["gain_points"] == pytest.approx(1.5) and row["ahead"] == 1
    assert row["first_mean"] == pytest.approx(0.56) and row["second_mean"] == pytest.approx(0.545)
    assert "| synthetic_only (2 seeds) | 0.560 ± 0.085 | 0.545 ± 0.134 | +1.5 | 1 of 2 |" in capsys.readouterr().out


def test_refuses_files_that_are_not_results_or_share_nothing(tmp_path):
    good = write(tmp_path / "a.json", {"synthetic_only/seed0": 0.5})
    other = write(tmp_path / "b.json", {"mixed/seed0": 0.5})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"runs": {"no-seed-here": {"miou": 1}}}))
    with pytest.raises(SystemExit, match="bad.json is not a results JSON"):
        main([str(good), str(bad)])
    with pytest.raises(SystemExit, match="share no run name and seed"):
        main([str(good), str(other)])
