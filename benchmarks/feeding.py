"""Trainer feeding: the share of the training loop's wall time spent waiting for data.

Runs train_deeplab.py --synthetic-only on the embedded toy model for each ``reuse`` and worker
count, same steps and batch, and reports ``data_wait_fraction`` (time blocked in ``next(loader)``
over the loop's time), which the training progress bar also shows live.

    python benchmarks/feeding.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import train, write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="data-wait share of the training loop vs reuse and workers")
    parser.add_argument("--reuse", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--work-dir", type=Path, default=Path("out/feeding"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more train_deeplab.py flags, after --")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    rows = []
    for workers in args.workers:
        for reuse in args.reuse:
            out = args.work_dir / f"w{workers}_r{reuse}"
            flags = ["--synthetic-only", "--reuse", str(reuse), "--workers", str(workers), "--steps", str(args.steps),
                     "--output-dir", str(out), "--data-dir", str(args.work_dir / "toyworld"), "--eval-limit", "16", *extra]
            summary = train(flags)
            rows.append({"workers": workers, "reuse": reuse, "data_wait_fraction": summary["data_wait_fraction"],
                         "train_seconds": summary["train_seconds"], "data_wait_seconds": summary["data_wait_seconds"]})
            print(json.dumps(rows[-1]), flush=True)
    print("| workers | reuse | data wait (share of loop) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['reuse']} | {r['data_wait_fraction']:.0%} |")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
