"""What the benchmarks share: running the training script, mask IoU against the ToyWorld colour
oracle (and the IoU counts it is made of), per-class γ calibrated on the oracle, the resume guard
of results JSONs, and writing results.

A module, not a script: the benchmarks import it from their own folder (a script's folder is first
on its import path). The library is imported inside the functions that generate, so that the
scripts that only run the trainer start without loading diffusers.
"""
from __future__ import annotations

import dataclasses
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train" / "train_deeplab.py"
# The readings of benchmarks/mask_quality.py, in table order (see measure_mask_quality).
METHODS = ("diffumask", "diffumask_band_as_miss", "fixed_0.5", "fixed_0.5_tuned_fusion", "centre_box")
JOINT_METHODS = ("output_space", "other_softmax")
# The plain map: every grid the model's text attention runs at, every step, γ 0.5, no band.
PLAIN_ATTENTION = dict(timestep_window=(0.0, 1.0), threshold=0.5, ignore_band=0.0, threshold_mode="fixed",
                       refine="none", self_attention_factor=None)


def output_dir(flags: list[str]) -> Path:
    """The ``--output-dir`` a list of train_deeplab.py flags names (the last one wins, as in argparse)."""
    values = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == "--output-dir"]
    values += [flag.split("=", 1)[1] for flag in flags if flag.startswith("--output-dir=")]
    if not values:
        raise ValueError("the training flags name no --output-dir, so its metrics.jsonl cannot be found")
    return Path(values[-1])


def run_rows(flags: list[str], **run_options) -> list[dict]:
    """Run ``python train/train_deeplab.py *flags`` as a subprocess; the rows of its
    ``metrics.jsonl`` that this run wrote (``train`` rows per step, then ``final``, ...).

    Output goes where this process's goes unless ``run_options`` (passed to
    :func:`subprocess.run`: ``stdout``, ``env``, ...) say otherwise. A failed run raises
    :class:`RuntimeError` with its exit code. ``flags`` must name ``--output-dir``; rows left
    there by an earlier run are never returned for this one.
    """
    directory = output_dir(flags)
    metrics = directory / "metrics.jsonl"
    earlier = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    done = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *flags], **run_options)
    if done.returncode != 0:
        raise RuntimeError(f"train/train_deeplab.py {' '.join(flags)} failed with exit code {done.returncode}")
    return [json.loads(line) for line in metrics.read_text().splitlines()[earlier:]] if metrics.is_file() else []


def train(flags: list[str], **run_options) -> dict:
    """Run ``python train/train_deeplab.py *flags`` as :func:`run_rows` does; its final summary
    (a run that exits 0 without one raises :class:`RuntimeError`)."""
    finals = [row for row in run_rows(flags, **run_options) if row.get("event") == "final"]
    if not finals:
        raise RuntimeError(f"train/train_deeplab.py exited 0 but wrote no 'final' row to {output_dir(flags) / 'metrics.jsonl'}")
    return finals[-1]


