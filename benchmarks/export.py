"""Export: samples/s and MB per 1,000 samples of each format, and the peak memory of exporting 1,000
and 10,000 samples (flat if nothing holds all samples).

Each run is its own subprocess calling ``ondemand_seg.export`` on the toy model with one generating
process (``workers=0``), so its peak RSS is its own; ``generate`` draws the same samples without
writing them, the cost the formats add to. MB counts the data files (not ``metadata.json`` and the
per-shard stats). Runs already in ``--json`` under the same settings are kept, so an interrupted
table resumes.

    python benchmarks/export.py --json benchmarks/results/export.json
    python benchmarks/export.py --formats hf --n 50 --rss-sizes 100 --json /tmp/try.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import resumable_runs, write_json

FORMATS = ("voc", "webdataset", "hf")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="export samples/s, MB per 1,000 samples and peak memory per format")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--image-formats", nargs="+", choices=("jpg", "png"), default=["jpg", "png"])
    parser.add_argument("--n", type=int, default=200, help="samples per speed and size run")
    parser.add_argument("--gen-steps", type=int, default=None, help="denoising steps of the speed runs (default: preset)")
    parser.add_argument("--rss-format", choices=FORMATS, default="hf", help="format of the peak-memory runs")
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[1000, 10000], help="samples per peak-memory run")
    parser.add_argument("--rss-steps", type=int, default=2, help="denoising steps of the peak-memory runs")
    parser.add_argument("--shard-size", type=int, default=1000)
    # On a shared CPU every op of a two-thread run waits for whichever thread is descheduled.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each run")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def data_bytes(out: Path) -> int:
    """Bytes of an export's data files: all but its metadata and per-shard stats."""
    return sum(path.stat().st_size for path in out.rglob("*")
               if path.is_file() and path.name != "metadata.json" and "shard-stats" not in path.parts)


def worker(job: dict) -> dict:
    """One run, in this process: an export (or only the generation) timed, sized and its peak RSS."""
    import torch

    import ondemand_seg

    torch.set_num_threads(job["threads"])
    generator = ondemand_seg.DiffuMaskGenerator(job["model"], job["classes"],
                                                generator={"num_inference_steps": job["steps"]} if job["steps"] else None)
    generator.samples([0])  # load the pipeline before the clock starts
    started = time.perf_counter()
    row = {"n": job["n"], "steps": generator.generator_config.num_inference_steps,
           "batch_size": generator.generator_config.batch_size, "threads": torch.get_num_threads()}
    if job["format"] == "generate":
        batch = generator.generator_config.batch_size
        for first in range(0, job["n"], batch):
            generator.samples(range(first, min(first + batch, job["n"])))
    else:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "export"
            metadata = ondemand_seg.export(generator, out, job["n"], format=job["format"],
                                           image_format=job["image_format"], shard_size=job["shard_size"],
                                           progress=False)
            row |= {"bytes": data_bytes(out), "mb_per_1000": data_bytes(out) / job["n"] * 1000 / 1e6,
                    "files": sum(1 for path in out.rglob("*") if path.is_file()), "gate": metadata["gate"]}
    seconds = time.perf_counter() - started
    return row | {"seconds": seconds, "samples_per_s": job["n"] / seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run(job: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> None:
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from ondemand_seg import resolve_config

    classes = list(resolve_config(args.model, ()).label_space[1:])
    config = {"model": args.model, "classes": classes, "shard_size": args.shard_size, "speed_steps": args.gen_steps,
              "rss_steps": args.rss_steps, "threads": args.threads}
    runs = resumable_runs(args.json, config)
    base = {"model": args.model, "classes": classes, "shard_size": args.shard_size, "threads": args.threads}
    jobs = {f"generate-{args.n}": {**base, "format": "generate", "n": args.n, "steps": args.gen_steps}}
    for fmt in args.formats:
        for image_format in args.image_formats:
            jobs[f"{fmt}-{image_format}-{args.n}"] = {**base, "format": fmt, "image_format": image_format,
                                                      "n": args.n, "steps": args.gen_steps}
    for n in args.rss_sizes:
        jobs[f"{args.rss_format}-jpg-{n}-steps{args.rss_steps}"] = {**base, "format": args.rss_format,
                                                                    "image_format": "jpg", "n": n,
                                                                    "steps": args.rss_steps}
    for name, job in jobs.items():
        if name in runs:
            continue
        runs[name] = run(job)
        row = runs[name]
        print(f"{name}: {row['samples_per_s']:.1f} samples/s, peak RSS {row['peak_rss_mb']:.0f} MB"
              + (f", {row['mb_per_1000']:.2f} MB per 1,000 samples" if "mb_per_1000" in row else ""), flush=True)
        write_json(args.json, {"config": config, "runs": runs})


if __name__ == "__main__":
    main(get_args_parser().parse_args())
