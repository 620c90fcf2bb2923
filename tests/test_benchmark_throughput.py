"""benchmarks/throughput.py's GPU commands, tried on the CPU: the full-size architectures it builds
are the published ones, and its family-generic bare/capture modes run end to end."""
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import throughput  # noqa: E402
from architectures import ARCHITECTURES, DENOISER_PARAMS_M, build_pipeline  # noqa: E402

from ondemand_seg.pipelines.families import describe_pipeline, family_of  # noqa: E402


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_size_architectures_have_the_published_sizes(arch):
    # On the meta device nothing is allocated, so a 12B-parameter Flux is checked in seconds.
    pipeline = build_pipeline(arch, device="meta")
    family = family_of(type(pipeline).__name__)
    denoiser = getattr(pipeline, family.denoiser)
    assert sum(p.numel() for p in denoiser.parameters()) / 1e6 == pytest.approx(DENOISER_PARAMS_M[arch], abs=0.1)
    spec = describe_pipeline(pipeline)
    assert spec.default_size == (512 if arch == "sd15" else 1024)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="'sd4'"):
        build_pipeline("sd4")


@pytest.fixture(params=["in-process", pytest.param("subprocess", marks=pytest.mark.slow)])
def workers(request, monkeypatch):
    """How throughput.py runs its per-setting workers: in their own processes, as users run it, or
    in this one (the same measuring code, without a process start per worker)."""
    if request.param == "in-process":
        def run_here(argv: list[str], job: str) -> dict:
            row = throughput.run_worker(throughput.get_args_parser().parse_args([*argv, "--worker", job]))
            return json.loads(json.dumps(row))  # as the worker's JSON line reads back

        monkeypatch.setattr(throughput, "_worker", run_here)
    return request.param


def test_tiny_transformer_row_times_bare_and_capture(tmp_path, workers):
    out = tmp_path / "sd3.json"
    assert throughput.main(["--arch", "sd3", "--random-weights", "--tiny", "--device", "cpu", "--batch-sizes", "1",
                            "--schedules", "default:2", "--repeats", "1", "--modes", "bare", "diffumask",
                            "repairs", "--capture-kernel", "sdpa", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["steps"] == 2 and row["batch"] == 1 and row["capture_kernel"] == "sdpa"
    assert set(row["seconds_per_call"]) == {"bare", "diffumask", "repairs"}
    assert row["time_over_bare"]["bare"] == 1.0 and row["time_over_bare"]["diffumask"] > 0
    assert row["attention_store_kb"]["diffumask"] > 0 and row["attention_store_kb"]["bare"] == 0
    # One running sum per layer-head instead of one per resolution.
    assert row["attention_store_kb"]["repairs"] > row["attention_store_kb"]["diffumask"]


def test_naive_mode_needs_a_unet(workers):
    with pytest.raises(SystemExit, match="naive needs a UNet model"):
        throughput.main(["--arch", "flux", "--random-weights", "--tiny", "--device", "cpu", "--batch-sizes", "1",
                         "--schedules", "default:2", "--modes", "naive", "--repeats", "1"])
