"""benchmarks/few_labels.py, run as users run it (in this process) at tiny sizes: every planned run
is trained once, the table is built from the runs' mIoU, an interrupted table resumes, and the
RESULTS section is rewritten between its markers."""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import few_labels as few_labels_script  # noqa: E402

TINY = ["--", "--vocabulary", "toy", "--batch-size", "4", "--gen-steps", "2", "--eval-limit", "4", "--threads", "1",
        "--workers", "0", "--image-size", "16"]


@dataclass
class Finished:
    """How a command line ended, as a subprocess reports it."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def few_labels(capsys, monkeypatch):
    """``few_labels(tmp_path, *args)``: ``few_labels.py --work-dir TMP/work *args`` in this process,
    where training fails the test unless the test hands the script a trainer."""
    monkeypatch.setattr(few_labels_script, "train", lambda flags: pytest.fail(f"trained: {flags}"))

    def run(tmp_path, *args) -> Finished:
        capsys.readouterr()
        try:
            code = few_labels_script.main(["--work-dir", str(tmp_path / "work"), *args])
        except SystemExit as stop:
            # As the interpreter ends a script: a message goes to stderr with exit status 1.
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
            code = 1 if isinstance(stop.code, str) else stop.code or 0
        out = capsys.readouterr()
        return Finished(code, out.out, out.err)

    return run


def stand_in_train(flags: list[str]) -> dict:
    """train_deeplab.py's final summary, made up from the flags: more for seed 1 and for mixing."""
    seed = int(flags[flags.index("--seed") + 1])
    miou = 0.3 + 0.1 * seed + (0 if "--real-only" in flags else 0.05)
    return {"miou": miou, "per_class_iou": {"background": miou}}


@pytest.mark.parametrize("trainer", ["stand-in", pytest.param("train_deeplab.py", marks=pytest.mark.slow)])
def test_table_of_real_only_and_mixed_runs_resumes_and_lands_in_results(tmp_path, few_labels, trainer, monkeypatch):
    monkeypatch.setattr(few_labels_script, "train", stand_in_train if trainer == "stand-in" else common.train)
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\n<!-- few_labels:begin -->\nold table\n<!-- few_labels:end -->\n\nafter\n")
    out = tmp_path / "few.json"
    args = ["--sizes", "4", "--seeds", "0", "1", "--models", "random-weights", "--steps", "1",
            "--synthetic-length", "4", "--json", str(out), "--results-md", str(results_md), *TINY]
    done = few_labels(tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"real_only/4/seed0", "real_only/4/seed1",
                                 "mixed:random-weights@0.5x4/4/seed0", "mixed:random-weights@0.5x4/4/seed1"}
    mixed_flags = data["runs"]["mixed:random-weights@0.5x4/4/seed1"]["flags"]
    assert mixed_flags[mixed_flags.index("--real-images") + 1] == "4" and "--real-only" not in mixed_flags
    row = data["summary"]["4"]
    real = [data["runs"][f"real_only/4/seed{s}"]["miou"] for s in (0, 1)]
    assert row["real_only"]["seeds"] == 2 and abs(row["real_only"]["mean"] - sum(real) / 2) < 1e-9
    gain = 100 * (row["mixed:random-weights@0.5x4"]["mean"] - row["real_only"]["mean"])
    assert abs(row["gain_points:random-weights@0.5x4"] - gain) < 1e-9
    text = results_md.read_text()
    assert "old table" not in text and text.endswith("after\n")
    assert "| 4 | " in text and "python benchmarks/few_labels.py" in text

    # Everything is in the JSON already: a rerun trains nothing and prints the same table.
    again = few_labels(tmp_path, *args)
    assert again.returncode == 0 and "==" not in again.stdout
    assert json.loads(out.read_text())["runs"] == data["runs"]
    # Other steps into the same JSON would mix two budgets in one table: refused, naming the change.
    other = few_labels(tmp_path, *[("2" if a == "1" and args[i - 1] == "--steps" else a) for i, a in enumerate(args)])
    assert other.returncode != 0 and "steps: 1 there, 2 now" in other.stderr
    assert json.loads(out.read_text())["runs"] == data["runs"]
    # A table over more sizes than were run, from the JSON alone: missing cells say so.
    table = few_labels(tmp_path, "--table-only", "--sizes", "4", "9", *args[2:])
    assert table.returncode == 0 and "==" not in table.stdout and "| 9 | not run |" in table.stdout


def test_results_file_without_markers_is_refused(tmp_path, few_labels):
    (tmp_path / "few.json").write_text(json.dumps({"runs": {}}))
    (tmp_path / "R.md").write_text("no markers\n")
    done = few_labels(tmp_path, "--sizes", "3", "--seeds", "0", "--models", "random-weights", "--steps", "1",
                      "--json", str(tmp_path / "few.json"), "--results-md", str(tmp_path / "R.md"))
    # Refused before any training starts: nothing was run into the work folder.
    assert done.returncode != 0 and "R.md has no <!-- few_labels:begin -->" in done.stderr
    assert not (tmp_path / "work").exists()


