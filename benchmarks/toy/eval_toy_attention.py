"""Probe: how well do ondemand_seg's attention masks from a ToyWorld model match the colour oracle?

Generates ``--per-class`` samples for each single-class prompt "a photo of a {class}" through
``ondemand_seg.DiffuMaskDataset`` (the library's own capture, fusion and thresholding), and
scores each sample's mask for the prompted class against ``color_oracle(sample.image)``: the
truth of a generated image is read back from its colours. Pixels our mask marks 255 (ignore) are
excluded. Reported per class and as the mean over the 5 classes:

* IoU: intersection / union of the prompted class, summed over the samples of that class;
* sIoU: the same per sample, then averaged (an image where the oracle does not find the class
  scores 0);
* found: share of samples in which the oracle finds the prompted class at all (image quality);
* baselines on the same images: a centred box over the middle half of each side; the fused map
  thresholded at 0.5 without ignore band, both with this config's fusion (same captured maps) and
  with the library's default fusion (``MaskConfig(threshold=0.5, ignore_band=0)``: all resolutions
  equally, all timesteps; a second library run with the same seeds).

``--search`` records the per-step attention sums of the run (the run's own window must be the
full (0, 1)) and grid-searches resolution weights, timestep window, normalisation, threshold and
ignore band offline with the library's ``fuse_resolutions``/``labels_from_maps`` on those maps.
Choose on one ``--seed``, confirm on another.

    python benchmarks/toy/eval_toy_attention.py --model ondemand_seg/models/toy --per-class 40 --search
    python benchmarks/toy/eval_toy_attention.py --model ondemand_seg/models/toy --per-class 40 --seed 1 \
        --weights 1:1 2:1 --window 0.5 1 --threshold 0.4 --ignore-band 0.05
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from ondemand_seg import DiffuMaskDataset, GeneratorConfig, MaskConfig, QualityConfig
from ondemand_seg.masks.maps import fuse_resolutions, labels_from_maps
from ondemand_seg.toyworld import TOY_CLASSES, color_oracle

CLASSES = TOY_CLASSES[1:]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--gen-steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--gen-batch-size", type=int, default=10, help="images per pipeline call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", nargs="+", default=["1:1", "2:1", "4:1"], help="factor:weight ...")
    p.add_argument("--window", type=float, nargs=2, default=[0.0, 1.0])
    p.add_argument("--normalization", default="minmax")
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--ignore-band", type=float, default=0.05)
    p.add_argument("--search", action="store_true")
    p.add_argument("--no-default-baseline", action="store_true", help="skip the second library run")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--save-grid", type=Path, help="write a PNG of images, oracle and masks")
    return p.parse_args(argv)


class Recorder:
    """Hooks one dataset's generator: per generated image, the prompt, the uint8 image (as the
    library converts it) and, after every denoising step, the mean class attention its store holds
    so far (:meth:`AttentionStore.maps`) with the layer calls behind each mean (``counts``)."""

    def __init__(self, dataset: DiffuMaskDataset) -> None:
        self.items: dict[str, dict] = {}
        capturing = dataset.source.capturing
        store = capturing.store
        steps: list = []
        original_on_step, original_generate = store.on_step, capturing.generate

        def on_step(step):
            steps.append((store.maps(), dict(store.counts)))
            original_on_step(step)

        def generate(prompts, seeds, size, keep_maps=False):
            steps.clear()
            batch = original_generate(prompts, seeds, size, keep_maps)
            images = batch.uint8_images()
            for j, prompt in enumerate(prompts):
                cumulative = [({f: m[j] for f, m in means.items()}, counts) for means, counts in steps]
                self.items[image_key(images[j])] = dict(prompt=prompt, steps=cumulative, latent=store.latent_size)
            return batch

        store.on_step = on_step
        capturing.generate = generate


def image_key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def window_maps(item: dict, window: tuple[float, float]) -> dict[int, torch.Tensor]:
    """Per-factor mean maps ``[K, h, w]`` over the steps of ``window`` (the library's rounding),
    from the running means of a run that recorded every step."""
    steps = item["steps"]
    n = len(steps)
    first = min(int(np.floor(window[0] * n)), n - 1)
    end = max(int(np.ceil(window[1] * n)), first + 1)
    means_end, counts_end = steps[end - 1]
    means_start, counts_start = steps[first - 1] if first > 0 else ({}, {})
    out = {}
    for f, mean in means_end.items():
        if f not in means_start:
            out[f] = mean  # nothing recorded before the window: the store's own mean, as the library reads it
            continue
        recorded = counts_end[f] - counts_start[f]
        out[f] = (mean * counts_end[f] - means_start[f] * counts_start[f]) / recorded
    return out


def masks_for(items: list[dict], config: MaskConfig, size: tuple[int, int]) -> np.ndarray:
    """Label masks for recorded items under ``config``, with the library's mask functions."""
    maps = [window_maps(it, config.timestep_window) for it in items]
    factors = maps[0].keys()
    batch = {f: torch.stack([m[f] for m in maps]) for f in factors}
    fused = fuse_resolutions(batch, config.resolution_weights, size, config.normalization)
    ids = torch.tensor([[TOY_CLASSES.index(it["prompt"].class_names[0])] for it in items])
    thresholds = torch.tensor([[config.class_thresholds.get(it["prompt"].class_names[0], config.threshold)]
                               for it in items])
    return labels_from_maps(fused, ids, thresholds, config.ignore_band).to(torch.uint8).numpy()


def score(masks, oracles, class_ids) -> dict:
    """Per-class IoU (summed over samples), per-sample mean IoU, ignore share; mean over classes."""
    per = {c: dict(i=0, u=0, s=[], ignored=0, pixels=0) for c in CLASSES}
    for mask, oracle, cid in zip(masks, oracles, class_ids):
        valid = mask != 255
        pred, truth = (mask == cid) & valid, (oracle == cid) & valid
        inter, union = np.count_nonzero(pred & truth), np.count_nonzero(pred | truth)
        r = per[TOY_CLASSES[cid]]
        r["i"] += inter
        r["u"] += union
        r["s"].append(inter / union if union else 1.0)
        r["ignored"] += np.count_nonzero(~valid)
        r["pixels"] += mask.size
    out = {c: dict(iou=r["i"] / max(r["u"], 1), siou=float(np.mean(r["s"])) if r["s"] else float("nan"),
                   ignored=r["ignored"] / max(r["pixels"], 1), n=len(r["s"])) for c, r in per.items()}
    present = [c for c in CLASSES if out[c]["n"]]
    out["mean"] = {k: float(np.mean([out[c][k] for c in present])) for k in ("iou", "siou", "ignored")}
    out["mean"]["n"] = sum(out[c]["n"] for c in present)
    return out


def centre_box(class_ids, size) -> np.ndarray:
    h, w = size
    masks = np.zeros((len(class_ids), h, w), np.uint8)
    for m, cid in zip(masks, class_ids):
        m[h // 4: h - h // 4, w // 4: w - w // 4] = cid
    return masks


def run_library(args, config: MaskConfig):
    """Generate ``per_class`` samples per class through DiffuMaskDataset; return samples, items.

    Prompts come from the built-in "toy" vocabulary (ToyWorld's label space, "a photo of a
    {class}"); ``config`` is used whole, whatever the model folder's preset says.
    """
    samples, items, stats = [], [], []
    for k, cls in enumerate(CLASSES):
        ds = DiffuMaskDataset(
            model=args.model, classes=[cls], length=args.per_class, vocabulary="toy", label_space=TOY_CLASSES,
            image_size=args.image_size, seed=args.seed * 1000 + k, augment=False, mask=dataclasses.replace(config),
            cache_size=args.per_class,  # each sample is generated once, however raw() fetches it
            generator=GeneratorConfig(num_inference_steps=args.gen_steps, guidance_scale=args.guidance,
                                  batch_size=args.gen_batch_size),
            quality=QualityConfig(max_consecutive_rejects=500), device="cpu",
        )
        recorder = Recorder(ds)
        drawn = ds.raw(list(range(args.per_class)))
        samples += drawn
        items += [recorder.items[image_key(s.image)] for s in drawn]
        stats.append(ds.stats())
    gen = {key: sum(s[key] for s in stats) for key in stats[0]}
    return samples, items, gen


def fmt(name: str, result: dict) -> str:
    cells = " ".join(f"{result[c]['iou']:.3f}" for c in CLASSES)
    return f"{name:<34} {result['mean']['iou']:.3f}  sIoU {result['mean']['siou']:.3f}  | {cells}"


def parse_weights(items) -> dict[int, float]:
    return {int(k): float(v) for k, v in (s.split(":") for s in items)}


def grid_configs(factors):
    factors = sorted(factors)
    weight_sets = []
    for ws in itertools.product((0.0, 0.5, 1.0), repeat=len(factors)):
        if max(ws) == 1.0:
            weight_sets.append({f: w for f, w in zip(factors, ws) if w > 0})
    windows = [(0.0, 1.0), (0.25, 1.0), (0.5, 1.0), (0.75, 1.0), (0.9, 1.0), (0.5, 0.9)]
    for weights, window, norm in itertools.product(weight_sets, windows, ("minmax", "max")):
        yield weights, window, norm


def search(items, oracles, class_ids, size):
    """Best configs by mean IoU; thresholds and bands are cheap, so they are inner loops."""
    results = []
    factors = items[0]["steps"][-1][0].keys()
    thresholds = [round(x, 2) for x in np.arange(0.15, 0.80, 0.05)]
    for weights, window, norm in grid_configs(factors):
        for band in (0.0, 0.05):
            for gamma in thresholds:
                if not 0 < gamma - band and gamma + band < 1:
                    continue
                cfg = MaskConfig(resolution_weights=weights, timestep_window=window, normalization=norm,
                                 threshold=gamma, ignore_band=band)
                r = score(masks_for(items, cfg, size), oracles, class_ids)
                results.append((r["mean"]["iou"], r["mean"]["siou"], r["mean"]["ignored"], cfg))
    results.sort(key=lambda x: -x[0])
    return results


def save_grid(path, samples, oracles, masks, n=10):
    from PIL import Image
    palette = np.array([[0, 0, 0], [255, 0, 0], [255, 255, 0], [0, 200, 0], [0, 0, 255], [255, 0, 255]]
                       + [[128, 128, 128]] * 250, np.uint8)
    rows = []
    picks = list(range(0, len(samples), max(len(samples) // n, 1)))[:n]
    for i in picks:
        rows.append(np.concatenate([samples[i].image, palette[oracles[i]], palette[masks[i]]], 1))
    grid = np.concatenate(rows, 0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    size = (args.image_size, args.image_size)
    config = MaskConfig(resolution_weights=parse_weights(args.weights), timestep_window=tuple(args.window),
                        normalization=args.normalization, threshold=args.threshold, ignore_band=args.ignore_band)
    start = time.time()
    samples, items, gen = run_library(args, config)
    oracles = [color_oracle(s.image) for s in samples]
    class_ids = [TOY_CLASSES.index(it["prompt"].class_names[0]) for it in items]
    masks = [s.mask for s in samples]
    found = {c: float(np.mean([(o == cid).any() for o, cid in zip(oracles, class_ids) if TOY_CLASSES[cid] == c]))
             for c in CLASSES}
    found["mean"] = float(np.mean(list(found.values())))
    ours = score(masks, oracles, class_ids)
    box = score(centre_box(class_ids, size), oracles, class_ids)
    same_05 = score(masks_for(items, dataclasses.replace(config, threshold=0.5, ignore_band=0.0), size),
                    oracles, class_ids)
    no_band = score(masks_for(items, dataclasses.replace(config, ignore_band=0.0), size), oracles, class_ids)
    # sanity: recomputing the library's masks from the recorded maps gives the same masks
    recomputed = masks_for(items, config, size)
    agree = float(np.mean([np.array_equal(a, b) for a, b in zip(recomputed, masks)]))

    print(f"model {args.model}; {ours['mean']['n']} samples ({args.per_class}/class), seed {args.seed}, "
          f"DDIM {args.gen_steps} steps, guidance {args.guidance}; generated {gen['generated']} "
          f"(accepted {gen['accepted']}); {time.time() - start:.0f}s")
    print(f"config: {json.dumps(dataclasses.asdict(config))}; recomputed masks identical: {agree:.3f}")
    print(f"{'':<34} mIoU              | " + " ".join(f"{c[:5]:>5}" for c in CLASSES))
    print(fmt("ours", ours) + f"   (ignored px {ours['mean']['ignored']:.3f})")
    print(fmt("ours without ignore band", no_band))
    print(fmt("centre box", box))
    print(fmt("fixed 0.5, this fusion", same_05))
    result = dict(model=args.model, seed=args.seed, per_class=args.per_class, steps=args.gen_steps,
                  guidance=args.guidance, config=dataclasses.asdict(config), generated=gen, recomputed_identical=agree,
                  ours=ours, centre_box=box,
                  fixed05_same_fusion=same_05, ours_no_band=no_band, found=found)
    if not args.no_default_baseline:
        # The library's default fusion (no resolution weights: every factor the model has; every
        # step), not the preset's.
        default_cfg = MaskConfig(threshold=0.5, ignore_band=0.0)
        d_samples, d_items, _ = run_library(args, default_cfg)
        d_oracles = [color_oracle(s.image) for s in d_samples]
        d_ids = [TOY_CLASSES.index(it["prompt"].class_names[0]) for it in d_items]
        same_images = float(np.mean([np.array_equal(a.image, b.image) for a, b in zip(d_samples, samples)]))
        default_05 = score([s.mask for s in d_samples], d_oracles, d_ids)
        print(fmt("fixed 0.5, default fusion", default_05) + f"   (same images: {same_images:.2f})")
        result["fixed05_default_fusion"] = default_05
    print(f"{'oracle finds the class':<34} {found['mean']:.3f}              | "
          + " ".join(f"{found[c]:.3f}" for c in CLASSES))
    if args.save_grid:
        save_grid(args.save_grid, samples, oracles, masks)
    if args.search:
        if tuple(config.timestep_window) != (0.0, 1.0):
            raise SystemExit("--search needs the run's window to be the full (0, 1)")
        t = time.time()
        results = search(items, oracles, class_ids, size)
        print(f"search: {len(results)} configs in {time.time() - t:.0f}s; best:")
        for miou, siou, ign, cfg in results[:12]:
            print(f"  mIoU {miou:.3f} sIoU {siou:.3f} ignored {ign:.3f}  weights {cfg.resolution_weights} "
                  f"window {cfg.timestep_window} {cfg.normalization} gamma {cfg.threshold} band {cfg.ignore_band}")
        result["search"] = [dict(miou=m, siou=s, ignored=i, config=dataclasses.asdict(c)) for m, s, i, c in results[:50]]
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