def intersection_union(prediction: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[int, int]:
    """Intersection and union pixel counts of two boolean masks, over ``valid`` pixels only."""
    if valid is not None:
        prediction, truth = prediction & valid, truth & valid
    return int((prediction & truth).sum()), int((prediction | truth).sum())


def centre_box(height: int, width: int) -> torch.Tensor:
    """``[H, W]`` bool: the middle half of each side, the "object is in the middle" baseline."""
    box = torch.zeros(height, width, dtype=torch.bool)
    box[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    return box


def measure_mask_quality(model, n: int, seed: int = 0, batch_size: int | None = None, threshold: float | None = None,
                         progress: bool = True, mask_overrides: dict | None = None,
                         generator_overrides: dict | None = None, other_readings: bool = True) -> dict:
    """Mask IoU of ``n`` generated ToyWorld samples against the colour oracle, per class and mean,
    for each reading of ``benchmarks/mask_quality.py`` (its docstring describes them), and counts.

    Sample ``i`` is prompted with class ``i mod C`` in the vocabulary's first words for it and
    generated with ``evaluation_seed(seed, i)``, ``batch_size`` images per call (default: the
    preset's). ``mask_overrides`` / ``generator_overrides`` replace fields of the model preset's
    :class:`MaskConfig` / :class:`GeneratorConfig` (for ablations; ``scheduler``,
    ``num_inference_steps``). ``other_readings=False`` skips the readings that need a second
    generation pass (``fixed_0.5`` and the joint-attention rows).
    """
    from tqdm.auto import tqdm

    from ondemand_seg.generation.generator import DiffuMaskGenerator
    from ondemand_seg.generation.seeding import evaluation_seed
    from ondemand_seg.masks.maps import labels_from_maps
    from ondemand_seg.masks.quality import gate
    from ondemand_seg.settings.config import to_dict
    from ondemand_seg.toyworld import TOY_CLASSES, color_oracle

    classes = TOY_CLASSES[1:]
    mask = {**(mask_overrides or {}), **({} if threshold is None else {"threshold": threshold})}
    generator = {**(generator_overrides or {}), **({} if batch_size is None else {"batch_size": batch_size})}
    source = DiffuMaskGenerator(model, classes, label_space=TOY_CLASSES, seed=seed, mask=mask, generator=generator)
    batch_size = source.generator_config.batch_size
    spec = source.spec
    every_grid = {factor: 1.0 for factor in spec.text_factors}
    plain = DiffuMaskGenerator(model, classes, label_space=TOY_CLASSES, seed=seed, generator=generator,
                               mask=dataclasses.replace(source.mask_config, resolution_weights=every_grid,
                                                        **PLAIN_ATTENTION))
    other = "text" if source.mask_config.joint_softmax == "all" else "all"
    settings = {"output_space": {"map_source": "output"},
                "other_softmax": {"map_source": "attention", "joint_softmax": other}}
    alternatives = {
        method: DiffuMaskGenerator(model, classes, label_space=TOY_CLASSES, seed=seed, generator=generator,
                                   mask=dataclasses.replace(source.mask_config, **settings[method]))
        for method in JOINT_METHODS if spec.family.output_maps and other_readings
    }
    methods = tuple(m for m in METHODS if other_readings or m != "fixed_0.5") + tuple(alternatives)
    height, width = source.image_size
    box = centre_box(height, width)
    sums = {m: {c: [0, 0] for c in classes} for m in methods + ("accepted",)}
    drawn = {c: 0 for c in classes}
    rejected = 0
    generating = 0.0
    started = time.perf_counter()
    for start in tqdm(range(0, n, batch_size), desc="mask quality", disable=not progress):
        indices = list(range(start, min(start + batch_size, n)))
        names = [classes[i % len(classes)] for i in indices]
        # Each prompt is the vocabulary's first draw for its class ("a photo of a {class}" for the toy model).
        prompts = [source.class_prompt(random.Random(0), [c]) for c in names]
        seeds = [evaluation_seed(seed, i) for i in indices]
        call_started = time.perf_counter()
        batch = source.generate(prompts, seeds, keep_maps=True)
        generating += time.perf_counter() - call_started
        tuned = labels_from_maps(batch.fused, batch.class_ids, torch.full(batch.class_ids.shape, 0.5), 0.0)
        fixed = plain.generate(prompts, seeds).masks if other_readings else None
        other = {m: alt.generate(prompts, seeds).masks for m, alt in alternatives.items()}
        reasons = gate(batch.images, batch.masks, source.quality_config, finite_maps=batch.finite_maps,
                       decoded=batch.decoded)
        images = batch.uint8_images()
        for j, name in enumerate(names):
            class_id = TOY_CLASSES.index(name)
            truth = torch.from_numpy(color_oracle(images[j]) == class_id)
            drawn[name] += bool(truth.any())
            ours = batch.masks[j]
            scores = {
                "diffumask": intersection_union(ours == class_id, truth, valid=ours != 255),
                "diffumask_band_as_miss": intersection_union(ours == class_id, truth),
                **({"fixed_0.5": intersection_union(fixed[j] == class_id, truth)} if other_readings else {}),
                "fixed_0.5_tuned_fusion": intersection_union(tuned[j] == class_id, truth),
                "centre_box": intersection_union(box, truth),
                **{m: intersection_union(masks[j] == class_id, truth, valid=masks[j] != 255) for m, masks in other.items()},
            }
            if reasons[j] is None:
                scores["accepted"] = scores["diffumask"]
            else:
                rejected += 1
            for method, (inter, union) in scores.items():
                sums[method][name][0] += inter
                sums[method][name][1] += union
    seconds = time.perf_counter() - started
    result = {"model": str(model), "family": spec.family.name, "methods": list(methods), "n": n, "seed": seed,
              "image_size": [height, width], "scheduler": type(source.pipeline.scheduler).__name__,
              "mask_config": to_dict(source.mask_config), "sampler_config": to_dict(source.generator_config),
              "vocabulary": {"name": source.vocabulary.name, "templates": list(source.vocabulary.templates)},
              "drawn_fraction": {c: drawn[c] / max(1, sum(classes[i % len(classes)] == c for i in range(n))) for c in classes},
              "gate_rejected": rejected, "seconds": round(seconds, 1), "generation_seconds": round(generating, 2)}
    for method, per_class in sums.items():
        ious = {c: (i / u if u else float("nan")) for c, (i, u) in per_class.items()}
        result[method] = {"per_class": ious, "mean": float(np.nanmean(list(ious.values())))}
    return result


def calibrated_mask(model, mask: dict, n_per_class: int, cache: dict, generator: dict | None = None) -> dict:
    """``mask`` with Otsu replaced by per-class γ calibrated on ``n_per_class`` oracle-labelled samples
    per class (seeds apart from the mask-IoU samples), through the same map refinements; ``cache``
    keeps the γ of each refinement already calibrated."""
    from ondemand_seg.generation.calibration import calibrate_class_thresholds
    from ondemand_seg.generation.generator import DiffuMaskGenerator
    from ondemand_seg.toyworld import TOY_CLASSES, color_oracle

    key = (mask.get("refine"), mask.get("self_attention_factor"))
    if key not in cache:
        source = DiffuMaskGenerator(model, list(TOY_CLASSES[1:]), label_space=TOY_CLASSES, generator=generator or {},
                                    mask={k: v for k, v in mask.items() if k != "threshold_mode"})
        gammas = calibrate_class_thresholds(source, lambda image, name: color_oracle(image) == TOY_CLASSES.index(name),
                                            n_per_class)
        cache[key] = {name: round(gamma, 3) for name, gamma in gammas.items()}
        print(f"calibrated γ ({n_per_class} samples per class, refinements {key}): {cache[key]}", flush=True)
    return {**mask, "threshold_mode": "fixed", "class_thresholds": cache[key]}


def resumable_runs(path: Path | None, config: dict) -> dict:
    """The runs an earlier invocation wrote into the results JSON ``path`` (``{"config", "runs"}``), so
    an interrupted table resumes; refused when they were made with another ``config`` (steps, flags),
    whose figures would mix into this table unseen."""
    if path is None or not path.exists():
        return {}
    data = json.loads(path.read_text())
    earlier = data.get("config", config)
    if earlier != config:
        changed = ", ".join(f"{k}: {earlier.get(k)!r} there, {config.get(k)!r} now"
                            for k in sorted(set(earlier) | set(config)) if earlier.get(k) != config.get(k))
        raise SystemExit(f"error: {path} holds runs made with other settings ({changed}); "
                         "pass another --json or the same settings")
    return data.get("runs", {})


def baseline_runs(path: Path | None) -> dict | None:
    """The runs of another results JSON (``--baseline``: real-only runs made with other trainer flags), or
    None without one; refused, naming the path, when it is missing or holds no runs."""
    if path is None:
        return None
    if not path.is_file():
        raise SystemExit(f"error: --baseline {path} does not exist")
    try:
        return json.loads(path.read_text())["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SystemExit(f"error: --baseline {path} is not a benchmark results JSON with runs ({error!r})") from None


def paired_gain(runs: dict[int, float], baseline: dict[int, float]) -> dict:
    """``runs`` against ``baseline`` (seed -> mIoU) over the seeds both have: the mean gain and the
    gain per seed in points, how many seeds ``runs`` is ahead on, and with two or more seeds that
    differ, the paired sample sd in points and the paired t-test's two-sided p (scipy). Empty when no
    seed is shared."""
    from scipy.stats import ttest_rel

    shared = sorted(set(runs) & set(baseline))
    if not shared:
        return {}
    gains = [100 * (runs[s] - baseline[s]) for s in shared]
    row = {"seeds": shared, "gain_points": statistics.fmean(gains), "per_seed_points": gains,
           "ahead": sum(g > 0 for g in gains)}
    if len(gains) > 1 and len(set(gains)) > 1:
        row["paired_sd_points"] = statistics.stdev(gains)
        row["p_paired"] = float(ttest_rel([runs[s] for s in shared], [baseline[s] for s in shared]).pvalue)
    return row


def write_json(path: Path | None, data) -> None:
    """Write ``data`` as indented JSON to ``path`` (creating folders); nothing when ``path`` is None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str))