def test_one_mixed_condition_per_model_and_ratio_keyed_by_both():
    from few_labels import get_args_parser, planned_runs

    args = get_args_parser().parse_args(["--sizes", "25", "--seeds", "3", "--models", "toy", "--synthetic-ratio", "0.5", "0.9"])
    runs = dict(planned_runs(args))
    assert list(runs) == ["real_only/25/seed3", "mixed:toy@0.5x512/25/seed3", "mixed:toy@0.9x512/25/seed3"]
    flags = runs["mixed:toy@0.9x512/25/seed3"]
    assert flags[flags.index("--synthetic-ratio") + 1] == "0.9" and flags[flags.index("--seed") + 1] == "3"
    assert flags[flags.index("--synthetic-length") + 1] == "512"


def test_named_results_section_gets_the_table_and_the_default_section_is_left_alone(tmp_path, few_labels):
    runs = {"real_only/4/seed0": {"miou": 0.25}, "mixed:toy@0.9x8/4/seed0": {"miou": 0.5}}
    (tmp_path / "few.json").write_text(json.dumps({"config": {"steps": 1, "extra": []}, "runs": runs}))
    results_md = tmp_path / "R.md"
    results_md.write_text("<!-- few_labels:begin -->\nfirst table\n<!-- few_labels:end -->\n"
                          "<!-- few_labels_c128:begin -->\nold\n<!-- few_labels_c128:end -->\n")
    done = few_labels(tmp_path, "--table-only", "--sizes", "4", "--seeds", "0", "--models", "toy", "--steps", "1",
                      "--synthetic-ratio", "0.9", "--synthetic-length", "8", "--json", str(tmp_path / "few.json"),
                      "--results-md", str(results_md), "--results-section", "few_labels_c128")
    assert done.returncode == 0, done.stderr[-3000:]
    text = results_md.read_text()
    assert "first table" in text and "\nold\n" not in text
    section = text.split("<!-- few_labels_c128:begin -->", 1)[1].split("<!-- few_labels_c128:end -->", 1)[0]
    assert "| 4 | 0.250 ± 0.000 (1) | 0.500 ± 0.000 (1) | +25.0 (1 of 1 seeds ahead) |" in section
    # A section the file does not have is refused by name.
    missing = few_labels(tmp_path, "--table-only", "--sizes", "4", "--json", str(tmp_path / "few.json"), "--steps", "1",
                         "--results-md", str(results_md), "--results-section", "few_labels_c256")
    assert missing.returncode != 0 and "<!-- few_labels_c256:begin -->" in missing.stderr


def test_real_only_plans_no_mixed_run_and_its_table_has_one_column():
    from few_labels import get_args_parser, planned_runs, summarize

    args = get_args_parser().parse_args(["--real-only", "--sizes", "25", "100", "--seeds", "0", "1"])
    assert [key for key, _ in planned_runs(args)] == ["real_only/25/seed0", "real_only/25/seed1",
                                                      "real_only/100/seed0", "real_only/100/seed1"]
    _, table = summarize({"real_only/25/seed0": {"miou": 0.5}, "real_only/25/seed1": {"miou": 0.7}}, [25, 100], [])
    assert table.splitlines() == ["| real images | real-only mIoU |", "|---|---|", "| 25 | 0.600 ± 0.141 (2) |",
                                  "| 100 | not run |"]


def test_real_only_runs_of_another_json_are_the_baseline_and_not_trained_again(tmp_path):
    from few_labels import get_args_parser, planned_runs, summarize

    args = get_args_parser().parse_args(["--sizes", "25", "--seeds", "0", "1", "--models", "toy",
                                         "--baseline", "real.json"])
    assert [key for key, _ in planned_runs(args)] == ["mixed:toy@0.5x512/25/seed0", "mixed:toy@0.5x512/25/seed1"]
    real = {"real_only/25/seed0": {"miou": 0.40}, "real_only/25/seed1": {"miou": 0.50}}
    mixed = {"mixed:toy@0.5x512/25/seed0": {"miou": 0.60}, "mixed:toy@0.5x512/25/seed1": {"miou": 0.70}}
    summary, table = summarize(mixed, [25], ["toy@0.5x512"], baseline=real)
    assert summary["25"]["real_only"]["mean"] == 0.45 and abs(summary["25"]["gain_points:toy@0.5x512"] - 20.0) < 1e-9
    assert "| 25 | 0.450 ± 0.071 (2) |" in table
    # Real-only runs in the JSON itself win over the baseline's.
    own = {"real_only/25/seed0": {"miou": 0.30}}
    assert summarize({**mixed, **own}, [25], ["toy@0.5x512"], baseline=real)[0]["25"]["real_only"]["mean"] == 0.30


