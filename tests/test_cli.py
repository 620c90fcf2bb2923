import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ondemand_seg.cli import main
from ondemand_seg.settings.resolve import resolve_config


@pytest.fixture
def pets(tmp_path):
    """A user vocabulary file with its own classes and template."""
    path = tmp_path / "pets.json"
    path.write_text(json.dumps({"classes": ["background", "cat", "hamster"], "templates": ["a picture of a {class}"]}))
    return path


def test_preview_writes_png_grid(tmp_path):
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "ondemand_seg", "preview", "--model", "random-weights", "--classes", "bird", "dog",
         "--n", "4", "--gen-steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "generating" in result.stderr  # tqdm progress bar on stderr
    with Image.open(out) as grid:
        # 4 samples -> 8 tiles of 64 px side by side at least, plus captions and a legend below them.
        assert grid.width > 8 * 64 and grid.height > 64
        pixels = np.asarray(grid.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50


def test_preview_bad_class_is_a_clean_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["preview", "--classes", "dragon", "--out", str(tmp_path / "x.png")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "unknown class 'dragon'" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_preview_defaults_to_the_embedded_toy_model(tmp_path, capsys):
    out = tmp_path / "toy.png"
    assert main(["preview", "--n", "2", "--out", str(out)]) == 0
    assert "'accepted': 2" in capsys.readouterr().out
    with Image.open(out) as grid:
        assert grid.width > 4 * 32 and grid.height > 32  # 2 samples of 32 px toy images, enlarged, captioned


def test_preview_with_a_user_vocabulary_file(tmp_path, pets, capsys):
    out = tmp_path / "pets.png"
    assert main(["preview", "--model", "random-weights", "--vocabulary", str(pets), "--n", "2", "--gen-steps", "2",
                 "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as grid:
        assert grid.width > 4 * 64 and grid.height > 64


def test_stream_command_reports_samples_and_stats(capsys):
    assert main(["stream", "--model", "random-weights", "--classes", "dog", "--n", "4", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 samples of (3, 64, 64) images" in out and "'accepted'" in out


def test_stream_with_a_user_vocabulary_file(pets, capsys):
    assert main(["stream", "--model", "random-weights", "--vocabulary", str(pets), "--n", "2", "--batch-size", "2",
                 "--gen-steps", "2"]) == 0
    out = capsys.readouterr().out
    # Pixel shares are reported per class of the file's label space.
    assert "2 samples of (3, 64, 64) images" in out
    assert "'cat':" in out and "'hamster':" in out and "'dog'" not in out


def test_config_prints_the_preset_merged_with_the_flags_and_saves_it(tmp_path, capsys):
    out = tmp_path / "settings" / "config.json"
    assert main(["config", "--threshold", "0.3", "--background-floor", "median", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    preset = resolve_config("toy")
    assert printed["mask"]["threshold"] == 0.3 != preset.mask.threshold
    assert printed["mask"]["background_floor"] == "median" != preset.mask.background_floor
    # Fields no flag names stay the toy preset's, not the library's defaults.
    assert {int(k): v for k, v in printed["mask"]["resolution_weights"].items()} == preset.mask.resolution_weights
    assert printed["generator"] == json.loads(preset.to_json())["generator"]
    assert printed["label_space"] == list(preset.label_space)
    saved = json.loads(out.read_text())
    assert saved == printed
    # What is saved can be passed back as settings.
    assert resolve_config("toy", **saved).mask.threshold == 0.3


def test_config_flags_set_the_label_free_repairs(capsys):
    assert main(["config", "--model", "toy-unaided", "--aggregation", "agreement", "--token-rescaling", "classes",
                 "--self-attention-factor", "1", "--self-attention-sharpness", "2", "--self-attention-mode",
                 "replace"]) == 0
    mask = json.loads(capsys.readouterr().out)["mask"]
    preset = resolve_config("toy-unaided").mask
    assert (mask["aggregation"], mask["token_rescaling"]) == ("agreement", "classes") != (preset.aggregation,
                                                                                          preset.token_rescaling)
    assert (mask["self_attention_sharpness"], mask["self_attention_mode"]) == (2.0, "replace")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["config", "--image-size", "12"], r"image_size \(12, 12\) is not a multiple of 8"),
        (["config", "--image-size", "0"], "positive ints, got 0"),
        (["config", "--image-size", "32", "32", "32"], r"positive ints, got \(32, 32, 32\)"),
        (["config", "--guidance", "nan"], "guidance_scale must be finite, got nan"),
        (["config", "--guidance", "1"], "guidance_scale=1.0 turns classifier-free guidance off"),
        (["config", "--gen-steps", "0"], "num_inference_steps must be >= 1, got 0"),
        (["config", "--steps", "2"], "--steps is now --gen-steps"),
        (["preview", "--steps", "2"], "--steps is now --gen-steps"),
        (["stream", "--steps", "2"], "--steps is now --gen-steps"),
        (["preview", "--batch-size", "2"], "--batch-size is now --gen-batch-size"),
        (["config", "--threshold", "nan"], "threshold must be finite, got nan"),
        (["config", "--self-attention-factor", "3"], "self_attention_factor must be None or a latent factor"),
        (["config", "--neglect-ratio", "1.5"], r"neglect_ratio must be in \[0, 1\), got 1.5"),
        (["config", "--class-thresholds", "circle=0.3", "circle=0.4"],
         r"--class-thresholds gives 'circle' twice \(circle=0.3 and circle=0.4\)"),
        (["config", "--self-attention-sharpness", "0.5"], r"self_attention_sharpness must be in \[1, "),
        (["config", "--self-attention-sharpness", "3"], "--self-attention-sharpness shapes the self-attention propagation, "
                                                        "which is off for toy: add --self-attention-factor"),
        (["stream", "--self-attention-mode", "replace"], "--self-attention-mode shapes the self-attention"),
        (["config", "--model", "no/such/folder"], "model folder 'no/such/folder' does not exist"),
        (["stream", "--seed", "-1"], "seed must be >= 0, got -1"),
        (["stream", "--device", "bogus"], "device 'bogus' is not a torch device name"),
        (["stream", "--n", "0"], "--n must be >= 1, got 0"),
        (["stream", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["stream", "--workers", "-1"], "--workers must be >= 0, got -1"),
        (["stream", "--reuse", "0"], "reuse must be >= 1, got 0"),
        (["preview", "--seed", "-3"], "seed must be >= 0, got -3"),
        (["preview", "--gen-batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["preview", "--out", "."], r"--out \. is a folder"),
        (["preview", "--n", "100000"], "--n must be at most 256 for a preview grid, got 100000"),
        (["config", "--out", "/etc/passwd/x.json"], "--out /etc/passwd/x.json cannot be written: /etc/passwd is a file"),
        (["config", "--out", "/proc/version"], "--out /proc/version cannot be written"),
    ],
)
def test_bad_flags_are_clean_usage_errors_before_any_model_loads(argv, message, capsys, monkeypatch, tmp_path):
    import ondemand_seg.generation.generator as source

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded")

    monkeypatch.setattr(source, "load_pipeline", refuse)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_a_broken_model_folder_is_a_usage_error_naming_the_file(tmp_path):
    from ondemand_seg.pipelines.builtin import TOY_MODEL_DIR

    folder = shutil.copytree(TOY_MODEL_DIR, tmp_path / "toy")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = subprocess.run([sys.executable, "-m", "ondemand_seg", "preview", "--model", str(folder), "--out",
                             str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert f"{weights} is truncated" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_label_writes_a_folder_s_pseudo_labels_as_an_export(image_folder, tmp_path, capsys):
    from ondemand_seg.exports import ExportSource

    out = tmp_path / "labelled"
    assert main(["label", "--images", str(image_folder), "--tags", str(image_folder / "tags.json"), "--model", "toy",
                 "--strength", "0.04", "--noise", "inversion", "--format", "webdataset", "--out", str(out)]) == 0
    assert (f"labelled 5 images from {image_folder}: wrote 4 (webdataset, 1 shards) to {out}; left out 1 "
            "{'constant image': 1}") in capsys.readouterr().out
    source = ExportSource(out)
    assert len(source) == 4 and source.metadata["pseudo_labels"]["labelling"]["strength"] == [0.04]
    assert source.metadata["pseudo_labels"]["labelling"]["noise"] == "inversion"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--images", "{tmp}/nowhere"], "--images: .*nowhere does not exist"),
        (["--images", "{tmp}"], r"--images: .* holds no image file \(names ending in .png"),
        (["--tags", "{tmp}/missing.json"], "--tags: .*missing.json does not exist"),
        (["--tags", "{tmp}/short.json"], r"--tags: .*short.json must hold one list of class names per image \(5\)"),
        (["--tags", "{tmp}/dog.json"], r"--tags: .*dog.json: image 0 \(a_rgb.png\) names 'dog', not in the label space"),
        (["--strength", "0"], r"--strength must be one or more numbers in \(0, 1\], got \[0.0\]"),
        (["--format", "coco"], "format must be one of voc, webdataset, hf, got 'coco'"),
        (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
        (["--out", "{tmp}/file"], "is a file; give a folder"),
        (["--model", "toy", "--classes", "dragon"], "unknown class 'dragon'"),
        (["--classes", "circle", "--tags", "{tmp}/ring.json"],
         r"ring.json: image 0 \(a_rgb.png\) names 'ring', not among the classes labelled \(circle\)"),
    ],
)
def test_label_refuses_bad_input_naming_it_before_labelling(flags, message, image_folder, tmp_path, capsys, monkeypatch):
    from ondemand_seg.real import DiffuMaskLabeler

    monkeypatch.setattr(DiffuMaskLabeler, "label", lambda *args, **kwargs: pytest.fail("an image was labelled"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "short.json").write_text(json.dumps([["ring"]] * 4))
    (tmp_path / "dog.json").write_text(json.dumps([["dog"]] * 5))
    (tmp_path / "ring.json").write_text(json.dumps([["ring"]] * 5))
    defaults = {"--images": str(image_folder), "--out": str(tmp_path / "out")}
    given = dict(zip(flags[::2], flags[1::2]))
    argv = ["label", *(arg for key, value in {**defaults, **given}.items() for arg in (key, value.format(tmp=tmp_path)))]
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and re.search(message, err), err
