"""Throughput: what attention capture and mask extraction cost over the bare diffusers pipeline.

Three modes on the same model, settings, batch size and seeds, each in its own subprocess so that
peak memory is its own (CUDA max allocated on GPU, peak RSS on CPU):

- ``bare``: ``StableDiffusionPipeline`` with diffusers' fused attention, no capture;
- ``diffumask``: the library's sampler (capture on the fused path, running sums, mask extraction);
- ``naive``: DAAM-style capture that materialises the softmax of every attention layer (self and
  cross) at every step and keeps it until the end.

CPU default: the embedded toy model. GPU: ``--arch sd15 --random-weights`` builds the full-size
Stable Diffusion 1.5 architecture from its published config with random weights (same FLOPs as
the real model, no download).

    python benchmarks/throughput.py --json out.json
    python benchmarks/throughput.py --arch sd15 --random-weights --batch-sizes 1 4 16 \
        --schedules ddim:50 dpm:20 --json gpu.json
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODES = ("bare", "diffumask", "naive")
SCHEDULERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="images/s and peak memory: bare pipeline vs DiffuMask vs naive capture")
    parser.add_argument("--model", default="toy", help="model for CPU runs (default: the embedded toy model)")
    parser.add_argument("--arch", choices=["sd15"], default=None, help="build this architecture instead of --model")
    parser.add_argument("--random-weights", action="store_true", help="with --arch: random weights (no download)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model preset's, 512 for sd15")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4])
    parser.add_argument("--schedules", nargs="+", default=["ddim:20", "ddim:50"],
                        help="scheduler:steps pairs, scheduler in " + ", ".join(SCHEDULERS))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting (after one warm-up)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def sd15_pipeline():
    """Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L/14 text encoder, from their published
    configs, with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ondemand_seg.tiny import BASE_WORDS, build_clip_tokenizer

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu",
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    # A real CLIP vocabulary cannot be downloaded; token ids only index the random embeddings.
    tokenizer = build_clip_tokenizer(BASE_WORDS + ("dog", "bird", "cat"))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


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
    """The pipeline, its image size and a prompt, on ``device`` in the library's dtype."""
    from ondemand_seg.sampler import load_pipeline, read_preset

    if args.arch == "sd15":
        if not args.random_weights:
            raise SystemExit("--arch sd15 needs --random-weights (real weights are loaded with --model)")
        pipeline = load_pipeline(sd15_pipeline, device, SCHEDULERS[scheduler])
        return pipeline, args.image_size or 512, ("dog", "a photograph of a dog", 0), {}
    preset = read_preset(args.model)
    pipeline = load_pipeline(args.model, device, SCHEDULERS[scheduler])
    label_space = preset.get("label_space", ["background", "dog"])
    name = label_space[1]
    template = preset.get("sampler", {}).get("templates", ["a photograph of a {}"])[0]
    return pipeline, args.image_size or preset.get("image_size", 512), (name, template.format(name), 1), preset.get("mask", {})


def run_worker(args) -> dict:
    """One mode at one setting, in this process: median images/s over the repeats and peak memory."""
    from ondemand_seg import MaskConfig, SamplerConfig
    from ondemand_seg.config import from_dict
    from ondemand_seg.prompts import PromptSpec
    from ondemand_seg.sampler import DiffuMaskSampler, pick_device

    mode, scheduler, steps, batch = args.worker.split(",")
    steps, batch = int(steps), int(batch)
    device = pick_device(args.device)
    pipeline, size, (name, text, class_id), mask_options = build(args, device, scheduler)
    prompts = [PromptSpec(text, (name,), (class_id,), (name,))] * batch
    seeds = list(range(batch))
    if mode == "diffumask":
        sampler = DiffuMaskSampler(pipeline, from_dict(MaskConfig, mask_options), SamplerConfig(num_inference_steps=steps))
        memory = []
        original_reset = sampler.store.reset

        def reset_and_measure():
            memory.append(sampler.store.memory_bytes())
            original_reset()

        sampler.store.reset = reset_and_measure

        def call():
            sampler.generate(prompts, seeds, (size, size))
    else:
        naive = NaiveStore()
        if mode == "naive":
            pipeline.unet.set_attn_processor(NaiveProcessor(naive))

        def call():
            naive.maps.clear()
            with torch.inference_mode():
                pipeline([p.text for p in prompts], height=size, width=size, num_inference_steps=steps,
                         generator=[torch.Generator(device).manual_seed(s) for s in seeds], output_type="pt")
            memory.append(naive.bytes())

        memory = []
    call()  # warm-up: kernels, allocator, lazy imports
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    store_bytes = max(memory) if memory else 0
    return {"mode": mode, "scheduler": scheduler, "steps": steps, "batch": batch, "image_size": size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "seconds_per_call": statistics.median(times), "images_per_s": batch / statistics.median(times),
            "peak_memory_mb": peak / 2**20, "attention_store_kb": store_bytes / 2**10}


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for schedule in args.schedules:
        scheduler, steps = schedule.split(":")
        if scheduler not in SCHEDULERS:
            raise SystemExit(f"unknown scheduler {scheduler!r} in {schedule!r}; use one of {sorted(SCHEDULERS)}")
        for batch in args.batch_sizes:
            for mode in args.modes:
                command = [sys.executable, __file__, *forwarded, "--worker", f"{mode},{scheduler},{steps},{batch}"]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{mode} {schedule} batch {batch} failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{mode:9s} {schedule:8s} batch {batch:2d}: {row['images_per_s']:8.3f} img/s, "
                      f"peak {row['peak_memory_mb']:9.1f} MB, attention store {row['attention_store_kb']:10.1f} KB", flush=True)
    summary = []
    for schedule in args.schedules:
        scheduler, steps = schedule.split(":")
        for batch in args.batch_sizes:
            by_mode = {r["mode"]: r for r in rows if (r["scheduler"], r["steps"], r["batch"]) == (scheduler, int(steps), batch)}
            if "bare" in by_mode:
                bare = by_mode["bare"]["seconds_per_call"]
                summary.append({"scheduler": scheduler, "steps": int(steps), "batch": batch,
                                **{f"{m}_time_over_bare": by_mode[m]["seconds_per_call"] / bare for m in by_mode if m != "bare"}})
    for line in summary:
        print(json.dumps(line))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "ratios": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
