import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ondemand_seg.cli import main


def test_preview_writes_png_grid(tmp_path):
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "ondemand_seg", "preview", "--model", "tiny-random", "--classes", "bird", "dog",
         "--n", "4", "--steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "generating" in result.stderr  # tqdm progress bar on stderr
    with Image.open(out) as grid:
        # 4 samples -> 8 tiles of 64 px, shown at 128 px, with 2 px padding, in one row.
        assert grid.size == (8 * 130 + 2, 130 + 2)
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
        assert grid.size == (4 * 130 + 2, 130 + 2)  # 32 px toy images blown up 4x


def test_stream_command_reports_samples_and_stats(capsys):
    assert main(["stream", "--model", "tiny-random", "--classes", "dog", "--n", "4", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 samples of (3, 64, 64) images" in out and "'accepted'" in out
