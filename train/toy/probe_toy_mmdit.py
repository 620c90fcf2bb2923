"""Probe: do the class tokens' joint-attention maps of a toy MM-DiT (SD3 layout) match the colour oracle?

Self-contained (it does not use the library's capture): loads a ``StableDiffusion3Pipeline``
folder written by ``train_toy_mmdit.py``, generates ``--per-class`` images per single-class prompt
("a photo of a {class}") and ``--pairs`` two-class prompts ("a photo of a X and a Y"), 32 px,
and records in every joint block and denoising step, for each class word's token, the
head-averaged probability of each image query (16x16) attending to that token, two ways:

* ``text``: softmax renormalised over the text keys (CLIP tokens and the 256 zero T5 rows),
  the normalisation the localisation loss was trained on;
* ``joint``: the probability as it is in SD3's softmax over all joint keys (image + text);
* ``output``: ConceptAttention's output-space map: per head, the softmax over the text tokens of
  the image tokens' attention outputs against the text tokens' outputs.

Masks are made with the library's mask functions (``fuse_resolutions`` at latent factor 1,
``labels_from_maps``) and scored against ``color_oracle(image)`` per prompted class (IoU summed
over samples, ignore pixels excluded); mIoU = mean over the 5 classes. A grid over block subsets,
step windows, normalisation, threshold γ and ignore band is searched offline on the recorded maps.
Choose on one ``--seed``, confirm on another.

    python train/toy/probe_toy_mmdit.py --model /work/toy_runs/mmdit/pipeline --per-class 10 --pairs 50
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from toy_training import joint_output, joint_qkv

from ondemand_seg.masks.maps import fuse_resolutions, labels_from_maps
from ondemand_seg.toyworld import TOY_CLASSES, color_oracle

CLASSES = TOY_CLASSES[1:]
KINDS = ("text", "joint", "output")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--per-class", type=int, default=10, help="single-class prompts per class")
    p.add_argument("--pairs", type=int, default=50, help="two-class prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--shift", type=float, help="override the scheduler's shift")
    p.add_argument("--gen-batch-size", type=int, default=10, help="images per pipeline call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--fixed", nargs=5, metavar=("KIND", "START", "END", "GAMMA", "BAND"),
                   help="also score this config (all blocks, minmax), e.g. the preset's: text 0.9 1 0.4 0.05")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--save-grid", type=Path, help="PNG: images, oracle, mask of the best config")
    p.add_argument("--save-maps", type=Path, help="write images, prompts and maps here (torch.save)")
    return p.parse_args(argv)


class CaptureProcessor:
    """``JointAttnProcessor2_0`` that also records class-token maps of the image queries.

    ``self.positions``: ``[B, K]`` token index (into the text part) per class slot of the
    conditional half of the batch; per call it appends ``{kind: [B, K, N_image]}`` to ``self.calls``."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n, _ = hidden_states.shape
        h = attn.heads
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        cond = slice(b - self.positions.shape[0], b)  # CFG batches are [uncond, cond]
        scores = q[cond, :, :n] @ k[cond].transpose(-1, -2) * attn.scale  # [B, H, N, N + T]
        joint = scores.softmax(-1)[..., n:]
        text = scores[..., n:].softmax(-1)
        output = (out[cond, :, :n] @ out[cond, :, n:].transpose(-1, -2) * attn.scale).softmax(-1)
        index = self.positions[:, None, None, :].expand(-1, h, n, -1)
        self.calls.append({kind: probs.gather(-1, index).mean(1).transpose(1, 2)
                           for kind, probs in (("text", text), ("joint", joint), ("output", output))})
        return joint_output(attn, out, n)


def caption(names) -> str:
    return "a photo of " + " and ".join(f"a {n}" for n in names)


def make_prompts(args) -> list[tuple[str, ...]]:
    rng = np.random.default_rng(args.seed)
    singles = [(c,) for c in CLASSES for _ in range(args.per_class)]
    pairs = [tuple(rng.choice(CLASSES, 2, replace=False)) for _ in range(args.pairs)]
    return singles + pairs


