"""Every mask recipe on one ToyWorld model: mask IoU against the colour oracle, per class.

A recipe is a fusion of the captured maps (latent factors and timestep window) and a way to turn
the fused map into labels: fixed γ (the paper's, ``MaskConfig``'s defaults), Otsu per image and
class, per-class γ calibrated on a few oracle-labelled images (the only recipe that needs labels;
their number is in the table), each with and without affinity refinement (random walk along image
colour) and self-attention refinement (propagation through the model's own self-attention at its
finest grid), alone and combined. Each recipe is measured with
``benchmarks/mask_quality.py``'s measurement (same prompts and seeds for every recipe, so the same
images); the search runs on ``--seed`` and the best label-free and best labelled recipes, with the
paper's fixed-γ baseline, are confirmed on ``--confirm-seed`` (other images).

    python benchmarks/mask_recipes.py --model toy-unaided --json benchmarks/results/mask_recipes_toy_unaided.json

``diffumask`` figures exclude ignore-band pixels (as the library's training does); ``band as miss``
counts them as unlabelled object pixels.

``--repairs`` measures instead the label-free repairs of ``MaskConfig`` on top of the model's preset,
each with and without affinity refinement: layer-head aggregation (``aggregation``), per-pixel
token rescaling (``token_rescaling``), self-attention refinement (sharpened, replacing the map,
iterated with a stopping rule) and their combinations, on ``--seed`` (where a default is chosen)
and ``--confirm-seed`` (held out), ``--n`` samples each. The attention is recorded once per capture
setting and every recipe scored on it (``replay.py``; same figures as generating per recipe);
``--recordings`` keeps the recordings for a later run:

    python benchmarks/mask_recipes.py --model toy-unaided --repairs --n 60 --recordings /tmp/recordings \
        --json benchmarks/results/mask_repairs_toy_unaided.json
    python benchmarks/mask_recipes.py --model toy-unaided --repairs --prompt-classes 2 --n 60 \
        --recordings /tmp/recordings --json benchmarks/results/mask_repairs_toy_unaided_two_classes.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

from common import calibrated_mask, measure_mask_quality, write_json

from ondemand_seg.settings.resolve import resolve_config

# (name, MaskConfig fusion fields); None keeps MaskConfig's defaults (the paper's: the model's own grids, all steps).
FUSIONS = {
    "default": {"resolution_weights": None, "timestep_window": (0.0, 1.0)},
    "f1-late": {"resolution_weights": {1: 1.0}, "timestep_window": (0.9, 1.0)},
    "f1+2+4": {"resolution_weights": {1: 1.0, 2: 1.0, 4: 1.0}, "timestep_window": (0.0, 1.0)},
    "f2": {"resolution_weights": {2: 1.0}, "timestep_window": (0.0, 1.0)},
    "f2-late": {"resolution_weights": {2: 1.0}, "timestep_window": (0.5, 1.0)},
    "f2+4": {"resolution_weights": {2: 1.0, 4: 1.0}, "timestep_window": (0.0, 1.0)},
}
# MaskConfig's defaults, which the paper's recipe is: fixed γ 0.4 with a 0.05 ignore band, no refinement.
PAPER = {"threshold_mode": "fixed", "threshold": 0.4, "ignore_band": 0.05, "normalization": "minmax",
         "refine": "none", "self_attention_factor": None, "class_thresholds": {}}


# Label-free repairs (MaskConfig fields); the self-attention ones propagate at the preset's
# self-attention factor, else at the model's finest. "classes" rescaling equals the plain map with
# one class per prompt, so it is measured on two-class prompts only.
SELF_ATTENTION = {"self-attention x4, replace": {"self_attention_sharpness": 4.0, "self_attention_mode": "replace"}}
REPAIRS = {
    "agreement": {"aggregation": "agreement"},
    "entropy": {"aggregation": "entropy"},
    "rescale tokens": {"token_rescaling": "tokens"},
    "rescale classes": {"token_rescaling": "classes"},
    "agreement + rescale classes": {"aggregation": "agreement", "token_rescaling": "classes"},
    "self-attention": {},
    "self-attention x2": {"self_attention_sharpness": 2.0},
    "self-attention x2, replace": {"self_attention_sharpness": 2.0, "self_attention_mode": "replace"},
    **SELF_ATTENTION,
    "self-attention x8, replace": {"self_attention_sharpness": 8.0, "self_attention_mode": "replace"},
    "self-attention x4, replace, stop": {"self_attention_sharpness": 4.0, "self_attention_mode": "replace",
                                         "self_attention_power": 8, "self_attention_stop": "separation"},
    "entropy + self-attention x4, replace": {"aggregation": "entropy", **SELF_ATTENTION["self-attention x4, replace"]},
    "entropy + rescale tokens + self-attention x4, replace": {"aggregation": "entropy", "token_rescaling": "tokens",
                                                             **SELF_ATTENTION["self-attention x4, replace"]},
}
REFINEMENTS = {"": {"refine": "none"}, " + affinity": {"refine": "affinity"}}


def recipes(self_attention_factor: int | None, per_class: bool) -> dict[str, dict]:
    """Recipe name -> MaskConfig overrides beyond the fusion; "γ per class" ones are calibrated later."""
    refinements = [("", {}), (" + affinity", {"refine": "affinity"})]
    if self_attention_factor is not None:
        through = {"self_attention_factor": self_attention_factor}
        refinements += [(" + self-attention", through), (" + self-attention + affinity", {**through, "refine": "affinity"})]
    thresholds = [("fixed γ 0.4", {}), ("Otsu", {"threshold_mode": "otsu"})]
    if per_class:
        thresholds.append(("γ per class", {"threshold_mode": "per-class"}))
    return {t_name + r_name: {**PAPER, **t, **r} for (t_name, t), (r_name, r) in itertools.product(thresholds, refinements)}


def finest_self_attention(model) -> int | None:
    """The finest latent factor with self-attention in the model's denoiser (None: it has none)."""
    from ondemand_seg.generation.generator import DiffuMaskGenerator
    from ondemand_seg.toyworld import TOY_CLASSES

    spec = DiffuMaskGenerator(model, list(TOY_CLASSES[1:2]), label_space=TOY_CLASSES).spec
    return min(spec.self_factors) if spec.self_factors else None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="mask IoU of every recipe on a ToyWorld model")
    p.add_argument("--model", default="toy-unaided")
    p.add_argument("--n", type=int, default=60, help="samples per recipe on the search seed")
    p.add_argument("--confirm-n", type=int, default=200, help="samples per recipe on the confirmation seed")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--confirm-seed", type=int, default=1)
    p.add_argument("--fusions", nargs="+", choices=sorted(FUSIONS), default=list(FUSIONS))
    p.add_argument("--calibration-per-class", type=int, default=10,
                   help="oracle-labelled images per class for per-class γ (0: skip those recipes)")
    p.add_argument("--gen-steps", type=int, default=None, help="denoising steps (default: the model preset's)")
    p.add_argument("--gen-batch-size", type=int, default=None,
                   help="images per pipeline call (default: the model preset's, 20 for the toy models)")
    p.add_argument("--search-only", action="store_true",
                   help="skip the confirmation (e.g. fusions searched by separate processes, one JSON each)")
    p.add_argument("--repairs", action="store_true",
                   help="measure the label-free repairs on top of the model's preset instead of the recipe search")
    p.add_argument("--prompt-classes", type=int, choices=(1, 2), default=1,
                   help="with --repairs: classes per prompt (2: the class i mod C and another one)")
    p.add_argument("--only", nargs="+", choices=list(REPAIRS), default=None, metavar="REPAIR",
                   help="with --repairs: measure these repairs only (default: all of REPAIRS)")
    p.add_argument("--recordings", type=Path, default=None,
                   help="with --repairs: folder keeping the recorded attention, reused by a later run")
    p.add_argument("--json", type=Path, default=None)
    return p