def test_baseline_that_is_missing_or_given_with_real_only_is_refused(tmp_path, few_labels):
    missing = few_labels(tmp_path, "--sizes", "3", "--seeds", "0", "--models", "random-weights", "--steps", "1",
                         "--baseline", str(tmp_path / "nowhere.json"), "--json", str(tmp_path / "few.json"))
    assert missing.returncode != 0 and "--baseline" in missing.stderr and "nowhere.json does not exist" in missing.stderr
    both = few_labels(tmp_path, "--real-only", "--baseline", str(tmp_path / "nowhere.json"))
    assert both.returncode != 0 and "give one of them" in both.stderr
    assert not (tmp_path / "work").exists()


def test_baseline_seeds_outside_the_table_are_left_out(tmp_path, few_labels):
    real = {f"real_only/4/seed{s}": {"miou": m} for s, m in [(0, 0.40), (1, 0.50), (2, 0.90)]}
    (tmp_path / "real.json").write_text(json.dumps({"config": {}, "runs": real}))
    mixed = {f"mixed:toy@0.5x8/4/seed{s}": {"miou": 0.6} for s in (0, 1)}
    (tmp_path / "few.json").write_text(json.dumps({"config": {"steps": 1, "extra": []}, "runs": mixed}))
    done = few_labels(tmp_path, "--table-only", "--sizes", "4", "--seeds", "0", "1", "--models", "toy", "--steps", "1",
                      "--synthetic-length", "8", "--baseline", str(tmp_path / "real.json"), "--json", str(tmp_path / "few.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads((tmp_path / "few.json").read_text())["summary"]["4"]
    # Seed 2's real-only run has no mixed partner: the baseline is seeds 0 and 1 (0.45), not 0.60.
    assert row["real_only"]["seeds"] == 2 and abs(row["real_only"]["mean"] - 0.45) < 1e-9


def test_paired_comparison_per_seed_in_summary_and_table():
    from few_labels import summarize
    from scipy.stats import ttest_rel

    real = {0: 0.40, 1: 0.50, 2: 0.45}
    mixed = {0: 0.52, 1: 0.55, 2: 0.44}
    runs = {**{f"real_only/25/seed{s}": {"miou": m} for s, m in real.items()},
            **{f"mixed:toy@0.9x8/25/seed{s}": {"miou": m} for s, m in mixed.items()}}
    summary, table = summarize(runs, [25], ["toy@0.9x8"])
    paired = summary["25"]["paired:toy@0.9x8"]
    assert paired["seeds"] == [0, 1, 2] and paired["ahead"] == 2
    assert [round(g, 6) for g in paired["per_seed_points"]] == [12.0, 5.0, -1.0]
    expected_p = ttest_rel(list(mixed.values()), list(real.values())).pvalue
    assert abs(paired["p_paired"] - expected_p) < 1e-12
    assert f"+5.3 (2 of 3 seeds ahead, p {expected_p:.2g})" in table


def test_table_of_some_seeds_leaves_out_the_json_runs_of_other_seeds(tmp_path, few_labels):
    real = {f"real_only/4/seed{s}": {"miou": m} for s, m in [(0, 0.40), (1, 0.50), (2, 0.90)]}
    (tmp_path / "real.json").write_text(json.dumps({"config": {}, "runs": real}))
    mixed = {f"mixed:toy@0.5x8/4/seed{s}": {"miou": m} for s, m in [(0, 0.60), (1, 0.70), (2, 0.20)]}
    (tmp_path / "few.json").write_text(json.dumps({"config": {"steps": 1, "extra": []}, "runs": mixed}))
    done = few_labels(tmp_path, "--table-only", "--sizes", "4", "--seeds", "1", "2", "--models", "toy", "--steps", "1",
                      "--synthetic-length", "8", "--baseline", str(tmp_path / "real.json"), "--json", str(tmp_path / "few.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((tmp_path / "few.json").read_text())
    row = saved["summary"]["4"]
    # Seeds 1 and 2 on both sides: mixed 0.45, not the three seeds' 0.50; seed 0's run stays in the JSON.
    assert row["mixed:toy@0.5x8"]["seeds"] == 2 and abs(row["mixed:toy@0.5x8"]["mean"] - 0.45) < 1e-9
    assert row["real_only"]["seeds"] == 2 and abs(row["gain_points:toy@0.5x8"] - (0.45 - 0.70) * 100) < 1e-9
    assert "mixed:toy@0.5x8/4/seed0" in saved["runs"]
    assert "| 4 | 0.700 ± 0.283 (2) | 0.450 ± 0.354 (2) | -25.0 (1 of 2 seeds ahead" in done.stdout
