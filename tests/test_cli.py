import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ondemand_seg.cli import main
from ondemand_seg.config import resolve_config


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
         "--n", "4", "--steps", "2", "--out", str(out)],
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
    assert main(["preview", "--model", "random-weights", "--vocabulary", str(pets), "--n", "2", "--steps", "2",
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
                 "--steps", "2"]) == 0
    out = capsys.readouterr().out
    # Pixel shares are reported per class of the file's label space.
    assert "2 samples of (3, 64, 64) images" in out
    assert "'cat':" in out and "'hamster':" in out and "'dog'" not in out


def test_config_prints_the_preset_merged_with_the_flags_and_saves_it(tmp_path, capsys):
    out = tmp_path / "settings" / "config.json"
    assert main(["config", "--threshold", "0.3", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    preset = resolve_config("toy")
    assert printed["mask"]["threshold"] == 0.3 != preset.mask.threshold
    # Fields no flag names stay the toy preset's, not the library's defaults.
    assert {int(k): v for k, v in printed["mask"]["resolution_weights"].items()} == preset.mask.resolution_weights
    assert printed["sampler"] == json.loads(preset.to_json())["sampler"]
    assert printed["label_space"] == list(preset.label_space)
    saved = json.loads(out.read_text())
    assert saved == printed
    # What is saved can be passed back as settings.
    assert resolve_config("toy", **saved).mask.threshold == 0.3
