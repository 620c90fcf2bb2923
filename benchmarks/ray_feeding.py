"""Feeding from Ray actors against DataLoader workers: samples/s of the same samples reaching a
consumer that only counts them.

For each worker count K: ``ondemand_seg.ray.generate(..., actors=K, num_cpus=1)`` read with
``iter_batches``, and ``DiffuMaskStream`` (``reuse=1``, no augmentation: raw arrays) through a
``DataLoader`` with K workers; the toy model with its preset, one torch thread per generating
process. Each run is its own subprocess; the clock starts when the consumer asks for its first
batch, so it includes starting the actors or workers and loading the model in each (for Ray, not
``ray.init``, timed on its own). ``--repeats`` rounds run the settings in turn, so that a change in
the machine's load falls on all of them; the table shows medians.

    python benchmarks/ray_feeding.py --json benchmarks/results/ray_feeding.json
    python benchmarks/ray_feeding.py --n 40 --workers 1 --repeats 1 --json /tmp/try.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import write_json

PATHS = ("dataloader", "ray")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="samples/s from Ray actors vs DataLoader workers")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--n", type=int, default=200, help="samples per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="actors / DataLoader workers")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--batch-size", type=int, default=20, help="samples per batch the consumer reads")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every setting")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def as_arrays(image, target):
    """The raw pair as arrays, what a Ray row holds (DataLoader's collate stacks them)."""
    return np.asarray(image), np.asarray(target)


def batches(job: dict):
    """The consumer's batches for ``job``, and the seconds ``ray.init`` took (Ray only)."""
    from ondemand_seg.toyworld import TOY_CLASSES

    classes = list(TOY_CLASSES[1:])
    if job["path"] == "ray":
        import ray

        import ondemand_seg.ray

        started = time.perf_counter()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        init = time.perf_counter() - started
        dataset = ondemand_seg.ray.generate(job["model"], classes, job["n"], actors=job["workers"], num_cpus=1)
        return dataset.iter_batches(batch_size=job["batch_size"]), init
    from torch.utils.data import DataLoader

    from ondemand_seg import DiffuMaskStream

    stream = DiffuMaskStream(job["model"], classes, num_samples=job["n"], transforms=as_arrays)
    return DataLoader(stream, batch_size=job["batch_size"], num_workers=job["workers"]), None


def worker(job: dict) -> dict:
    """One run, in this process: the seconds to the first batch and to the last sample."""
    import torch

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    loader, init = batches(job)
    started = time.perf_counter()
    seen, first = 0, None
    for batch in loader:
        seen += len(batch["index"]) if isinstance(batch, dict) else len(batch[0])
        if first is None:
            first = (time.perf_counter() - started, seen)
    seconds = time.perf_counter() - started
    if seen != job["n"]:
        raise RuntimeError(f"{job['path']} with {job['workers']} worker(s) gave {seen} samples, not {job['n']}")
    return {**job, "seconds": seconds, "samples_per_s": seen / seconds, "first_batch_seconds": first[0],
            "after_first_batch_samples_per_s": (seen - first[1]) / (seconds - first[0]), "ray_init_seconds": init,
            "load_average_1min_at_start": load}


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    jobs = [{"path": path, "workers": workers, "model": args.model, "n": args.n, "batch_size": args.batch_size}
            for workers in args.workers for path in args.paths]
    config = {key: value for key, value in vars(args).items() if key != "worker"}
    runs = []
    for round_ in range(args.repeats):
        for job in jobs:
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise RuntimeError(f"run {job} failed:\n{done.stderr[-3000:]}")
            runs.append({**json.loads(done.stdout.strip().splitlines()[-1]), "round": round_})
            print(json.dumps(runs[-1]), flush=True)
            write_json(args.json, {"config": config, "runs": runs})
    summary = []
    print("| path | workers | samples/s (median) | after the first batch | first batch (s) |\n|---|---|---|---|---|")
    for job in jobs:
        mine = [r for r in runs if (r["path"], r["workers"]) == (job["path"], job["workers"])]
        row = {"path": job["path"], "workers": job["workers"], "runs": len(mine),
               **{key: statistics.median(r[key] for r in mine)
                  for key in ("samples_per_s", "after_first_batch_samples_per_s", "first_batch_seconds")}}
        summary.append(row)
        print(f"| {row['path']} | {row['workers']} | {row['samples_per_s']:.2f} | "
              f"{row['after_first_batch_samples_per_s']:.2f} | {row['first_batch_seconds']:.1f} |")
    write_json(args.json, {"config": config, "runs": runs, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
