"""benchmarks/ray_feeding.py: both paths deliver every sample, interleaved, with the load recorded."""
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import ray_feeding  # noqa: E402


@pytest.mark.slow
def test_each_round_runs_both_paths_and_the_summary_takes_medians(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray_feeding.json"
    assert ray_feeding.main(["--n", "4", "--workers", "1", "--repeats", "2", "--batch-size", "2",
                             "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["round"], r["path"]) for r in result["runs"]] == [(0, "dataloader"), (0, "ray"), (1, "dataloader"),
                                                                (1, "ray")]
    for run in result["runs"]:
        assert run["seconds"] > run["first_batch_seconds"] > 0 and run["load_average_1min_at_start"] >= 0
        assert (run["ray_init_seconds"] is None) == (run["path"] == "dataloader")
    ray_runs = [r for r in result["runs"] if r["path"] == "ray"]
    summary = {row["path"]: row for row in result["summary"]}
    assert summary["ray"]["runs"] == 2
    assert summary["ray"]["samples_per_s"] == pytest.approx(sum(r["samples_per_s"] for r in ray_runs) / 2)
