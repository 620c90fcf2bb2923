"""Paired comparison of two results JSONs of ``downstream.py`` or ``few_labels.py`` made with other
trainer flags (a mask option against the preset, say): each run of the first is paired with the run
of the same name and seed in the second.

    python benchmarks/compare_runs.py benchmarks/results/downstream_600_unaided_agreement.json \
        benchmarks/results/downstream_600_unaided_preset.json

Per run name present in both: the mean and sample sd of each side over the shared seeds, the gain in
mIoU points, the seeds the first is ahead on, the paired sd and the paired t-test's two-sided p (as
``common.paired_gain``). ``--json`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import paired_gain, write_json


def runs_by_name(path: Path) -> dict[str, dict[int, float]]:
    """``{"runs": {"name/seedS": {"miou": ...}}}`` in ``path`` → ``{name: {seed: miou}}``; exits
    naming the file when it is not such a JSON."""
    try:
        runs = json.loads(path.read_text())["runs"]
        named: dict[str, dict[int, float]] = {}
        for key, run in runs.items():
            name, seed = key.rsplit("/seed", 1)
            named.setdefault(name, {})[int(seed)] = float(run["miou"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise SystemExit(f"error: {path} is not a results JSON of downstream.py or few_labels.py ({error!r})")
    return named


def compare(first: dict[str, dict[int, float]], second: dict[str, dict[int, float]]) -> dict:
    """Per name in both: each side's mean and sd over the seeds they share, and ``paired_gain``."""
    rows = {}
    for name in sorted(set(first) & set(second)):
        paired = paired_gain(first[name], second[name])
        if not paired:
            continue
        seeds = paired["seeds"]
        a, b = [first[name][s] for s in seeds], [second[name][s] for s in seeds]
        rows[name] = {**paired, "first_mean": statistics.fmean(a), "second_mean": statistics.fmean(b),
                      "first_sd": statistics.stdev(a) if len(a) > 1 else None,
                      "second_sd": statistics.stdev(b) if len(b) > 1 else None}
    return rows


def table(rows: dict) -> str:
    lines = ["| run | first | second | gain (points) | ahead | p (paired t) |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        def side(which):
            sd = row[f"{which}_sd"]
            return f"{row[f'{which}_mean']:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
        p = f"{row['p_paired']:.2g}" if "p_paired" in row else "–"
        lines.append(f"| {name} ({len(row['seeds'])} seeds) | {side('first')} | {side('second')} | "
                     f"{row['gain_points']:+.1f} | {row['ahead']} of {len(row['seeds'])} | {p} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="paired comparison of two downstream/few-labels results JSONs")
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = compare(runs_by_name(args.first), runs_by_name(args.second))
    if not rows:
        raise SystemExit(f"error: {args.first} and {args.second} share no run name and seed")
    write_json(args.json, {"first": str(args.first), "second": str(args.second), "rows": rows})
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