def generate(args, pipe, prompts):
    """Images ``[B, 32, 32, 3]`` uint8 and maps ``{kind: [B, steps, layers, 2, 16, 16]}``."""
    proc = CaptureProcessor()
    pipe.transformer.set_attn_processor(proc)
    tok = pipe.tokenizer
    images, maps = [], {kind: [] for kind in KINDS}
    n_layers = len(pipe.transformer.transformer_blocks)
    for start in range(0, len(prompts), args.gen_batch_size):
        chunk = prompts[start:start + args.gen_batch_size]
        texts = [caption(names) for names in chunk]
        positions = torch.zeros(len(chunk), 2, dtype=torch.long)
        for i, (text, names) in enumerate(zip(texts, chunk)):
            ids = tok(text, padding="max_length", max_length=tok.model_max_length)["input_ids"]
            for j in range(2):
                target = tok.convert_tokens_to_ids(names[min(j, len(names) - 1)] + "</w>")
                positions[i, j] = ids.index(target)
        proc.positions, proc.calls = positions, []
        generator = [torch.Generator().manual_seed(args.seed * 100_000 + start + i) for i in range(len(chunk))]
        out = pipe(texts, height=32, width=32, num_inference_steps=args.gen_steps, guidance_scale=args.guidance,
                   generator=generator, output_type="np")
        images.append((out.images * 255).round().astype(np.uint8))
        for kind in KINDS:
            stacked = torch.stack([c[kind] for c in proc.calls])  # [steps * layers, B, 2, N]
            stacked = stacked.view(args.gen_steps, n_layers, len(chunk), 2, 16, 16).permute(2, 0, 1, 3, 4, 5)
            maps[kind].append(stacked)
    return np.concatenate(images), {kind: torch.cat(m) for kind, m in maps.items()}


def window_slice(window, n):
    first = min(int(np.floor(window[0] * n)), n - 1)
    return slice(first, max(int(np.ceil(window[1] * n)), first + 1))


def masks_for(maps, class_ids, layers, window, norm, gamma, band):
    m = maps[:, window_slice(window, maps.shape[1])][:, :, list(layers)].mean((1, 2))  # [B, 2, 16, 16]
    fused = fuse_resolutions({1: m}, {1: 1.0}, (32, 32), norm)
    thresholds = torch.full(class_ids.shape, gamma)
    return labels_from_maps(fused, class_ids, thresholds, band).numpy()


def score(masks, oracles, class_ids) -> dict:
    per = {c: [0, 0] for c in CLASSES}
    for mask, oracle, ids in zip(masks, oracles, class_ids.tolist()):
        valid = mask != 255
        for cid in {i for i in ids if i > 0}:
            pred, truth = (mask == cid) & valid, (oracle == cid) & valid
            per[TOY_CLASSES[cid]][0] += np.count_nonzero(pred & truth)
            per[TOY_CLASSES[cid]][1] += np.count_nonzero(pred | truth)
    out = {c: i / max(u, 1) for c, (i, u) in per.items()}
    out["mean"] = float(np.mean([out[c] for c in CLASSES]))
    out["ignored"] = float(np.mean([np.mean(m == 255) for m in masks]))
    return out


