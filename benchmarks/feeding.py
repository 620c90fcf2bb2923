"""Trainer feeding: the share of the training loop's wall time spent waiting for data.

Runs train_deeplab.py --synthetic-only for each ``reuse`` and worker count, same steps and batch,
and reports ``data_wait_fraction`` (time blocked in ``next(loader)`` over the loop's time), which
the training progress bar also shows live. The generator is the embedded toy model, or with
``--arch ARCH --random-weights`` that architecture's full-size pipeline with random weights
(``architectures.py``), saved once as a folder under ``--work-dir`` and prompted with the toy
vocabulary: on a GPU its DataLoader workers generate on the device the trainer trains on.
``--tiny`` saves the family's tiny test pipeline instead, to try a GPU command on a CPU.

With ``--exports`` it trains from an export of the toy model in each format (written once under
``--work-dir``, large enough for every run's draws) and from the live stream, at the same steps,
seed and flags, and reports each run's data wait and steps/s: what reading costs the trainer next
to generating.

With ``--main-job`` it runs the main job itself (``train_deeplab.py --synthetic-only`` at its own
steps and evaluation) once per generator/feeding setting in ``MAIN_JOB``, and reports its wall time
and mIoU beside the data wait, since a setting that feeds faster must also keep the accuracy. Run
it alone on the machine: the wait and the time are what the cores give one job.

    python benchmarks/feeding.py --json out.json
    python benchmarks/feeding.py --main-job --json main_job.json
    python benchmarks/feeding.py --exports --steps 60 --rounds 2 --json exports.json -- --batch-size 8 --cache-size 16
    python benchmarks/feeding.py --arch sd15 --random-weights --reuse 1 4 16 --workers 1 --steps 20 \
        --json gpu.json -- --backbone resnet50 --batch-size 8 --crop-size 512 --gen-steps 20 --gen-batch-size 8
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from architectures import ARCHITECTURES, IMAGE_SIZES, TINY_FLAVORS, build_pipeline
from common import run_rows, train, write_json

EVAL_IMAGES = 16
EXPORT_FORMATS = ("voc", "webdataset", "hf")
# The trainer's defaults that decide how many samples a synthetic-only run draws (train_deeplab.py:
# --batch-size, --cache-size) and the toy preset's generation batch.
TRAIN_BATCH, CACHE_SIZE, GENERATION_BATCH = 16, 64, 20
# The main job with its defaults, then the feeding levers set back one at a time at 600 steps
# (where RESULTS.md compares them): the toy preset's DDIM 25 steps, torch's DataLoader prefetch of
# 2 batches, and torch's thread count for the trainer (every core: 2 on the 2-core machine
# RESULTS.md was measured on).
LEVER_STEPS = ["--steps", "600"]
MAIN_JOB = {
    "default": [],
    "ddim25_prefetch2_threads2": [*LEVER_STEPS, "--gen-steps", "25", "--prefetch-batches", "2", "--threads", "2"],
    "ddim25_threads2": [*LEVER_STEPS, "--gen-steps", "25", "--threads", "2"],
    "ddim25": [*LEVER_STEPS, "--gen-steps", "25"],
    "ddim10": [*LEVER_STEPS, "--gen-steps", "10"],
    "ddim10_reuse4": [*LEVER_STEPS, "--gen-steps", "10", "--reuse", "4"],
    "steps600": LEVER_STEPS,  # the defaults but fewer or more optimizer steps: the budget they cost
    "steps900": ["--steps", "900"],
    "steps1000": ["--steps", "1000"],
}


def random_weight_model(arch: str, tiny: bool, work_dir: Path) -> tuple[Path, int]:
    """The folder of ``arch``'s random-weight pipeline (the tiny one with ``tiny``), written on
    first use, and the image side it generates at.

    Built where it will run (the GPU when there is one) in the dtype the library loads it in; the
    folder appears only once complete, so an interrupted run leaves nothing that looks finished.
    """
    from ondemand_seg.pipelines.families import family_of
    from ondemand_seg.pipelines.tiny import TINY_IMAGE_SIZES, save_tiny_pipeline

    folder = work_dir / f"{arch}{'_tiny' if tiny else ''}_random_weights"
    size = TINY_IMAGE_SIZES[TINY_FLAVORS[arch]] if tiny else IMAGE_SIZES[arch]
    if (folder / "model_index.json").is_file():
        return folder, size
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if tiny:
        save_tiny_pipeline(partial, TINY_FLAVORS[arch])
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        family = family_of(type(build_pipeline(arch, device="meta")).__name__)
        dtype = family.gpu_dtype if device.type == "cuda" else torch.float32
        build_pipeline(arch, device, dtype).save_pretrained(partial, safe_serialization=True)
        torch.cuda.empty_cache()  # the trainer and its workers need the memory, not this process
    partial.rename(folder)
    return folder, size


def samples_drawn(steps: int, reuse: int, workers: int, extra: list[str]) -> int:
    """A bound on the samples a synthetic-only run of the trainer draws (its defaults, or its
    ``--batch-size``, ``--cache-size`` and ``--prefetch-batches`` in ``extra``), so that an export
    this large serves it whole: each worker shard draws its cache, then a sample per ``reuse``
    servings, in blocks of the generation batch, and prefetches a generation call's worth of
    batches (or ``--prefetch-batches``) past the trainer's last step."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--batch-size", type=int, default=TRAIN_BATCH)
    flags.add_argument("--cache-size", type=int, default=CACHE_SIZE)
    flags.add_argument("--prefetch-batches", type=int, default=None)
    known, _ = flags.parse_known_args(extra)
    batch = known.batch_size
    prefetch = known.prefetch_batches or max(2, -(-GENERATION_BATCH * reuse // batch))
    servings = steps * batch // max(workers, 1) + prefetch * batch
    per_shard = known.cache_size + 2 * GENERATION_BATCH + -(-servings // reuse)
    return -(-per_shard // GENERATION_BATCH) * GENERATION_BATCH * max(workers, 1)


def toy_exports(formats, n: int, work_dir: Path) -> dict[str, Path]:
    """The toy model's first ``n`` samples in each format, as ``python -m ondemand_seg export --n N``
    writes them (preset settings, seed 0, every class, JPEG images) but in two shards by two
    worker processes (the files' contents do not depend on that), written once: an export already
    there under the same plan is kept."""
    import ondemand_seg

    classes = list(ondemand_seg.resolve_config("toy").label_space[1:])
    shard_size = -(-n // (2 * GENERATION_BATCH)) * GENERATION_BATCH
    folders = {}
    for fmt in formats:
        folders[fmt] = work_dir / "exports" / f"{fmt}_{n}"
        ondemand_seg.export(ondemand_seg.DiffuMaskGenerator("toy", classes, seed=0), folders[fmt], n, format=fmt,
                            shard_size=shard_size, workers=2)
    return folders


def exports_table(args, extra: list[str]) -> int:
    """The live stream and an export per format, each read by ``train_deeplab.py --synthetic-only``
    at the same steps and flags: data wait (share of the loop and per step), steps/s (first step
    excluded), the 1-minute load average around the run and whether a pass over the export ended
    (it must not: the export is sized for the run)."""
    steps = 200 if args.steps is None else args.steps
    reuses, workers_list = args.reuse or [8], args.workers or [1]
    n = max(samples_drawn(steps, reuse, workers, extra) for reuse in reuses for workers in workers_list)
    folders = toy_exports(args.exports or EXPORT_FORMATS, n, args.work_dir)
    sources = [("live", None), *folders.items()]
    rows = []
    for workers in workers_list:
        for reuse in reuses:
            # Rounds alternate the sources' order, so that a change of the shared machine's load
            # falls on each source alike.
            for round_ in range(args.rounds):
                for source, folder in sources if round_ % 2 == 0 else sources[::-1]:
                    out = args.work_dir / "exports_runs" / f"{source}_w{workers}_r{reuse}_{round_}"
                    flags = ["--synthetic-only", "--reuse", str(reuse), "--workers", str(workers), "--steps",
                             str(steps), "--output-dir", str(out), "--eval-limit", str(EVAL_IMAGES), "--data-dir",
                             str(args.work_dir / "toyworld"), *(["--from-export", str(folder)] if folder else []),
                             *extra]
                    load_before = os.getloadavg()[0]
                    run = run_rows(flags)
                    summary = [row for row in run if row["event"] == "final"][-1]
                    loop = summary["train_seconds"] + summary["data_wait_seconds"]
                    rows.append({"source": source, "workers": workers, "reuse": reuse, "round": round_,
                                 "steps": summary["step"], "export_samples": n if folder else None,
                                 "data_wait_fraction": summary["data_wait_fraction"],
                                 "data_wait_ms_per_step": 1000 * summary["data_wait_seconds"] / (summary["step"] - 1),
                                 "steps_per_second": (summary["step"] - 1) / loop,
                                 "train_seconds": summary["train_seconds"],
                                 "data_wait_seconds": summary["data_wait_seconds"],
                                 "startup_seconds": summary["startup_seconds"], "torch_threads": summary["torch_threads"],
                                 "passes_ended": sum(row["event"] == "epoch_end" for row in run),
                                 "load_1min": [load_before, os.getloadavg()[0]], "trainer_flags": flags})
                    print(json.dumps(rows[-1]), flush=True)
                    write_json(args.json, rows)
    print("| source | workers | reuse | round | data wait | ms/step | steps/s | load |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['workers']} | {r['reuse']} | {r['round']} | {r['data_wait_fraction']:.0%} | "
              f"{r['data_wait_ms_per_step']:.0f} | {r['steps_per_second']:.2f} | {r['load_1min'][0]:.1f} |")
    return 0


def generator_flags(args, work_dir: Path) -> list[str]:
    """train_deeplab.py flags choosing the generator and the data it is scored on."""
    if args.arch is None:
        return ["--data-dir", str(work_dir / "toyworld")]
    if not args.random_weights:
        raise SystemExit(f"--arch {args.arch} needs --random-weights (real weights: the trainer's --model, after --)")
    from ondemand_seg.toyworld import write_voc

    folder, size = random_weight_model(args.arch, args.tiny, work_dir)
    # A few ToyWorld images to evaluate on: the trainer's default set (1,200 images at the
    # generator's size) would take minutes to render at 512 px, and only the data wait is measured.
    eval_root = work_dir / f"toyworld_eval_{size}"
    if not (eval_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").is_file():
        write_voc(eval_root, n_train=0, n_val=EVAL_IMAGES, image_size=size)
    return ["--model", str(folder), "--vocabulary", "toy", "--image-size", str(size), "--eval-root", str(eval_root)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="data-wait share of the training loop vs reuse and workers")
    parser.add_argument("--reuse", type=int, nargs="+", default=None, help="default: 1 4 16; with --exports, 8")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1 2; with --exports, 1")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run (default: 60; with --exports, 200; with --main-job, the "
                             "trainer's own)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default=None,
                        help="generate with this architecture instead of the toy model")
    parser.add_argument("--random-weights", action="store_true", help="with --arch: random weights (no download)")
    parser.add_argument("--tiny", action="store_true",
                        help="with --arch: the family's tiny test pipeline (a CPU try-out of a GPU command)")
    parser.add_argument("--main-job", action="store_true",
                        help="run the whole main job per --variants and report wall time and mIoU too")
    parser.add_argument("--variants", nargs="+", choices=list(MAIN_JOB), default=list(MAIN_JOB),
                        help="with --main-job: the settings to run")
    parser.add_argument("--exports", nargs="*", choices=EXPORT_FORMATS, default=None, metavar="FORMAT",
                        help="train from the toy model's export in these formats (none named: all three) and from "
                             "the live stream; report data wait and steps/s")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --exports: run every source this many times, in alternating order")
    parser.add_argument("--work-dir", type=Path, default=Path("out/feeding"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more train_deeplab.py flags, after --")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    if args.main_job:
        return main_job(args, extra)
    if args.exports is not None:
        if args.arch is not None:
            raise SystemExit("error: --exports reads exports of the toy model; drop --arch")
        return exports_table(args, extra)
    generator = generator_flags(args, args.work_dir)
    steps = 60 if args.steps is None else args.steps
    rows = []
    for workers in args.workers or [1, 2]:
        for reuse in args.reuse or [1, 4, 16]:
            out = args.work_dir / f"w{workers}_r{reuse}"
            flags = ["--synthetic-only", "--reuse", str(reuse), "--workers", str(workers), "--steps", str(steps),
                     "--output-dir", str(out), "--eval-limit", str(EVAL_IMAGES), *generator, *extra]
            summary = train(flags)
            rows.append({"model": args.arch or "toy", "workers": workers, "reuse": reuse,
                         "data_wait_fraction": summary["data_wait_fraction"], "train_seconds": summary["train_seconds"],
                         "data_wait_seconds": summary["data_wait_seconds"], "trainer_flags": flags})
            print(json.dumps(rows[-1]), flush=True)
            write_json(args.json, rows)  # after every run: a long GPU run cut short keeps what it measured
    print("| workers | reuse | data wait (share of loop) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['reuse']} | {r['data_wait_fraction']:.0%} |")
    return 0


def main_job(args, extra: list[str]) -> int:
    """Each ``--variants`` setting of ``train_deeplab.py --synthetic-only`` at its own steps (unless
    ``--steps`` is given) and full evaluation: data wait, wall minutes and mIoU."""
    if args.arch is not None:
        raise SystemExit("error: --main-job runs the toy main job; drop --arch")
    steps = [] if args.steps is None else ["--steps", str(args.steps)]
    rows = []
    for name in args.variants:
        flags = ["--synthetic-only", *MAIN_JOB[name], *steps, "--output-dir", str(args.work_dir / "main_job" / name),
                 "--data-dir", str(args.work_dir / "toyworld"), *extra]
        started = time.perf_counter()
        summary = train(flags)
        rows.append({"variant": name, "steps": summary["step"], "data_wait_fraction": summary["data_wait_fraction"],
                     "minutes": (time.perf_counter() - started) / 60, "miou": summary["miou"],
                     "train_seconds": summary["train_seconds"], "data_wait_seconds": summary["data_wait_seconds"],
                     "startup_seconds": summary["startup_seconds"], "torch_threads": summary.get("torch_threads"),
                     "trainer_flags": flags})
        print(json.dumps(rows[-1]), flush=True)
        write_json(args.json, rows)
    print("| setting | trainer threads | data wait | wall minutes | mIoU |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['torch_threads']} | {r['data_wait_fraction']:.0%} | {r['minutes']:.1f} | {r['miou']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
