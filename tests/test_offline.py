"""Offline means offline: importing the package and drawing from the embedded toy model, in the
main process and in a spawned DataLoader worker, never opens a network connection."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_DATASETS_OFFLINE")

# Loaded by every Python process started with this folder on PYTHONPATH (spawned workers too):
# logs and refuses any internet connection; local (AF_UNIX) sockets, which multiprocessing
# uses between a worker and the main process, still work.
SITECUSTOMIZE = '''
import os, socket, traceback

_connect = socket.socket.connect


def _log(what, address):
    with open(os.environ["NETWORK_ATTEMPTS"], "a") as log:
        log.write(f"{what} {address!r} in pid {os.getpid()}\\n{''.join(traceback.format_stack(limit=12))}\\n")
    raise OSError(f"network access blocked by the test: {what} {address!r}")


def connect(self, address):
    if self.family == socket.AF_UNIX:
        return _connect(self, address)
    _log("connect", address)


socket.socket.connect = connect
socket.socket.connect_ex = connect
socket.create_connection = lambda address, *args, **kwargs: _log("create_connection", address)
socket.getaddrinfo = lambda host, port, *args, **kwargs: _log("getaddrinfo", (host, port))
'''

DRAW = '''
import torch
from torch.utils.data import DataLoader

import ondemand_seg
from ondemand_seg import DiffuMaskStream, GeneratorConfig


def stream():
    return DiffuMaskStream("toy", ["ring"], num_samples=1, cache_size=1,
                           generator=GeneratorConfig(num_inference_steps=2, batch_size=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    image, mask = next(iter(stream()))
    assert image.shape == (3, 32, 32), image.shape
    image, mask = next(iter(DataLoader(stream(), num_workers=1, multiprocessing_context="spawn")))
    assert image.shape == (1, 3, 32, 32), image.shape
    print("drew in the main process and in a worker")
'''


def test_import_and_drawing_open_no_connection(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (tmp_path / "draw.py").write_text(DRAW)
    attempts = tmp_path / "attempts.log"
    # Online settings: no offline switch of the hub libraries, nor albumentations' own (this test
    # process imported the package, which set it in os.environ).
    env = {k: v for k, v in os.environ.items() if k not in (*OFFLINE_SWITCHES, "NO_ALBUMENTATIONS_UPDATE")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), NETWORK_ATTEMPTS=str(attempts))
    done = subprocess.run([sys.executable, str(tmp_path / "draw.py")], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "drew in the main process and in a worker" in done.stdout
    assert not attempts.exists(), f"network connections were attempted:\n{attempts.read_text()[:3000]}"


def test_the_blocker_catches_what_albumentations_does_unasked(tmp_path):
    """The check above can fail: without the package's setting, albumentations' import-time
    update check is caught."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    attempts = tmp_path / "attempts.log"
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    env.update(PYTHONPATH=str(tmp_path), NETWORK_ATTEMPTS=str(attempts))
    done = subprocess.run([sys.executable, "-c", "import albumentations"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pypi.org" in attempts.read_text()
