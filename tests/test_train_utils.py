"""train/utils.py: checkpoints that survive a full disk, reach the disk before they replace the old
one, and fail to load with an error naming the file; the output-folder check."""
import errno
import importlib.util
import io
import os
from pathlib import Path

import pytest
import torch

UTILS = Path(__file__).resolve().parents[1] / "train" / "utils.py"
_spec = importlib.util.spec_from_file_location("train_utils", UTILS)
utils = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(utils)


def checkpoint_state(step=1):
    """A state with every key train_deeplab.py saves, large enough that torch writes it in several calls."""
    return {"model": {"w": torch.full((256, 256), float(step))}, "optimizer": {}, "scheduler": {}, "step": step,
            "epoch": 0, "loader": [{}], "rng": torch.get_rng_state()}


class FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes free: writes take what fits, then fail with ENOSPC."""

    def __init__(self, path, room):
        super().__init__(path, "w")
        self.room = room

    def write(self, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = super().write(bytes(memoryview(data)[: self.room]))
        self.room -= written
        return written


def fill_disk_after(monkeypatch, room):
    """Route save_checkpoint's ``open`` to a :class:`FullDisk`; returns the list of files it opened."""
    opened = []

    def full_open(path, mode="r", *args, **kwargs):
        assert mode == "wb"
        opened.append(Path(path))
        return io.BufferedWriter(FullDisk(path, room))

    monkeypatch.setattr(utils, "open", full_open, raising=False)
    return opened


def test_save_round_trips_and_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", Path(src).name, Path(dst).name))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    path = tmp_path / "checkpoint.pt"
    utils.save_checkpoint(path, checkpoint_state(3))

    assert utils.load_checkpoint(path)["step"] == 3
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1] == path.stat().st_ino, "the file fsynced is the one renamed into place"
    assert events[1][1:] == ("checkpoint.pt.tmp", "checkpoint.pt")
    assert events[2][1] == tmp_path.stat().st_ino, "then its folder, so the rename is durable"
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("room", [0, 4096, 200_000])
def test_disk_full_mid_write_names_path_and_cause_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, room):
    path = tmp_path / "checkpoint.pt"
    utils.save_checkpoint(path, checkpoint_state(1))
    opened = fill_disk_after(monkeypatch, room)

    with pytest.raises(utils.CheckpointError) as failure:
        utils.save_checkpoint(path, checkpoint_state(2))

    assert opened == [tmp_path / "checkpoint.pt.tmp"]
    message = str(failure.value)
    assert str(path) in message and "No space left on device" in message, message
    assert "unexpected pos" not in message, "torch's own message hides the cause"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"], "the partial .tmp is removed"
    assert torch.equal(utils.load_checkpoint(path)["model"]["w"], checkpoint_state(1)["model"]["w"])


def test_a_failing_fsync_is_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    # Some filesystems (NFS, delayed allocation) report a full disk or a lost write only at fsync.
    path = tmp_path / "checkpoint.pt"
    utils.save_checkpoint(path, checkpoint_state(1))

    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(utils.CheckpointError, match="Input/output error") as failure:
        utils.save_checkpoint(path, checkpoint_state(2))
    assert str(path) in str(failure.value)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert utils.load_checkpoint(path)["step"] == 1


