"""Throughput: what attention capture and mask extraction cost over the bare diffusers pipeline.

Four modes on the same model, settings, batch size and seeds, each in its own subprocess so that
peak memory is its own (CUDA max allocated on GPU, peak RSS on CPU):

- ``bare``: ``StableDiffusionPipeline`` with diffusers' fused attention, no capture;
- ``diffumask``: the library's generator (capture on the fused path, running sums, mask extraction);
- ``repairs``: the library's generator keeping one running sum per layer-head and rescaling the text
  tokens per pixel as recorded (``MaskConfig(aggregation="entropy", token_rescaling="tokens")``),
  what the label-free repairs cost over ``diffumask``;
- ``naive``: DAAM-style capture that materialises the softmax of every attention layer (self and
  cross) at every step and keeps it until the end.

``naive`` exists for the UNet families (SD 1.x/2.x, SDXL) only. ``bare`` runs the denoiser with
the attention processors it was built with (diffusers' fused defaults for every family).

CPU default: the embedded toy model. GPU: ``--arch sd15|sdxl|sd3|flux --random-weights`` builds
that model's full-size architecture from its published config with random weights (same FLOPs as
the real model, no download; see ``architectures.py``); ``--tiny`` builds the family's tiny test
pipeline instead, to try a GPU command on a CPU in seconds.

    python benchmarks/throughput.py --json out.json
    python benchmarks/throughput.py --arch sd15 --random-weights --batch-sizes 1 4 16 \
        --schedules ddim:50 dpm:20 --json gpu.json
    python benchmarks/throughput.py --arch sd15 --random-weights --batch-sizes 8 --schedules ddim:50 \
        --modes bare diffumask --capture-kernel explicit --json gpu_explicit.json
    python benchmarks/throughput.py --arch sdxl --random-weights --batch-sizes 1 4 --schedules default:20 \
        --modes bare diffumask --json sdxl.json
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from architectures import ARCHITECTURES, IMAGE_SIZES, TINY_FLAVORS, build_pipeline
from common import write_json

MODES = ("bare", "diffumask", "repairs", "naive")
# The MaskConfig fields of the "repairs" mode: the ones that change what capture keeps or computes.
REPAIRS = {"aggregation": "entropy", "token_rescaling": "tokens"}
# "default" keeps the pipeline's own scheduler (flow matching for SD3 and Flux).
SCHEDULERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "flow": "FlowMatchEulerDiscreteScheduler",
              "default": None}
NAIVE_FAMILIES = ("sd", "sdxl")  # NaiveProcessor is UNet cross/self-attention


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="images/s and peak memory: bare pipeline vs DiffuMask vs naive capture")
    parser.add_argument("--model", default="toy", help="model for CPU runs (default: the embedded toy model)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default=None, help="build this architecture instead of --model")
    parser.add_argument("--random-weights", action="store_true", help="with --arch: random weights (no download)")
    parser.add_argument("--tiny", action="store_true",
                        help="with --arch: the family's tiny test pipeline (a CPU try-out of a GPU command)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="default: the model preset's; with --arch the model's own (512 sd15, 1024 others)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4])
    parser.add_argument("--schedules", nargs="+", default=["ddim:20", "ddim:50"],
                        help="scheduler:steps pairs, scheduler in " + ", ".join(SCHEDULERS))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting (after one warm-up)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--capture-kernel", choices=("auto", "sdpa", "explicit"), default="auto",
                        help="how capture computes the class-token mass (GeneratorConfig.capture_kernel): "
                             "auto is sdpa on CUDA, explicit elsewhere")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None,
                        help="also write each mode's torch.profiler table (top kernels by device time) to this folder")
    parser.add_argument("--compile", action="store_true",
                        help="GeneratorConfig(compile=True): the denoiser compiled in place (so bare runs compiled too)")
    parser.add_argument("--channels-last", action="store_true",
                        help="GeneratorConfig(channels_last=True) (bare runs channels-last too)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


class NaiveStore:
    """Every attention probability of every layer and step, kept (what DAAM-style tools hold)."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.maps)


