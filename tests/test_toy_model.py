"""The embedded toy models: ship in the package, load offline like real SD, and their masks are good
(measured by the mask benchmarks, run in-process as their command lines run them); the trainers
that made them run."""
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from ondemand_seg import DiffuMaskStream
from ondemand_seg.generation.generator import DiffuMaskGenerator
from ondemand_seg.pipelines.builtin import TOY_MODEL_DIR, read_preset
from ondemand_seg.pipelines.loading import load_pipeline
from ondemand_seg.settings.resolve import resolve_config
from ondemand_seg.toyworld import TOY_CLASSES

ROOT = Path(__file__).resolve().parents[1]
# Scripts import the shared modules of their own folder, which a script's folder on the path provides.
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "train" / "toy"))

import mask_quality  # noqa: E402
import mask_recipes  # noqa: E402
import multi_class_prompts  # noqa: E402
import steps_quality  # noqa: E402


def test_toy_model_loads_offline_through_from_pretrained(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (TOY_MODEL_DIR / "model_index.json").is_file()
    assert sorted(p.name for p in TOY_MODEL_DIR.glob("*/*.safetensors")) == [
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors", "model.safetensors"]
    pipeline = load_pipeline("toy", torch.device("cpu"))
    assert isinstance(pipeline, StableDiffusionPipeline) and pipeline.unet.dtype == torch.float32
    assert read_preset("toy")["vocabulary"] == "toy"
    assert resolve_config("toy").label_space == TOY_CLASSES


def test_toy_prompts_are_the_training_captions_form():
    # The toy model learnt "a photo of a {class}"; its preset's vocabulary must write exactly that.
    source = DiffuMaskGenerator("toy", list(TOY_CLASSES[1:]))
    for name in TOY_CLASSES[1:]:
        prompt = source.class_prompt(random.Random(0), [name])
        assert prompt.text == f"a photo of a {name}"
        assert prompt.class_ids == (TOY_CLASSES.index(name),) and prompt.words == (name,)


def test_two_sample_stream_passes_the_gate():
    stream = DiffuMaskStream("toy", list(TOY_CLASSES[1:]), num_samples=2, seed=3, generator={"batch_size": 2})
    samples = list(stream)
    assert len(samples) == 2
    stats = stream.stats()
    assert stats["accepted"] == stats["generated"] >= 2, stats  # one generation batch, nothing rejected
    image, mask = samples[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)


def test_mask_quality_floor_well_above_baselines(tmp_path):
    out = tmp_path / "mask_quality.json"
    assert mask_quality.main(["--n", "5", "--gen-batch-size", "5", "--ignore-band", "0.05", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 5 and result["sampler_config"]["batch_size"] == 5
    # DiffuMask's band, asked for over the preset's (which labels it): band pixels are left out.
    assert result["mask_config"]["ignore_band"] == 0.05
    assert result["diffumask_band_as_miss"]["mean"] < result["diffumask"]["mean"]
    ours = result["diffumask"]["mean"]
    assert ours >= 0.6, result["diffumask"]
    assert ours > result["centre_box"]["mean"] + 0.3
    assert ours > result["fixed_0.5"]["mean"]
    assert min(result["drawn_fraction"].values()) >= 0.75, "the model draws the prompted object"


@pytest.mark.parametrize("script, flag", [(mask_quality, "--steps"), (mask_quality, "--batch-size"),
                                          (steps_quality, "--batch-size"), (mask_recipes, "--batch-size")])
def test_generation_is_set_by_gen_flags_only(script, flag, capsys):
    # --steps and --batch-size mean training in every command; here they are refused, not read as generation's.
    with pytest.raises(SystemExit) as refused:
        script.get_args_parser().parse_args([flag, "3"])
    assert refused.value.code == 2 and f"unrecognized arguments: {flag} 3" in capsys.readouterr().err
    assert script.get_args_parser().parse_args(["--gen-batch-size", "3"]).gen_batch_size == 3


def test_neglect_rule_drops_classes_the_toy_model_did_not_draw_and_no_other(tmp_path):
    out = tmp_path / "multi_class_prompts.json"
    assert multi_class_prompts.main(["--n", "12", "--ratios", "0", "0.5", "--json", str(out)]) == 0
    keep_all, rule = json.loads(out.read_text())["rows"]
    assert keep_all["named"] == rule["named"] == 24, "two classes per prompt (the toy preset)"
    assert keep_all["dropped"] == 0
    assert rule["not_drawn"] >= 1, "premise: the toy model neglects a named class in some of these prompts"
    assert rule["dropped_drawn"] == 0 and rule["dropped_not_drawn"] >= 1
    assert rule["dropped"] == rule["dropped_drawn"] + rule["dropped_not_drawn"]
    assert rule["mean"] > keep_all["mean"]


def test_mask_quality_applies_the_background_floor_and_the_steps_asked_for(tmp_path):
    def run(*flags):
        out = tmp_path / f"mask_quality{len(flags)}.json"
        assert mask_quality.main(["--model", "toy-unaided", "--n", "5", "--gen-steps", "4", *flags,
                                  "--json", str(out)]) == 0
        return json.loads(out.read_text())

    preset, floored = run(), run("--background-floor", "median")
    assert preset["sampler_config"]["num_inference_steps"] == floored["sampler_config"]["num_inference_steps"] == 4
    assert preset["mask_config"]["background_floor"] == "none" and floored["mask_config"]["background_floor"] == "median"
    # Same images, other masks.
    assert floored["diffumask"]["per_class"] != preset["diffumask"]["per_class"]


def test_multi_class_prompts_applies_each_background_floor_and_band_asked_for(tmp_path):
    out = tmp_path / "multi_class_prompts.json"
    assert multi_class_prompts.main(["--n", "2", "--gen-steps", "3", "--ratios", "0", "--background-floors", "none",
                                     "median", "--ignore-bands", "0", "0.1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["gen_steps"] == 3
    rows = result["rows"]
    assert [(r["background_floor"], r["ignore_band"]) for r in rows] == [("none", 0), ("none", 0.1), ("median", 0),
                                                                         ("median", 0.1)]
    for row in rows:
        assert row["named"] == 4 and row["mean_band_as_miss"] <= row["mean"]
        assert (row["ignored"] > 0) == (row["ignore_band"] > 0)


@pytest.mark.slow
def test_background_floor_raises_the_unaided_model_s_two_class_masks(tmp_path):
    out = tmp_path / "multi_class_prompts.json"
    # The floor's gain is a property of many prompts: on fewer than 40 it does not show reliably.
    assert multi_class_prompts.main(["--model", "toy-unaided", "--n", "40", "--ratios", "0", "--background-floors",
                                     "none", "median", "--json", str(out)]) == 0
    plain, floored = json.loads(out.read_text())["rows"]
    assert (plain["background_floor"], floored["background_floor"]) == ("none", "median")
    assert plain["ignore_band"] == floored["ignore_band"] == resolve_config("toy-unaided").mask.ignore_band
    # The unaided model's tokens spread a floor over the image; removing it sharpens the masks,
    # also when the band's ignore pixels count as misses.
    assert floored["mean"] > plain["mean"] + 0.03 and floored["mean_band_as_miss"] > plain["mean_band_as_miss"]
    for row in (plain, floored):
        assert row["mean_band_as_miss"] <= row["mean"] and 0 < row["ignored"] < 0.5


def test_steps_quality_writes_one_row_per_scheduler_and_step_count(tmp_path):
    out = tmp_path / "steps_quality.json"
    assert steps_quality.main(["--n", "5", "--gen-batch-size", "5", "--threads", "1", "--rows", "toy:default:10",
                               "toy:DPMSolverMultistepScheduler:5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["batch_size"] == 5
    first, second = result["rows"]
    # The scheduler named is the one the pipeline ran, at the steps asked for.
    assert (first["scheduler"], first["steps"]) == ("DDIMScheduler", 10)
    assert (second["scheduler"], second["steps"]) == ("DPMSolverMultistepScheduler", 5)
    assert second["sampler_config"]["num_inference_steps"] == 5
    # The preset's window (last 10% of steps) records the last step alone at 10 and at 5 steps.
    assert first["recorded"] == [9] and second["recorded"] == [4]
    for row in (first, second):
        assert row["mean"] >= 0.6, row
        assert row["seconds_per_image"] > 0
    assert first["mean_change"] == 0 and first["time_ratio"] == 1
    assert second["mean_change"] == pytest.approx(second["mean"] - first["mean"])


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_cross_attention_at_several_resolutions(factor):
    from ondemand_seg import GeneratorConfig, MaskConfig
    from ondemand_seg.generation.generator import CapturingPipeline
    from ondemand_seg.settings.vocabulary import PromptSpec

    sampler = CapturingPipeline(load_pipeline("toy", torch.device("cpu")), MaskConfig(resolution_weights={factor: 1.0}),
                               GeneratorConfig(num_inference_steps=2))
    batch = sampler.generate([PromptSpec("a photo of a ring", ("ring",), (4,), ("ring",))], [0], (32, 32))
    assert batch.masks.shape == (1, 32, 32)


def assert_streams_two_toyworld_samples(model, mask=None):
    """Two samples of ``model``'s stream (``mask``: settings over its preset) pass the gate as 32 px
    image/ToyWorld-label pairs."""
    stream = DiffuMaskStream(model, list(TOY_CLASSES[1:]), num_samples=2, seed=3, generator={"batch_size": 2},
                             mask=mask)
    samples = list(stream)
    assert len(samples) == 2 and stream.stats()["accepted"] >= 2
    image, mask = samples[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
    assert set(mask.unique().tolist()) <= set(range(len(TOY_CLASSES))) | {255}


def test_toy_mmdit_loads_as_sd3_without_t5_and_streams(monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Saved without its T5 encoder ([null, null] in model_index.json): loads through the same path.
    pipeline = load_pipeline("toy-mmdit", torch.device("cpu"))
    assert isinstance(pipeline, StableDiffusion3Pipeline) and pipeline.text_encoder_3 is None
    config = resolve_config("toy-mmdit")
    assert config.image_size == (32, 32) and config.label_space == TOY_CLASSES
    assert config.mask.joint_softmax == "text" and config.mask.resolution_weights == {1: 1.0}
    # The repair that measured better on it (benchmarks/mask_recipes.py --repairs) is its preset.
    assert (config.mask.self_attention_factor, config.mask.self_attention_sharpness,
            config.mask.self_attention_mode) == (1, 2.0, "replace")
    assert_streams_two_toyworld_samples("toy-mmdit")
    assert_streams_two_toyworld_samples("toy-mmdit", {"self_attention_factor": None})


def test_toy_unaided_has_self_attention_at_its_finest_grid_and_streams_with_its_preset(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline = load_pipeline("toy-unaided", torch.device("cpu"))
    # The shipped toy's 16x16 block runs two cross-attentions; this one self-attention then cross-attention.
    assert not any(pipeline.unet.config.only_cross_attention)
    assert load_pipeline("toy", torch.device("cpu")).unet.config.only_cross_attention[0]
    config = resolve_config("toy-unaided")
    assert config.image_size == (32, 32) and config.label_space == TOY_CLASSES
    # Its preset is the best label-free recipe of benchmarks/mask_recipes.py: no per-class γ.
    assert config.mask.class_thresholds == {} and config.mask.self_attention_factor == 1
    assert config.mask.refine == "affinity" and config.mask.resolution_weights == {2: 1.0}
    assert config.mask.threshold_mode == "otsu"
    assert_streams_two_toyworld_samples("toy-unaided")
    # The repair that measured better on it (benchmarks/mask_recipes.py --repairs) streams too.
    assert_streams_two_toyworld_samples("toy-unaided", {"aggregation": "agreement"})


def test_mask_recipes_measures_each_recipe_on_the_same_images_and_confirms_the_best(tmp_path, capsys):
    out = tmp_path / "recipes.json"
    # One image per recipe and two denoising steps: what is checked is which recipes run on which images.
    assert mask_recipes.main(["--model", "toy", "--fusions", "f1-late", "--n", "1", "--confirm-n", "1", "--gen-steps", "2",
                              "--gen-batch-size", "1", "--calibration-per-class", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    search = result["search"]
    # threshold (fixed, Otsu, per class) x refinement (none, affinity, self-attention at the finest
    # self-attention grid, both); the shipped toy's finest self-attention is at factor 2.
    assert result["self_attention_factor"] == 2 and len(search) == 12
    per_class = search["f1-late | γ per class + affinity"]
    assert per_class["labelled_images"] == 5 and per_class["mask"]["class_thresholds"]
    assert search["f1-late | Otsu + self-attention"]["mask"]["self_attention_factor"] == 2
    assert search["f1-late | fixed γ 0.4"]["labelled_images"] == 0
    assert {r["gen_steps"] for r in [*search.values(), *result["confirm"].values()]} == {2}
    # Same images for every recipe: the centre box scores the same truth each time.
    assert len({round(r["centre_box"], 9) for r in search.values()}) == 1
    best = max((k for k, r in search.items() if not r["labelled_images"]), key=lambda k: search[k]["mean"])
    assert best in result["confirm"] and result["confirm"][best]["seed"] == 1
    assert "| f1-late | " in capsys.readouterr().out


def test_multi_class_prompts_refuses_a_band_out_of_range_before_generating(tmp_path, monkeypatch):
    monkeypatch.setattr(multi_class_prompts, "measure", lambda *args, **kwargs: pytest.fail("generated"))
    with pytest.raises(SystemExit, match=r"--ignore-bands must be in \[0, 0.5\), got \[0.7\]"):
        multi_class_prompts.main(["--n", "1", "--ignore-bands", "0.05", "0.7", "--json", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_toy_model_trainer_exports_a_folder_the_library_loads_with_its_preset(tmp_path):
    import train_toy_model

    run = tmp_path / "run"
    train_toy_model.main(["--out", str(run), "--num-samples", "4", "--vae-steps", "1", "--vae-batch", "2",
                          "--steps", "1", "--batch", "2"])
    # --export rebuilds the run's model from its saved flags.
    train_toy_model.main(["--out", str(run), "--export", str(tmp_path / "exported")])
    for folder in (run / "pipeline", tmp_path / "exported"):
        config = resolve_config(folder)
        assert config.label_space == TOY_CLASSES and config.image_size == (32, 32)
        assert config.generator.classes_per_prompt == 2 and config.mask.resolution_weights == {1: 1.0}
        assert isinstance(load_pipeline(folder, torch.device("cpu")), StableDiffusionPipeline)


@pytest.mark.slow
def test_toy_mmdit_trainer_exports_a_folder_the_library_loads_with_its_preset(tmp_path):
    import train_toy_mmdit
    from diffusers import StableDiffusion3Pipeline

    train_toy_mmdit.main(["--out", str(tmp_path), "--num-samples", "4", "--steps", "1", "--batch", "2"])
    config = resolve_config(tmp_path / "pipeline")
    assert config.label_space == TOY_CLASSES and config.mask.joint_softmax == "text"
    assert config.mask == resolve_config("toy-mmdit").mask  # the shipped preset and the trainer's agree
    assert isinstance(load_pipeline(tmp_path / "pipeline", torch.device("cpu")), StableDiffusion3Pipeline)


@pytest.mark.slow
def test_toy_unet_probe_scores_the_library_s_masks_and_recomputes_them_from_its_records(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "toy"))
    import eval_toy_attention

    out = tmp_path / "probe.json"
    eval_toy_attention.main(["--model", "toy", "--per-class", "1", "--gen-steps", "4", "--search", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["generated"]["accepted"] == 5 and result["ours"]["mean"]["n"] == 5
    # The search re-labels the recorded maps with the library's mask functions: at the run's own
    # settings they give the library's masks exactly.
    assert result["recomputed_identical"] == 1.0
    assert result["ours"]["mean"]["iou"] > result["centre_box"]["mean"]["iou"]
    assert "fixed05_default_fusion" in result and result["search"][0]["miou"] >= result["ours"]["mean"]["iou"]


@pytest.mark.slow
def test_toy_mmdit_probe_searches_every_map_kind(tmp_path):
    import probe_toy_mmdit

    from ondemand_seg.pipelines.builtin import resolve_model

    out = tmp_path / "probe.json"
    probe_toy_mmdit.main(["--model", str(resolve_model("toy-mmdit")), "--per-class", "1", "--pairs", "1",
                          "--gen-steps", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["summary"]) == set(probe_toy_mmdit.KINDS)
    assert result["top"][0]["miou"] >= result["summary"]["text"]["all_layers_last10_g04"]["miou"]
