"""What the benchmarks share: running the training script, the IoU counts they score masks with,
and writing results."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train" / "train_deeplab.py"


def output_dir(flags: list[str]) -> Path:
    """The ``--output-dir`` a list of train_deeplab.py flags names (the last one wins, as in argparse)."""
    values = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == "--output-dir"]
    values += [flag.split("=", 1)[1] for flag in flags if flag.startswith("--output-dir=")]
    if not values:
        raise ValueError("the training flags name no --output-dir, so its metrics.jsonl cannot be found")
    return Path(values[-1])


def train(flags: list[str], **run_options) -> dict:
    """Run ``python train/train_deeplab.py *flags`` as a subprocess; its final summary.

    Output goes where this process's goes unless ``run_options`` (passed to
    :func:`subprocess.run`: ``stdout``, ``env``, ...) say otherwise. A failed run raises
    :class:`RuntimeError` with its exit code. ``flags`` must name ``--output-dir``; a summary
    left there by an earlier run is never returned for this one.
    """
    directory = output_dir(flags)
    metrics = directory / "metrics.jsonl"
    earlier = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    done = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *flags], **run_options)
    if done.returncode != 0:
        raise RuntimeError(f"train/train_deeplab.py {' '.join(flags)} failed with exit code {done.returncode}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()[earlier:]] if metrics.is_file() else []
    finals = [row for row in rows if row.get("event") == "final"]
    if not finals:
        raise RuntimeError(f"train/train_deeplab.py exited 0 but wrote no 'final' row to {metrics}")
    return finals[-1]


def intersection_union(prediction: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[int, int]:
    """Intersection and union pixel counts of two boolean masks, over ``valid`` pixels only."""
    if valid is not None:
        prediction, truth = prediction & valid, truth & valid
    return int((prediction & truth).sum()), int((prediction | truth).sum())


def centre_box(height: int, width: int) -> torch.Tensor:
    """``[H, W]`` bool: the middle half of each side, the "object is in the middle" baseline."""
    box = torch.zeros(height, width, dtype=torch.bool)
    box[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    return box


def resumable_runs(path: Path | None, config: dict) -> dict:
    """The runs an earlier invocation wrote into the results JSON ``path`` (``{"config", "runs"}``), so
    an interrupted table resumes; refused when they were made with another ``config`` (steps, flags),
    whose figures would mix into this table unseen."""
    if path is None or not path.exists():
        return {}
    data = json.loads(path.read_text())
    earlier = data.get("config", config)
    if earlier != config:
        changed = ", ".join(f"{k}: {earlier.get(k)!r} there, {config.get(k)!r} now"
                            for k in sorted(set(earlier) | set(config)) if earlier.get(k) != config.get(k))
        raise SystemExit(f"error: {path} holds runs made with other settings ({changed}); "
                         "pass another --json or the same settings")
    return data.get("runs", {})


def baseline_runs(path: Path | None) -> dict | None:
    """The runs of another results JSON (``--baseline``: real-only runs made with other trainer flags), or
    None without one; refused, naming the path, when it is missing or holds no runs."""
    if path is None:
        return None
    if not path.is_file():
        raise SystemExit(f"error: --baseline {path} does not exist")
    try:
        return json.loads(path.read_text())["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SystemExit(f"error: --baseline {path} is not a benchmark results JSON with runs ({error!r})") from None


def paired_gain(runs: dict[int, float], baseline: dict[int, float]) -> dict:
    """``runs`` against ``baseline`` (seed -> mIoU) over the seeds both have: the mean gain and the
    gain per seed in points, how many seeds ``runs`` is ahead on, and with two or more seeds that
    differ, the paired sample sd in points and the paired t-test's two-sided p (scipy). Empty when no
    seed is shared."""
    from scipy.stats import ttest_rel

    shared = sorted(set(runs) & set(baseline))
    if not shared:
        return {}
    gains = [100 * (runs[s] - baseline[s]) for s in shared]
    row = {"seeds": shared, "gain_points": statistics.fmean(gains), "per_seed_points": gains,
           "ahead": sum(g > 0 for g in gains)}
    if len(gains) > 1 and len(set(gains)) > 1:
        row["paired_sd_points"] = statistics.stdev(gains)
        row["p_paired"] = float(ttest_rel([runs[s] for s in shared], [baseline[s] for s in shared]).pvalue)
    return row


def write_json(path: Path | None, data) -> None:
    """Write ``data`` as indented JSON to ``path`` (creating folders); nothing when ``path`` is None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str))
