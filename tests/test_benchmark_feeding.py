"""benchmarks/feeding.py --main-job: which trainer runs it makes and what it reports of them."""
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import feeding  # noqa: E402


def test_main_job_runs_each_variant_at_the_trainers_own_steps_and_reports_wait_time_and_miou(tmp_path, monkeypatch):
    calls = []

    def fake_train(flags):
        calls.append(flags)
        steps = int(flags[flags.index("--steps") + 1]) if "--steps" in flags else 1200  # the trainer's default
        return {"step": steps, "data_wait_fraction": 0.25, "miou": 0.5, "train_seconds": 3.0, "data_wait_seconds": 1.0,
                "startup_seconds": 2.0, "torch_threads": 1}

    monkeypatch.setattr(feeding, "train", fake_train)
    out = tmp_path / "main_job.json"
    assert feeding.main(["--main-job", "--variants", "default", "ddim25_prefetch2_threads2", "--work-dir", str(tmp_path),
                         "--json", str(out), "--", "--threads", "1"]) == 0
    default, before = calls
    assert "--steps" not in default and "--eval-limit" not in default, "the main job as users run it"
    assert default[:1] == ["--synthetic-only"] and default[-2:] == ["--threads", "1"]
    # The levers are compared at 600 steps whatever the trainer's default.
    assert before[1:9] == ["--steps", "600", "--gen-steps", "25", "--prefetch-batches", "2", "--threads", "2"]
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["default", "ddim25_prefetch2_threads2"]
    assert [r["steps"] for r in rows] == [1200, 600]
    assert rows[0]["miou"] == 0.5 and rows[0]["torch_threads"] == 1 and rows[0]["data_wait_fraction"] == 0.25 and rows[0]["minutes"] >= 0


def test_reuse_sweep_keeps_its_short_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(feeding, "train", lambda flags: calls.append(flags) or
                        {"data_wait_fraction": 0.1, "train_seconds": 1.0, "data_wait_seconds": 0.1})
    feeding.main(["--reuse", "2", "--workers", "1", "--work-dir", str(tmp_path)])
    (flags,) = calls
    assert flags[flags.index("--steps") + 1] == "60" and flags[flags.index("--reuse") + 1] == "2"