def run_repairs(args, results: dict) -> None:
    """The repairs study (``--repairs``): the preset and every repair, each with and without affinity,
    on ``--seed`` and ``--confirm-seed`` (``--n`` samples each), scored on attention recorded once per
    capture setting (``replay.py``)."""
    import dataclasses

    import torch
    from replay import grid_ceiling, record, score, self_attention_locality

    from ondemand_seg.settings.config import to_dict

    preset = resolve_config(args.model).mask
    self_factor = preset.self_attention_factor or finest_self_attention(args.model)
    study = results.setdefault("repairs", {})
    names = [name for name in args.only or REPAIRS if args.prompt_classes > 1 or "classes" not in name]
    for seed in (args.seed, args.confirm_seed):
        rows = study.setdefault(str(seed), {})
        recordings = {}
        for name in ["preset"] + names:
            repair = REPAIRS.get(name, {})
            rescaling = repair.get("token_rescaling", preset.token_rescaling)
            if rescaling not in recordings:
                cache = None if args.recordings is None else (
                    args.recordings / f"{args.model}_{args.n}_{seed}_{rescaling}_{args.prompt_classes}.pt")
                if cache is not None and cache.exists():
                    recordings[rescaling] = torch.load(cache, weights_only=False)
                else:
                    recordings[rescaling] = record(args.model, args.n, seed, {"token_rescaling": rescaling},
                                                   args.prompt_classes)
                    if cache is not None:
                        cache.parent.mkdir(parents=True, exist_ok=True)
                        torch.save(recordings[rescaling], cache)
                # Recordings made before the recipe settings were restored keep the preset's here.
                recordings[rescaling].config = dataclasses.replace(
                    recordings[rescaling].config, aggregation=preset.aggregation,
                    self_attention_factor=preset.self_attention_factor)
            if str(seed) not in results.setdefault("ceiling", {}):
                plain = recordings[rescaling]
                results["ceiling"][str(seed)] = {str(f): grid_ceiling(plain, f) for f in plain.calls[0][0].maps}
                locality = results.setdefault("self_attention_locality", {})
                locality[str(seed)] = self_attention_locality(plain)
                print(f"seed {seed}: perfect maps at each latent factor score {results['ceiling'][str(seed)]}; "
                      f"self-attention {locality[str(seed)]}", flush=True)
            overrides = dict(repair)
            overrides.pop("token_rescaling", None)
            if "self-attention" in name:
                overrides["self_attention_factor"] = self_factor
            for suffix, refinement in REFINEMENTS.items():
                if name + suffix in rows:
                    continue
                r = score(recordings[rescaling], {**overrides, **refinement})
                rows[name + suffix] = {"repair": repair, "refinement": refinement["refine"], "n": args.n, "seed": seed,
                                       "prompt_classes": args.prompt_classes, **r, "labelled_images": 0}
                print(f"{name + suffix:60s} seed {seed}: {r['mean']:.3f} (band as miss {r['band_as_miss']:.3f})",
                      flush=True)
                write_json(args.json, results)
    results.update(model=str(args.model), self_attention_factor=self_factor, preset=to_dict(preset),
                   prompt_classes=args.prompt_classes, load_average_1min=os.getloadavg()[0])
    write_json(args.json, results)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    self_factor = finest_self_attention(args.model)
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    search = results.setdefault("search", {})
    cache: dict = {}
    generator = {} if args.gen_steps is None else {"num_inference_steps": args.gen_steps}
    if args.repairs:
        run_repairs(args, results)
        print(repairs_markdown(results["repairs"]))
        return 0

    def overrides(fusion: str, recipe: dict) -> dict:
        # An explicit None (the model's own grids), not a missing key, which would fall back to the preset's fusion.
        mask = {**recipe, **FUSIONS[fusion]}
        if mask["threshold_mode"] == "per-class":
            key_cache = cache.setdefault(fusion, {})
            mask = calibrated_mask(args.model, {**mask, "threshold_mode": "otsu"}, args.calibration_per_class, key_cache,
                                   generator)
        return mask

    def measure(fusion: str, name: str, recipe: dict, seed: int, n: int) -> dict:
        mask = overrides(fusion, recipe)
        r = measure_mask_quality(args.model, n, seed, args.gen_batch_size, mask_overrides=mask, other_readings=False,
                                 progress=False, generator_overrides=generator)
        row = {"fusion": fusion, "recipe": name, "mask": r["mask_config"], "n": n, "seed": seed,
               "mean": r["diffumask"]["mean"], "per_class": r["diffumask"]["per_class"],
               "band_as_miss": r["diffumask_band_as_miss"]["mean"], "centre_box": r["centre_box"]["mean"],
               "gen_steps": r["sampler_config"]["num_inference_steps"],
               "labelled_images": 5 * args.calibration_per_class if recipe["threshold_mode"] == "per-class" else 0}
        print(f"{fusion:8s} {name:40s} seed {seed}: {row['mean']:.3f} (band as miss {row['band_as_miss']:.3f})",
              flush=True)
        return row

    table = recipes(self_factor, args.calibration_per_class > 0)
    for fusion in args.fusions:
        for name, recipe in table.items():
            key = f"{fusion} | {name}"
            if key not in search:
                search[key] = measure(fusion, name, recipe, args.seed, args.n)
                write_json(args.json, results)
    if args.search_only:
        print(markdown(results))
        return 0
    # Confirmation on other images: the paper's baseline, the best label-free and the best labelled recipe.
    label_free = [k for k, r in search.items() if r["labelled_images"] == 0]
    labelled = [k for k, r in search.items() if r["labelled_images"] > 0]
    picks = {"paper": "default | fixed γ 0.4", "best_label_free": max(label_free, key=lambda k: search[k]["mean"])}
    picks["fixed_on_best_fusion"] = f"{search[picks['best_label_free']]['fusion']} | fixed γ 0.4"
    if labelled:
        picks["best_labelled"] = max(labelled, key=lambda k: search[k]["mean"])
    confirm = results.setdefault("confirm", {})
    for role, key in picks.items():
        if key in search and key not in confirm:
            fusion, name = key.split(" | ")
            confirm[key] = {**measure(fusion, name, table[name], args.confirm_seed, args.confirm_n), "role": role}
            write_json(args.json, results)
    results["model"], results["self_attention_factor"] = str(args.model), self_factor
    results["image_size"] = list(resolve_config(args.model).image_size)
    write_json(args.json, results)
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = []
    for part, title in (("search", f"search (seed {next(iter(results['search'].values()))['seed']})"),
                        ("confirm", "confirmation (other images)")):
        rows = results.get(part, {})
        if not rows:
            continue
        classes = list(next(iter(rows.values()))["per_class"])
        lines += [f"{title}:", "", "| fusion | recipe | labelled images | " + " | ".join(classes) + " | mean | band as miss |",
                  "|---" * (len(classes) + 5) + "|"]
        for key, r in sorted(rows.items(), key=lambda kv: -kv[1]["mean"]):
            lines.append(f"| {r['fusion']} | {r['recipe']} | {r['labelled_images']} | "
                         + " | ".join(f"{r['per_class'][c]:.3f}" for c in classes)
                         + f" | **{r['mean']:.3f}** | {r['band_as_miss']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def repairs_markdown(study: dict) -> str:
    """The repairs study as Markdown: one row per repair, with and without affinity, per seed."""
    seeds = list(study)
    lines = ["| repair | " + " | ".join(f"seed {s} | seed {s} + affinity" for s in seeds) + " |",
             "|---|" + "---|---|" * len(seeds)]
    for name in dict.fromkeys(k.removesuffix(" + affinity") for k in study[seeds[0]]):
        cells = [f"{study[s][name + suffix]['mean']:.3f}" if name + suffix in study[s] else "not run"
                 for s in seeds for suffix in REFINEMENTS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