class NaiveProcessor:
    """Explicit softmax attention that stores its probabilities."""

    def __init__(self, store: NaiveStore) -> None:
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)
        self.store.maps.append(probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def build(args, device: torch.device, scheduler: str):
    """The pipeline on ``device`` in the library's dtype, its image size, a prompt, and the settings
    the generator is built with (a :class:`DiffuMaskConfig`: label space, mask and generator sections).

    With ``--model``: the model's preset (image size, mask and generator settings) and the first
    class of its vocabulary, prompted in the vocabulary's words ("a photo of a circle" for the toy
    model); a model without a vocabulary in its preset is prompted "a photograph of a dog", as
    the ``--arch`` pipelines are (with the library's default settings).
    """
    from ondemand_seg.pipelines.builtin import read_preset
    from ondemand_seg.pipelines.families import family_of
    from ondemand_seg.pipelines.loading import load_pipeline
    from ondemand_seg.settings.resolve import resolve_config
    from ondemand_seg.settings.vocabulary import PromptSpec

    dog = {"label_space": ("background", "dog")}
    if args.arch is not None:
        if not args.random_weights:
            raise SystemExit(f"--arch {args.arch} needs --random-weights (real weights are loaded with --model)")
        if args.tiny:
            from ondemand_seg.pipelines.tiny import (
                TINY_IMAGE_SIZES,
                build_tiny_pipeline,
            )

            flavor = TINY_FLAVORS[args.arch]
            build, size = functools.partial(build_tiny_pipeline, flavor), TINY_IMAGE_SIZES[flavor]
        else:
            family = family_of(type(build_pipeline(args.arch, device="meta")).__name__)
            dtype = family.gpu_dtype if device.type == "cuda" else torch.float32
            build, size = functools.partial(build_pipeline, args.arch, device, dtype), IMAGE_SIZES[args.arch]
        pipeline = load_pipeline(build, device, SCHEDULERS[scheduler])
        config = resolve_config(build, **dog)
        return pipeline, args.image_size or size, PromptSpec("a photograph of a dog", ("dog",), (1,), ("dog",)), config
    preset = read_preset(args.model)
    config = resolve_config(args.model, **({} if "vocabulary" in preset or "label_space" in preset else dog))
    name = config.label_space[1]
    prompt = config.vocabulary.sample_multi(random.Random(0), [name], [1])
    pipeline = load_pipeline(args.model, device, SCHEDULERS[scheduler])
    return pipeline, args.image_size or config.image_size[0], prompt, config


def make_calls(args, device, scheduler: str, steps: int, batch: int):
    """Pipeline call functions for each mode, sharing one pipeline; each swaps in its processors.

    Returns ``(calls, store_bytes, size)``: ``calls[mode]()`` generates one batch, ``store_bytes[mode]``
    lists the capture memory each call held.
    """
    from ondemand_seg import DiffuMaskGenerator
    from ondemand_seg.pipelines.families import family_of

    pipeline, size, prompt, config = build(args, device, scheduler)
    family = family_of(type(pipeline).__name__)
    if "naive" in args.modes and family.name not in NAIVE_FAMILIES:
        raise SystemExit(f"--modes naive needs a UNet model (SD 1.x/2.x, SDXL); this is {family.title}")
    denoiser = getattr(pipeline, family.denoiser)
    bare_processors = dict(denoiser.attn_processors)  # as built: diffusers' fused defaults
    # The scheduler was set at load; one generation call per batch.
    settings = dataclasses.replace(config.generator, num_inference_steps=steps, batch_size=batch, scheduler=None,
                                   compile=args.compile, channels_last=args.channels_last,
                                   capture_kernel=args.capture_kernel)
    generator = DiffuMaskGenerator(lambda: pipeline, prompt.class_names, device=device, image_size=size,
                                   label_space=config.label_space, mask=config.mask, generator=settings)
    capturing = generator.capturing  # installs the capture processors (and compiles, with --compile)
    capturing.spec.check_image_size((size, size))
    prompts = [prompt] * batch
    seeds = list(range(batch))
    store_bytes = {mode: [] for mode in MODES}
    capture = dict(denoiser.attn_processors)
    repairing = DiffuMaskGenerator(lambda: pipeline, prompt.class_names, device=device, image_size=size,
                                   label_space=config.label_space, mask=dataclasses.replace(config.mask, **REPAIRS),
                                   generator=settings)
    repairing.capturing  # installs its own capture processors, kept apart as the "repairs" mode's
    repair_capture = dict(denoiser.attn_processors)

    def measure_on_reset(mode: str, store) -> None:
        reset = store.reset

        def reset_and_measure():
            # The generator drops the store's sums when its call ends: their size is read then.
            store_bytes[mode].append(store.memory_bytes())
            reset()

        store.reset = reset_and_measure

    measure_on_reset("diffumask", capturing.store)
    measure_on_reset("repairs", repairing.capturing.store)
    naive = NaiveStore()

    def run_pipeline():
        # The generator's own call: same guidance, text lengths and size options, so only capture differs.
        with torch.inference_mode():
            pipeline([p.text for p in prompts], height=size, width=size, num_inference_steps=steps,
                     guidance_scale=capturing.generator_config.guidance_scale,
                     generator=[torch.Generator(device).manual_seed(s) for s in seeds], output_type="pt",
                     **capturing.call_options)

    def bare():
        denoiser.set_attn_processor(dict(bare_processors))  # diffusers consumes the dict it is given
        run_pipeline()

    def diffumask():
        denoiser.set_attn_processor(dict(capture))
        generator.generate(prompts, seeds)

    def repairs():
        denoiser.set_attn_processor(dict(repair_capture))
        repairing.generate(prompts, seeds)

    def naive_capture():
        denoiser.set_attn_processor(NaiveProcessor(naive))
        naive.maps.clear()
        run_pipeline()
        store_bytes["naive"].append(naive.bytes())

    return {"bare": bare, "diffumask": diffumask, "repairs": repairs, "naive": naive_capture}, store_bytes, size


def profile_modes(args, calls, device: torch.device, tag: str) -> None:
    """One more call of each mode under torch.profiler; its operator table, sorted by device time
    (CPU time on CPU), goes to ``args.profile / f"{mode}_{tag}.txt"``: where a mode's extra time goes."""
    from torch.profiler import ProfilerActivity, profile

    args.profile.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for mode in args.modes:
        with profile(activities=activities) as prof:
            calls[mode]()
            if device.type == "cuda":
                torch.cuda.synchronize()
        (args.profile / f"{mode}_{tag}.txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40))


def run_worker(args) -> dict:
    """In this process: ``timing`` interleaves the modes call by call (so machine drift hits all
    alike) and reports median seconds per call; a mode name runs that mode alone for its peak memory."""
    from ondemand_seg.pipelines.devices import pick_device

    job, scheduler, steps, batch = args.worker.split(",")
    steps, batch = int(steps), int(batch)
    device = pick_device(args.device)
    calls, store_bytes, size = make_calls(args, device, scheduler, steps, batch)

    def timed(call) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    info = {"scheduler": scheduler, "steps": steps, "batch": batch, "image_size": size,
            "capture_kernel": args.capture_kernel, "compile": args.compile, "channels_last": args.channels_last,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if job == "timing":
        for mode in args.modes:
            calls[mode]()  # warm-up: kernels, allocator, lazy imports
        times = {mode: [] for mode in args.modes}
        for _ in range(args.repeats):
            for mode in args.modes:
                times[mode].append(timed(calls[mode]))
        if args.profile:
            profile_modes(args, calls, device, f"{scheduler}{steps}_b{batch}")
        return {**info, "seconds_per_call": {m: statistics.median(t) for m, t in times.items()},
                "images_per_s": {m: batch / statistics.median(t) for m, t in times.items()}}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    calls[job]()
    calls[job]()
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**info, "mode": job, "peak_memory_mb": peak / 2**20, "attention_store_kb": max(store_bytes[job] or [0]) / 2**10}


def _worker(argv: list[str], job: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *argv, "--worker", job], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    forwarded = list(argv if argv is not None else sys.argv[1:])
    rows = []
    for schedule in args.schedules:
        scheduler, steps = schedule.split(":")
        if scheduler not in SCHEDULERS:
            raise SystemExit(f"unknown scheduler {scheduler!r} in {schedule!r}; use one of {sorted(SCHEDULERS)}")
        for batch in args.batch_sizes:
            timing = _worker(forwarded, f"timing,{scheduler},{steps},{batch}")
            memory = {m: _worker(forwarded, f"{m},{scheduler},{steps},{batch}") for m in args.modes}
            row = {**timing, "load_average_1min": os.getloadavg()[0], "peak_memory_mb": {m: r["peak_memory_mb"] for m, r in memory.items()},
                   "attention_store_kb": {m: r["attention_store_kb"] for m, r in memory.items()}}
            if "bare" in args.modes:
                bare = timing["seconds_per_call"]["bare"]
                row["time_over_bare"] = {m: t / bare for m, t in timing["seconds_per_call"].items()}
            rows.append(row)
            for m in args.modes:
                print(f"{m:9s} {schedule:8s} batch {batch:2d}: {row['images_per_s'][m]:8.3f} img/s"
                      f" ({row.get('time_over_bare', {}).get(m, float('nan')):.3f}x bare time), "
                      f"peak {row['peak_memory_mb'][m]:9.1f} MB, attention store {row['attention_store_kb'][m]:10.1f} KB", flush=True)
            write_json(args.json, rows)  # after every row: a long GPU run cut short keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