def search(maps, oracles, class_ids, n_layers, subsets=None):
    layer_sets = subsets or ([tuple(range(n_layers))] + [(i,) for i in range(n_layers)]
                             + [tuple(range(n_layers // 2, n_layers)), tuple(range(1, n_layers))])
    windows = [(0.0, 1.0), (0.5, 1.0), (0.75, 1.0), (0.9, 1.0), (0.5, 0.9), (0.25, 0.75)]
    results = []
    for kind, layers, window, norm in itertools.product(KINDS, layer_sets, windows, ("minmax", "max")):
        for gamma in np.arange(0.1, 0.75, 0.05).round(2):
            for band in (0.0, 0.05):
                r = score(masks_for(maps[kind], class_ids, layers, window, norm, gamma, band), oracles, class_ids)
                results.append(dict(miou=r["mean"], per_class=r, kind=kind, layers=list(layers), window=window,
                                    normalization=norm, threshold=float(gamma), ignore_band=band))
    return sorted(results, key=lambda r: -r["miou"])


def describe(r) -> str:
    return (f"mIoU {r['miou']:.3f} (ignored {r['per_class']['ignored']:.3f}) {r['kind']:<5} layers {r['layers']} "
            f"window {tuple(r['window'])} {r['normalization']} γ {r['threshold']} band {r['ignore_band']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    pipe = StableDiffusion3Pipeline.from_pretrained(args.model, use_safetensors=True, text_encoder_3=None,
                                                    tokenizer_3=None, dtype=torch.float32)
    if args.shift is not None:
        pipe.scheduler.register_to_config(shift=args.shift)
    pipe.set_progress_bar_config(disable=True)
    prompts = make_prompts(args)
    with torch.no_grad():
        images, maps = generate(args, pipe, prompts)
    oracles = [color_oracle(img) for img in images]
    class_ids = torch.tensor([[TOY_CLASSES.index(n) for n in names] + [0] * (2 - len(names)) for names in prompts])
    found = float(np.mean([all((o == cid).any() for cid in ids if cid > 0) for o, ids in zip(oracles, class_ids.tolist())]))
    box = np.zeros((len(images), 32, 32), np.int64)
    box[:, 8:24, 8:24] = class_ids[:, :1, None].numpy()  # first class only, as a floor
    n_layers = maps["text"].shape[2]
    print(f"model {args.model}; {len(prompts)} images ({args.per_class}/class single, {args.pairs} pairs), "
          f"seed {args.seed}, {args.gen_steps} steps, guidance {args.guidance}, shift {pipe.scheduler.config.shift}; "
          f"generated in {time.time() - start:.0f}s; oracle finds every prompted class: {found:.3f}")
    print(f"centre box (first class): mIoU {score(box, oracles, class_ids)['mean']:.3f}")
    results = search(maps, oracles, class_ids, n_layers)
    for r in results[:args.top]:
        print("  " + describe(r))
    summary = {}
    for kind in KINDS:  # the best of each kind, and the preset-like fixed configs
        best = next(r for r in results if r["kind"] == kind)
        fixed = [r for r in results if r["kind"] == kind and r["layers"] == list(range(n_layers))
                 and r["window"] == (0.9, 1.0) and r["normalization"] == "minmax" and r["threshold"] == 0.4
                 and r["ignore_band"] == 0.05][0]
        all_layers = next(r for r in results if r["kind"] == kind and r["layers"] == list(range(n_layers)))
        per_layer = {i: max(r["miou"] for r in results if r["kind"] == kind and r["layers"] == [i])
                     for i in range(n_layers)}
        summary[kind] = dict(best=best, best_all_layers=all_layers, all_layers_last10_g04=fixed,
                             best_per_layer=per_layer)
        print(f"{kind}: best {describe(best)}")
        print(f"{kind}: best over all layers {describe(all_layers)}")
        print(f"{kind}: all layers, window (0.9, 1), minmax, γ 0.4, band 0.05: mIoU {fixed['miou']:.3f}")
        print(f"{kind}: best per single layer: " + ", ".join(f"{i}: {v:.3f}" for i, v in per_layer.items()))
    if args.fixed:
        kind, w0, w1, gamma, band = args.fixed
        m = masks_for(maps[kind], class_ids, range(n_layers), (float(w0), float(w1)), "minmax", float(gamma), float(band))
        fixed = score(m, oracles, class_ids)
        summary["fixed"] = dict(config=args.fixed, result=fixed)
        print(f"fixed {args.fixed}: mIoU {fixed['mean']:.3f} (ignored {fixed['ignored']:.3f}) | "
              + " ".join(f"{c} {fixed[c]:.3f}" for c in CLASSES))
    singles = slice(0, len(CLASSES) * args.per_class)
    best = results[0]
    m = masks_for(maps[best["kind"]], class_ids, best["layers"], best["window"], best["normalization"],
                  best["threshold"], best["ignore_band"])
    s1 = score(m[singles], oracles[singles], class_ids[singles])["mean"]
    s2 = score(m[singles.stop:], oracles[singles.stop:], class_ids[singles.stop:])["mean"] if args.pairs else float("nan")
    print(f"best config on single-class prompts {s1:.3f}, on two-class prompts {s2:.3f}")
    if args.save_maps:
        torch.save(dict(images=images, prompts=prompts, maps=maps, class_ids=class_ids), args.save_maps)
    if args.save_grid:
        from PIL import Image
        palette = np.array([[0, 0, 0], [255, 0, 0], [255, 255, 0], [0, 200, 0], [0, 0, 255], [255, 0, 255]]
                           + [[128, 128, 128]] * 250, np.uint8)
        picks = np.linspace(0, len(images) - 1, 12).astype(int)
        grid = np.concatenate([np.concatenate([images[i], palette[oracles[i]], palette[m[i]]], 1) for i in picks])
        Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(args.save_grid)
    if args.json:
        args.json.write_text(json.dumps(dict(model=str(args.model), seed=args.seed, per_class=args.per_class,
                                             pairs=args.pairs, steps=args.gen_steps, guidance=args.guidance,
                                             shift=pipe.scheduler.config.shift, found=found, summary=summary,
                                             single_vs_pairs=[s1, s2], top=results[:30]), indent=1, default=str))


if __name__ == "__main__":
    main()