def test_an_interrupted_save_removes_its_partial_file_and_is_not_turned_into_a_checkpoint_error(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    utils.save_checkpoint(path, checkpoint_state(1))

    class Interrupted(io.FileIO):
        def write(self, data):
            super().write(bytes(memoryview(data)[:100]))
            raise KeyboardInterrupt

    monkeypatch.setattr(utils, "open", lambda p, mode: io.BufferedWriter(Interrupted(p, "w"), 64), raising=False)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint(path, checkpoint_state(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert utils.load_checkpoint(path)["step"] == 1


def test_a_folder_that_cannot_hold_the_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "checkpoint.pt"
    with pytest.raises(utils.CheckpointError, match="Not a directory") as failure:
        utils.save_checkpoint(path, checkpoint_state())
    assert str(path) in str(failure.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(utils.CheckpointError, match="Permission denied") as failure:
            utils.save_checkpoint(folder / "checkpoint.pt", checkpoint_state())
        assert str(folder / "checkpoint.pt") in str(failure.value)
        assert utils.output_dir_problem(folder) == "is not writable"
    finally:
        folder.chmod(0o700)


def truncated(path):
    torch.save(checkpoint_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class NotATensor:
    pass


@pytest.mark.parametrize(
    "make, message",
    [
        (None, "does not exist"),
        (lambda p: p.mkdir(), "is not a file"),
        (lambda p: p.write_bytes(b""), "truncated, corrupt or not a PyTorch file (EOFError)"),
        (truncated, "truncated, corrupt or not a PyTorch file (RuntimeError: PytorchStreamReader failed"),
        (lambda p: p.write_text("step: 4\n"), "truncated, corrupt or not a PyTorch file"),
        (lambda p: torch.save({"classifier.weight": torch.zeros(2)}, p),
         "is not a train_deeplab.py checkpoint: it lacks model, optimizer, scheduler, step, epoch, loader, rng"),
        (lambda p: torch.save([torch.zeros(2)], p), "is not a train_deeplab.py checkpoint"),
        (lambda p: torch.save({**checkpoint_state(), "extra": NotATensor()}, p), "holds Python objects besides tensors"),
        # fields save_checkpoint never writes (a traceback, or a run resumed at step -3 or from NaN)
        (lambda p: torch.save({**checkpoint_state(), "step": 1.0}, p), "step must be an int >= 0, got 1.0"),
        (lambda p: torch.save({**checkpoint_state(), "step": -3}, p), "step must be an int >= 0, got -3"),
        (lambda p: torch.save({**checkpoint_state(), "epoch": True}, p), "epoch must be an int >= 0, got True"),
        (lambda p: torch.save({**checkpoint_state(), "model": {"w": torch.tensor([1.0, float("nan")])}}, p),
         "holds non-finite weights (model 'w'); resume from an earlier checkpoint"),
        (lambda p: torch.save({**checkpoint_state(), "ema": {"w": torch.tensor([float("inf")])}}, p),
         "holds non-finite weights (ema 'w')"),
        (lambda p: torch.save({**checkpoint_state(), "model": {"w": torch.tensor([complex(float("nan"), 0)])}}, p),
         "holds non-finite weights (model 'w')"),
        (lambda p: torch.save({**checkpoint_state(), "model": {"w": torch.empty(2, device="meta")}}, p),
         "model 'w' is a meta tensor, which holds no values"),
        (lambda p: torch.save({**checkpoint_state(), "args": [("seed", "0")]}, p),
         "args must map flag names to the strings train_deeplab.py records, got a list"),
        (lambda p: torch.save({**checkpoint_state(), "args": {"lr": "0.002", "seed": 0}}, p),
         "args must map flag names to the strings train_deeplab.py records, got 'seed': 0"),
    ],
    ids=["missing", "folder", "empty", "truncated", "text", "state-dict", "list", "pickled-object", "step-float",
         "step-negative", "epoch-bool", "nan-weights", "inf-average", "complex-nan-weights", "meta-weights",
         "args-list", "args-int"],
)
def test_load_refuses_a_bad_file_naming_it(tmp_path, make, message):
    path = tmp_path / "checkpoint.pt"
    if make is not None:
        make(path)
    with pytest.raises(utils.CheckpointError) as failure:
        utils.load_checkpoint(path)
    assert str(path) in str(failure.value) and message in str(failure.value), str(failure.value)


def test_output_dir_problem_names_what_is_wrong(tmp_path):
    (tmp_path / "file").write_text("")
    assert utils.output_dir_problem(tmp_path / "file") == "is a file"
    assert utils.output_dir_problem(tmp_path / "file" / "a" / "b") == f"is under {tmp_path / 'file'}, which is a file"
    assert utils.output_dir_problem(tmp_path) is None
    assert utils.output_dir_problem(tmp_path / "new" / "run") is None, "a folder that can be created is fine"
    assert utils.output_dir_problem(Path("relative-run")) is None


def test_a_metrics_log_that_cannot_be_appended_names_the_file(tmp_path, monkeypatch):
    log = utils.MetricLog(tmp_path)
    log.write({"event": "train", "step": 1, "loss": 1.0})
    real_open = Path.open

    def full(self, mode="r", *args, **kwargs):
        if self == log.csv and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(utils.MetricLogError, match=f"{log.csv}: No space left on device"):
        log.write({"event": "train", "step": 2, "loss": 0.5})
