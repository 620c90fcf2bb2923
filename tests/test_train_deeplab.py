"""The training script, run as users run it: single process, resume, DDP with gloo, bad flags,
its help and the generator settings it resolves (``--print-config``).

Most runs call ``cli``/``main`` in this process on a few steps, a 2-image val folder and the tiny
random model; a subprocess is kept where the process is what is tested (the command line's exit
status, a file-size limit, DDP, a resume in a new process), and those that take long are marked slow.
"""
import collections
import contextlib
import copy
import importlib.util
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from filelock import FileLock
from torchdata.stateful_dataloader import StatefulDataLoader

from ondemand_seg import DiffuMaskStream
from ondemand_seg.pipelines.tiny import save_tiny_pipeline
from ondemand_seg.settings.resolve import resolve_config
from ondemand_seg.settings.vocabulary import load_vocabulary
from ondemand_seg.toyworld import TOY_CLASSES, write_voc

SCRIPT = Path(__file__).resolve().parents[1] / "train" / "train_deeplab.py"
FAST = ["--model", "random-weights", "--vocabulary", "toy", "--batch-size", "4", "--gen-steps", "2",
        "--eval-limit", "8", "--threads", "1"]


def run(args, tmp_path, launcher=(sys.executable,), timeout=600, base=FAST, max_file_bytes=None):
    """The script in a subprocess; ``max_file_bytes`` makes larger writes fail (EFBIG) as a full disk would."""
    command = [*launcher, str(SCRIPT), *base, "--data-dir", str(tmp_path / "data"), *args]
    # The script imports the ondemand_seg of the tree it belongs to, whichever one is installed.
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH")])))

    def limit_file_size():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path,
                          preexec_fn=None if max_file_bytes is None else limit_file_size)


def load_trainer(monkeypatch):
    """train_deeplab.py imported in this process, with train/'s other modules as its imports, to call main()."""
    for name in ("utils", "dilated_convs", "seeded_data", "train_deeplab"):
        spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
    return module


def printed_config(trainer, capsys, *flags):
    """The generator settings ``train_deeplab.py --synthetic-only FLAGS --print-config`` prints."""
    capsys.readouterr()
    trainer.cli(["--synthetic-only", *flags, "--print-config"])
    return json.loads(capsys.readouterr().out)


def rows(directory, event):
    return [r for r in map(json.loads, (directory / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def losses(directory):
    return [r["loss"] for r in rows(directory, "train")]


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory):
    """A VOC folder of 12 train and 2 val images at the generator's size: the real data and the val
    split of the runs here, which then write no ToyWorld (1200 images)."""
    root = tmp_path_factory.mktemp("voc")
    write_voc(root, n_train=12, n_val=2, image_size=resolve_config("random-weights").image_size)
    return root


def synthetic_flags(tmp_path, small_voc, *flags):
    """A tiny synthetic-only run without DataLoader workers, scored on ``small_voc``'s val split."""
    return [*FAST, "--synthetic-only", "--workers", "0", "--eval-root", str(small_voc), "--data-dir", str(tmp_path / "data"),
            *flags]


def train_in_process(trainer, flags):
    """``train_deeplab.py FLAGS`` run in this process: its summary and what it printed."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        summary = trainer.cli(flags)
    return summary, printed.getvalue()


def once_per_session(tmp_path_factory, name, fill):
    """``tmp/name`` after ``fill(tmp/name)``, filled once per test session: under xdist the first
    worker to ask fills it in the session's folder while the others wait, rather than each
    filling one of its own."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    folder = base / name
    with FileLock(f"{folder}.lock"):
        if not (folder / "filled").exists():
            folder.mkdir(exist_ok=True)
            fill(folder)
            (folder / "filled").touch()
    return folder


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory):
    """A 4-step synthetic-only run keeping a weight average and checkpointing every 2 steps
    (``root/whole``), then the same run resumed from its step-2 checkpoint (``root/two``), both in
    a test process; ``printed``: what each printed (``root/whole.txt``, ``root/two.txt``)."""
    def flags(root):
        return synthetic_flags(root, root / "voc", "--steps", "4", "--checkpoint-every", "2", "--ema-decay", "0.5")

    def train_and_resume(root):
        write_voc(root / "voc", n_train=1, n_val=2, image_size=resolve_config("random-weights").image_size)
        with pytest.MonkeyPatch.context() as patch:
            trainer = load_trainer(patch)
            for name, resume in (("whole", []), ("two", ["--resume", str(root / "whole" / "checkpoint_000002.pt")])):
                _, printed = train_in_process(trainer, [*flags(root), "--output-dir", str(root / name), *resume])
                (root / f"{name}.txt").write_text(printed)

    root = once_per_session(tmp_path_factory, "synthetic-run", train_and_resume)
    return SimpleNamespace(root=root, flags=flags(root),
                           printed={name: (root / f"{name}.txt").read_text() for name in ("whole", "two")})


@pytest.mark.parametrize("workers, prefetch", [(0, None), (2, 6)])
def test_stateful_loader_resume_continues_the_stream(fast, workers, prefetch):
    # Workers prefetching several batches (the trainer's default) still resume where the trainer was.
    def loader():
        stream = DiffuMaskStream("random-weights", ["dog", "bird"], reuse=2, cache_size=8, **fast)
        return StatefulDataLoader(stream, batch_size=2, num_workers=workers, prefetch_factor=prefetch)

    whole = [masks for _, masks in itertools.islice(iter(loader()), 8)]
    first = loader()
    batches = iter(first)
    for _ in range(5):
        next(batches)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [masks for _, masks in itertools.islice(iter(resumed), 3)]
    assert all(torch.equal(a, b) for a, b in zip(rest, whole[5:]))


def test_stream_workers_prefetch_the_batches_of_one_generation_call(monkeypatch, tmp_path):
    trainer = load_trainer(monkeypatch)
    assert trainer.generation_burst(20, 8, 16) == 10
    assert trainer.generation_burst(4, 1, 16) == 2, "never below torch's default"

    def prefetch(*flags):
        args = trainer.get_args_parser().parse_args([*FAST, "--gen-batch-size", "4", "--reuse", "3", *flags])
        config, args.classes = trainer.generator_config(args)
        loader, _ = trainer.build_train_loader(args, config, 0, 1, torch.device("cpu"))
        return loader.prefetch_factor

    assert prefetch("--synthetic-only") == 3  # 4 images x 3 servings / batches of 4
    assert prefetch("--synthetic-only", "--prefetch-batches", "7") == 7
    assert prefetch("--synthetic-only", "--workers", "0") is None
    write_voc(tmp_path, n_train=4, n_val=1, image_size=32)
    assert prefetch("--real-only", "--voc-root", str(tmp_path)) == 2


def test_trainer_leaves_a_core_to_each_worker_generating_on_the_cpu(monkeypatch):
    trainer = load_trainer(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)

    def threads(*flags, world=1):
        return trainer.training_threads(trainer.get_args_parser().parse_args(list(flags)), world)

    assert threads("--synthetic-only") == 3
    assert threads("--synthetic-only", "--workers", "2", world=2) == 1, "ranks share the cores; never below 1"
    assert threads() == 3, "a mixed run generates in its workers too"
    assert threads("--synthetic-only", "--threads", "4") == 4
    assert threads("--real-only") is None and threads("--synthetic-only", "--workers", "0") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert threads("--synthetic-only") is None, "workers generate on the GPU"


def test_synthetic_only_run_writes_metrics_and_resumes(synthetic_run):
    whole, printed = synthetic_run.root / "whole", synthetic_run.printed
    assert "random init" in printed["whole"] and "mIoU" in printed["whole"]
    final = rows(whole, "final")[0]
    assert 0.0 <= final["miou"] <= 1.0 and set(final["per_class_iou"]) >= {"background", "circle"}
    assert (whole / "metrics.csv").read_text().startswith("event,step,key,value")
    # The generator settings of the run are saved beside its metrics, in the preset's form.
    saved = json.loads((whole / "generator_config.json").read_text())
    assert saved["label_space"] == list(TOY_CLASSES) and saved["generator"]["num_inference_steps"] == 2
    assert torch.load(whole / "checkpoint.pt", weights_only=True)["step"] == 4
    # Resumed from step 2 into a new folder: the losses of the uninterrupted run, which also shows
    # that writing the step-2 checkpoint left the run as it was.
    assert "resumed from" in printed["two"]
    assert losses(synthetic_run.root / "two") == pytest.approx(losses(whole)[2:], rel=1e-4), \
        "a resumed run sees the same batches as an uninterrupted one"


def test_real_only_run_is_fixed_by_its_seed_and_resumes_exactly(tmp_path, monkeypatch, small_voc):
    # The real images' random crops and flips come from --seed too: a rerun trains on the same
    # batches, and a resumed run continues their augmentation where it stopped (worker included).
    # 12 images make 3 batches an epoch: the runs cross an epoch's end, one resumed run after
    # resuming, the other resumed in the second epoch (whose order the sampler's generator drew
    # after the first's).
    trainer = load_trainer(monkeypatch)
    flags = [*FAST, "--real-only", "--voc-root", str(small_voc), "--steps", "5", "--checkpoint-every", "2",
             "--workers", "1", "--data-dir", str(tmp_path / "data")]

    def run_losses(name, *extra):
        train_in_process(trainer, [*flags, "--output-dir", str(tmp_path / name), *extra])
        return losses(tmp_path / name)

    want = run_losses("whole")
    assert run_losses("again", "--checkpoint-every", "5") == want, "a rerun (checkpointed only at its end) differs"
    assert run_losses("other", "--seed", "1") != want
    resumed = run_losses("two", "--resume", str(tmp_path / "whole" / "checkpoint_000002.pt"))
    assert resumed == pytest.approx(want[2:], rel=1e-4)
    assert run_losses("four", "--resume", str(tmp_path / "whole" / "checkpoint_000004.pt")) == pytest.approx(want[4:],
                                                                                                             rel=1e-4)


def test_weight_average_is_evaluated_checkpointed_and_resumed_exactly(synthetic_run, tmp_path, monkeypatch, capsys):
    whole = synthetic_run.root / "whole"
    assert rows(whole, "final")[0]["ema_decay"] == 0.5
    end = torch.load(whole / "checkpoint.pt", weights_only=True)
    assert int(end["ema"]["n_averaged"]) == 4
    # The average trails the trained weights: some parameter moved since step 2 differs from it.
    trained, averaged = end["model"], {k.removeprefix("module."): v for k, v in end["ema"].items()}
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained if k in averaged and trained[k].is_floating_point())
    again = torch.load(synthetic_run.root / "two" / "checkpoint.pt", weights_only=True)["ema"]
    assert all(torch.allclose(again[k].float(), v.float(), atol=1e-5) for k, v in end["ema"].items())
    # Resuming without the average the checkpoint keeps would silently change the run: refused,
    # whatever --allow-changed says.
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    plain = [*FAST, "--synthetic-only", "--steps", "4", "--workers", "0", "--data-dir", str(tmp_path / "data"),
             "--output-dir", str(tmp_path / "three"), "--resume", str(whole / "checkpoint_000002.pt")]
    for allowed in ([], ["--allow-changed", "ema-decay"]):
        error = refusal(trainer, capsys, [*plain, *allowed])
        assert error.endswith("other flags: --ema-decay 0.5 -> 0.0 (the checkpoint keeps a weight average); "
                              "resume with the checkpoint's values"), error


def test_mixed_with_real_voc_and_full_augmentation(tmp_path, monkeypatch, small_voc):
    # The full recipe splices in the map-style synthetic set too (its items tile with other items
    # of their generation block), next to real VOC-format data in one ConcatDataset; a few real
    # images are repeated so that the synthetic share stays the one asked for.
    trainer = load_trainer(monkeypatch)
    _, printed = train_in_process(trainer, [
        *FAST, "--voc-root", str(small_voc), "--synthetic-ratio", "0.5", "--steps", "3", "--augment", "full",
        "--real-images", "2", "--synthetic-length", "8", "--workers", "0", "--data-dir", str(tmp_path / "data"),
        "--output-dir", str(tmp_path / "mixed")])
    assert "mixing 2 real images (x4) with 8 synthetic: 50% of samples synthetic" in printed
    assert rows(tmp_path / "mixed", "final")[0]["step"] == 3
    assert not (tmp_path / "data").exists(), "scored on --voc-root's val split: no ToyWorld is written"


@pytest.mark.slow
def test_pseudo_labelled_rest_joins_the_labelled_images(tmp_path, monkeypatch):
    # 4 labelled ToyWorld images; the other 8 are labelled by the toy model from their tags.
    trainer = load_trainer(monkeypatch)
    write_voc(tmp_path / "real", n_train=12, n_val=2, image_size=32)
    flags = ["--model", "toy", "--batch-size", "4", "--eval-limit", "2", "--threads", "1", "--voc-root",
             str(tmp_path / "real"), "--real-only", "--real-images", "4", "--workers", "0"]
    args = trainer.get_args_parser().parse_args([*flags, "--pseudo-label-rest"])
    config, args.classes = trainer.generator_config(args)
    loader, dataset = trainer.build_train_loader(args, config, 0, 1, torch.device("cpu"))
    assert len(dataset) == 12
    pseudo = dataset.datasets[1].dataset
    labelled = {Path(pseudo.images.dataset.images[i]).stem for i in pseudo.images.indices}
    chosen = trainer.real_training_set(args)
    assert len(labelled) == 8 and not labelled & {Path(chosen.dataset.images[i]).stem for i in chosen.indices}
    image, mask = pseudo[0]
    truth = np.asarray(PIL.Image.open(pseudo.images.dataset.masks[pseudo.images.indices[0]]))
    assert set(np.unique(np.asarray(mask)).tolist()) <= set(np.unique(truth).tolist()) | {255}
    images, masks = next(iter(loader))
    assert images.shape == (4, 3, 64, 64) and masks.shape == (4, 64, 64)
    bare = trainer.get_args_parser().parse_args(["--pseudo-label-rest"])
    config, bare.classes = trainer.generator_config(bare)
    with pytest.raises(SystemExit, match="--pseudo-label-rest pseudo-labels the train images --real-images leaves out"):
        trainer.check_args(bare, config)


def test_pseudo_labelled_images_of_a_folder_join_the_real_ones(tmp_path, monkeypatch, small_voc, image_folder):
    # The user's 5 images (RGB, gray, RGBA, another size, one flat) beside 12 labelled real ones.
    trainer = load_trainer(monkeypatch)
    flags = [*FAST, "--voc-root", str(small_voc), "--real-only", "--steps", "2", "--workers", "0",
             "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"),
             "--pseudo-images", str(image_folder), "--pseudo-tags", str(image_folder / "tags.json")]
    summary, printed = train_in_process(trainer, flags)
    assert f"pseudo-labelled 4 of 5 images of {image_folder} from --pseudo-tags with random-weights (1 left out" in printed
    assert summary["step"] == 2
    args = trainer.get_args_parser().parse_args(flags)
    config, args.classes = trainer.generator_config(args)
    _, dataset = trainer.build_train_loader(args, config, 0, 1, torch.device("cpu"))
    pseudo = dataset.datasets[1].dataset
    assert len(dataset) == 12 + 5 and pseudo.images.names[4] == "e_flat.png"
    image, mask = pseudo[3]  # 40x24 JPEG, labelled at its own size
    assert image.size == (24, 40) and set(np.unique(np.asarray(mask)).tolist()) <= {0, TOY_CLASSES.index("ring"), 255}


def test_exported_pseudo_labels_train_a_run_through_from_export(tmp_path, monkeypatch, small_voc, image_folder):
    from ondemand_seg.real import DiffuMaskLabeler, ImageFolderImages, PseudoLabelledDataset

    labeler = DiffuMaskLabeler("toy", labelling={"strength": 0.04})
    PseudoLabelledDataset(ImageFolderImages(image_folder), image_folder / "tags.json", labeler).export(
        tmp_path / "labels", progress=False)
    trainer = load_trainer(monkeypatch)
    summary, printed = train_in_process(trainer, [
        "--synthetic-only", "--from-export", str(tmp_path / "labels"), "--eval-root", str(small_voc), "--steps", "2",
        "--batch-size", "4", "--reuse", "1", "--workers", "0", "--threads", "1", "--eval-limit", "2",
        "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")])
    assert f"reading pseudo-labelled samples from ExportSource('{tmp_path / 'labels'}': voc, samples 0 to 3" in printed
    assert summary["step"] == 2


def test_real_images_are_a_seeded_subset_the_same_for_real_only_and_mixed(tmp_path, monkeypatch):
    trainer = load_trainer(monkeypatch)
    write_voc(tmp_path / "real", n_train=12, n_val=2, image_size=16)

    def chosen(*flags):
        args = trainer.get_args_parser().parse_args(["--voc-root", str(tmp_path / "real"), *flags])
        subset = trainer.real_training_set(args)
        return [Path(subset.dataset.images[i]).stem for i in subset.indices]

    seed0 = chosen("--real-images", "5", "--seed", "0")
    assert len(set(seed0)) == 5
    assert chosen("--real-only", "--real-images", "5", "--seed", "0") == seed0
    assert chosen("--real-images", "5", "--seed", "1") != seed0
    assert len(trainer.real_training_set(trainer.get_args_parser().parse_args(["--voc-root", str(tmp_path / "real")]))) == 12
    with pytest.raises(SystemExit, match=r"--real-images 50 but .*real has 12 train images"):
        chosen("--real-images", "50")
    # Fewer images than a batch: refused, where drop_last would have made every epoch empty.
    args = trainer.get_args_parser().parse_args([*FAST, "--voc-root", str(tmp_path / "real"), "--real-only",
                                                 "--real-images", "3", "--workers", "0"])
    config, args.classes = trainer.generator_config(args)
    with pytest.raises(SystemExit, match=r"the training set has 3 samples, fewer than one batch \(--batch-size 4") as refused:
        trainer.build_train_loader(args, config, 0, 1, torch.device("cpu"))
    assert refused.value.code == 2


def test_mix_sizes_keep_the_synthetic_share(monkeypatch):
    trainer = load_trainer(monkeypatch)
    assert trainer.mix_sizes(1000, 0.5, None) == (1000, 1)  # no length given: the real set sets it
    assert trainer.mix_sizes(100, 0.25, None) == (33, 1)
    for n_real, ratio, length in [(25, 0.5, 256), (100, 0.5, 512), (25, 0.75, 512), (7, 0.3, 100)]:
        synthetic, repeats = trainer.mix_sizes(n_real, ratio, length)
        assert synthetic == length and repeats >= 1
        assert abs(synthetic / (synthetic + repeats * n_real) - ratio) < 0.05
    # More real images than the ratio wants: never fewer than one copy of each.
    assert trainer.mix_sizes(1000, 0.5, 256) == (256, 1)


def test_toyworld_is_written_at_the_generator_size_whatever_the_run(tmp_path, monkeypatch):
    # Real-only, synthetic and mixed runs sharing a --data-dir must be scored on the same val images.
    from PIL import Image

    trainer = load_trainer(monkeypatch)
    write = trainer.write_voc
    # Fewer images than the trainer asks for: their size is what is checked.
    monkeypatch.setattr(trainer, "write_voc", lambda root, n_train, n_val, **kwargs: write(root, 8, 2, **kwargs))
    train_in_process(trainer, [*FAST, "--real-only", "--steps", "1", "--crop-size", "32", "--workers", "0",
                               "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "real")])
    generated = resolve_config("random-weights").image_size
    images = sorted((tmp_path / "data" / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))
    assert images and Image.open(images[0]).size[::-1] == generated != (32, 32)


EXPORT_FORMATS = ["voc", "webdataset", "hf"]
# 3 steps of 4 from a stream of generation batch 4 (the random model's preset) draw samples 0 to 11.
EXPORTED, EXPORT_STEPS = 12, 3


def recording_batches(trainer, monkeypatch):
    """Every batch the trainer's steps take, by output folder name, as (images, masks)."""
    batches = collections.defaultdict(list)
    step = trainer.train_step

    def recording(run, images, masks, prunable):
        batches[run.args.output_dir.name].append((images.clone(), masks.clone()))
        return step(run, images, masks, prunable)

    monkeypatch.setattr(trainer, "train_step", recording)
    return batches


def reading_flags(root, *flags):
    """A tiny run's flags without the generator's (an export brings its own), scored on ``root/val``."""
    return ["--batch-size", "4", "--eval-limit", "8", "--threads", "1", "--workers", "0", "--eval-root",
            str(root / "val"), "--data-dir", str(root / "data"), *flags]


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory):
    """The first samples of the random model's stream (FAST's settings) exported once per format with
    lossless images (``root/<format>``), and the batches of a synthetic-only run on the live stream
    (``root/live.pt``)."""
    def export_and_train(root):
        from ondemand_seg import DiffuMaskGenerator, export

        write_voc(root / "val", n_train=1, n_val=2, image_size=resolve_config("random-weights").image_size)
        with pytest.MonkeyPatch.context() as patch:
            trainer = load_trainer(patch)
            args = trainer.get_args_parser().parse_args([*FAST, "--synthetic-only"])
            config, classes = trainer.generator_config(args)
            for fmt in EXPORT_FORMATS:
                export(DiffuMaskGenerator("random-weights", classes, **config.to_dict()), root / fmt, EXPORTED,
                       format=fmt, shard_size=5, image_format="png", progress=False)
            batches = recording_batches(trainer, patch)
            train_in_process(trainer, [*FAST, *reading_flags(root, "--synthetic-only", "--steps", str(EXPORT_STEPS),
                                                            "--output-dir", str(root / "live"))])
            torch.save(batches["live"], root / "live.pt")

    return once_per_session(tmp_path_factory, "exported-run", export_and_train)


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_training_from_an_export_of_the_first_samples_sees_the_live_streams_batches(exported_run, fmt, tmp_path,
                                                                                     monkeypatch):
    trainer = load_trainer(monkeypatch)
    batches = recording_batches(trainer, monkeypatch)
    _, printed = train_in_process(trainer, reading_flags(exported_run, "--synthetic-only", "--from-export",
                                                         str(exported_run / fmt), "--steps", str(EXPORT_STEPS),
                                                         "--output-dir", str(tmp_path / "read")))
    assert f"reading synthetic samples from ExportSource('{exported_run / fmt}': {fmt}, samples 0 to 11" in printed
    live = torch.load(exported_run / "live.pt")
    assert len(batches["read"]) == len(live) == EXPORT_STEPS
    for (images, masks), (want_images, want_masks) in zip(batches["read"], live):
        assert torch.equal(images, want_images) and torch.equal(masks, want_masks)


def test_a_mixed_run_reads_its_synthetic_set_from_an_export_as_the_live_one_generates_it(exported_run, tmp_path,
                                                                                         monkeypatch, small_voc, capsys):
    trainer = load_trainer(monkeypatch)
    batches = recording_batches(trainer, monkeypatch)
    mix = ["--voc-root", str(small_voc), "--real-images", "2", "--synthetic-length", "8", "--steps", "2"]
    train_in_process(trainer, [*FAST, *reading_flags(exported_run, *mix, "--output-dir", str(tmp_path / "live"))])
    # 8 of the 2 real and 8 synthetic items: at least 6 of the compared ones are synthetic.
    for fmt in EXPORT_FORMATS:
        train_in_process(trainer, reading_flags(exported_run, *mix, "--from-export", str(exported_run / fmt),
                                                "--output-dir", str(tmp_path / fmt)))
        assert len(batches[fmt]) == len(batches["live"]) == 2
        for (images, masks), (want_images, want_masks) in zip(batches[fmt], batches["live"]):
            assert torch.equal(images, want_images) and torch.equal(masks, want_masks), fmt
    capsys.readouterr()
    error = refusal(trainer, capsys, reading_flags(exported_run, *mix, "--synthetic-length", "16", "--from-export",
                                                   str(exported_run / "voc"), "--output-dir", str(tmp_path / "more")))
    assert error.endswith("--from-export: the mix wants 16 synthetic samples (--synthetic-length, or --synthetic-ratio "
                          f"of the real images): length=16 is more than export {exported_run / 'voc'} holds: 12 "
                          "samples (0 to 11)"), error


def test_an_export_replaces_the_generator_flags_which_are_refused(exported_run, tmp_path, monkeypatch, capsys):
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    flags = reading_flags(exported_run, "--synthetic-only", "--output-dir", str(tmp_path / "out"), "--from-export")
    wds = str(exported_run / "webdataset")
    assert refusal(trainer, capsys, [*flags, wds, "--gen-steps", "3", "--model", "random-weights"]).endswith(
        f"--model, --gen-steps set how samples are generated, and --from-export {wds} reads samples generated with "
        "the export's settings: drop them (--print-config shows the export's)")
    assert refusal(trainer, capsys, [*flags, str(tmp_path / "nowhere")]).endswith(
        f"--from-export: export {str(tmp_path / 'nowhere')!r} is not a folder")
    # A VOC tree that no export wrote, an export whose command was stopped, one of an unknown format.
    assert refusal(trainer, capsys, [*flags, str(exported_run / "val")]).endswith(
        f"--from-export: {exported_run / 'val'} holds no export (metadata.json is missing)")
    for name, change in [("unfinished", {"complete": False}), ("foreign", {"format": "tfrecord"})]:
        shutil.copytree(exported_run / "voc", tmp_path / name)
        metadata = json.loads((tmp_path / name / "metadata.json").read_text())
        (tmp_path / name / "metadata.json").write_text(json.dumps({**metadata, **change}))
    assert refusal(trainer, capsys, [*flags, str(tmp_path / "unfinished")]).endswith(
        f"--from-export: export {tmp_path / 'unfinished'} is unfinished (3 shard(s) written): rerun its export "
        "command to finish it")
    assert refusal(trainer, capsys, [*flags, str(tmp_path / "foreign")]).endswith(
        f"--from-export: {tmp_path / 'foreign' / 'metadata.json'} names format 'tfrecord', which this version does "
        "not read (voc, webdataset, hf)")
    flags.remove("--synthetic-only")
    assert refusal(trainer, capsys, [*flags, wds, "--real-only"]).endswith(
        "--from-export reads synthetic samples and a --real-only run has none")
    printed = printed_config(trainer, capsys, "--from-export", wds)
    assert printed["generator"]["num_inference_steps"] == 2 and printed["label_space"] == list(TOY_CLASSES)


def test_resume_compares_the_export_read_by_its_identity_not_its_folder(exported_run, tmp_path, monkeypatch, capsys):
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    flags = reading_flags(exported_run, "--synthetic-only", "--output-dir", str(tmp_path / "out"), "--from-export")
    checkpoint = recorded_checkpoint(trainer, tmp_path, [*flags, str(exported_run / "hf")])
    # The same samples elsewhere, in another format, are the same data...
    shutil.copytree(exported_run / "voc", tmp_path / "copy")
    args = trainer.get_args_parser().parse_args([*flags, str(tmp_path / "copy"), "--resume", str(checkpoint)])
    config, args.classes = trainer.generator_config(args)
    assert trainer.check_resume_args(torch.load(checkpoint, weights_only=True), args, config.label_space) == {}
    # ...other samples are not, nor the live generator.
    from ondemand_seg import DiffuMaskGenerator, export

    export(DiffuMaskGenerator("random-weights", args.classes, **config.to_dict()), tmp_path / "fewer", 8,
           image_format="png", progress=False)
    error = refusal(trainer, capsys, [*flags, str(tmp_path / "fewer"), "--resume", str(checkpoint)])
    assert re.search(r"other flags: --from-export export of samples 0 to 11, seed 0 \(sha256:\w{16}\) -> export of "
                     r"samples 0 to 7, seed 0 \(sha256:\w{16}\);", error), error
    live = [flag for flag in flags if flag != "--from-export"]
    assert "--from-export export of samples 0 to 11, seed 0" in refusal(trainer, capsys, [*FAST, *live, "--resume",
                                                                                        str(checkpoint)])


def test_a_stream_run_resumed_with_another_worker_count_continues_from_its_resharded_position(synthetic_run, tmp_path,
                                                                                             monkeypatch):
    from ondemand_seg.data.schedule import reshard
    from ondemand_seg.data.stream import find_stream_states

    trainer = load_trainer(monkeypatch)
    checkpoint = synthetic_run.root / "whole" / "checkpoint_000002.pt"
    _, printed = train_in_process(trainer, [*synthetic_run.flags, "--workers", "1", "--output-dir", str(tmp_path / "one"),
                                            "--resume", str(checkpoint)])
    moved = "1 rank x 0 workers -> 1 rank x 1 worker; the stream's position resharded"
    assert f"resumed from {checkpoint} at step 2; processes changed: {moved}" in printed
    assert rows(tmp_path / "one", "resume")[0]["processes"] == moved
    assert [row["step"] for row in rows(tmp_path / "one", "train")] == [3, 4]
    # The worker served from the plan that carries what the main process had drawn and not served
    # --reuse times, then fresh samples past it: none twice, none skipped (tests/test_schedule.py).
    before = find_stream_states(torch.load(checkpoint, weights_only=True)["loader"])
    (after,) = find_stream_states(torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["loader"])
    plan = reshard(before, seed=0, batch=4, cache_size=64, reuse=8)
    assert after["plan"] == plan.to_dict() and plan.served == 8 and after["served"] == 8


def test_a_run_from_an_export_resumed_with_a_worker_serves_the_rest_of_its_pass_once(exported_run, tmp_path,
                                                                                     monkeypatch):
    # Reuse 1 over the 12 exported samples: a pass is 3 batches of 4, each sample once. Without
    # augmentation a served sample is its export's bytes resized, so the samples can be counted.
    trainer = load_trainer(monkeypatch)
    batches = recording_batches(trainer, monkeypatch)
    flags = reading_flags(exported_run, "--synthetic-only", "--from-export", str(exported_run / "voc"), "--augment",
                          "off", "--reuse", "1", "--cache-size", "4", "--steps", "3", "--checkpoint-every", "1")
    train_in_process(trainer, [*flags, "--output-dir", str(tmp_path / "whole")])
    flags[flags.index("--workers") + 1] = "1"
    _, printed = train_in_process(trainer, [*flags, "--output-dir", str(tmp_path / "resumed"), "--resume",
                                            str(tmp_path / "whole" / "checkpoint_000001.pt")])
    assert "processes changed: 1 rank x 0 workers -> 1 rank x 1 worker; the stream's position resharded" in printed

    def served(steps):
        return collections.Counter(image.numpy().tobytes() + mask.numpy().tobytes()
                                   for images, masks in steps for image, mask in zip(images, masks))

    whole = served(batches["whole"])
    assert len(whole) == EXPORTED and set(whole.values()) == {1}, "the uninterrupted pass serves each sample once"
    assert len(batches["resumed"]) == 2 and served(batches["whole"][:1] + batches["resumed"]) == whole
    assert not rows(tmp_path / "resumed", "epoch_end"), "the pass ended early"


def test_a_mixed_run_resumed_on_another_number_of_ranks_continues_from_the_next_epoch(tmp_path, monkeypatch, small_voc):
    # 2 real images (x2) and 4 synthetic make 2 batches an epoch. The step-1 checkpoint is made to
    # look as if 2 ranks wrote it: resumed by one, the run serves epoch 1 (not the rest of epoch 0)
    # in the order an uninterrupted single-process run does.
    trainer = load_trainer(monkeypatch)
    fetched = collections.defaultdict(list)
    getitem = trainer.StatefulConcatDataset.__getitem__
    folder = {"name": None}

    def recording(self, index):
        fetched[folder["name"]].append(index)
        return getitem(self, index)

    monkeypatch.setattr(trainer.StatefulConcatDataset, "__getitem__", recording)
    flags = [*FAST, "--voc-root", str(small_voc), "--real-images", "2", "--synthetic-length", "4", "--steps", "3",
             "--checkpoint-every", "1", "--augment", "basic", "--workers", "0", "--data-dir", str(tmp_path / "data")]
    folder["name"] = "whole"
    train_in_process(trainer, [*flags, "--output-dir", str(tmp_path / "whole")])
    checkpoint = torch.load(tmp_path / "whole" / "checkpoint_000001.pt", weights_only=True)
    checkpoint["loader"] *= 2
    torch.save(checkpoint, tmp_path / "two_ranks.pt")
    folder["name"] = "resumed"
    _, printed = train_in_process(trainer, [*flags, "--output-dir", str(tmp_path / "resumed"), "--resume",
                                            str(tmp_path / "two_ranks.pt")])
    moved = "2 ranks x 0 workers -> 1 rank x 0 workers; the map-style set continues from the start of epoch 1"
    assert f"processes changed: {moved}" in printed and rows(tmp_path / "resumed", "resume")[0]["processes"] == moved
    assert len(fetched["whole"]) == 12 and fetched["resumed"] == fetched["whole"][8:] + fetched["resumed"][4:]
    assert fetched["resumed"][:4] == fetched["whole"][8:12], "epoch 1's first batch"


@pytest.mark.slow
def test_ddp_two_ranks_with_gloo_resumed_in_one_process_with_two_workers(tmp_path):
    # Scored on ToyWorld, which rank 0 writes while rank 1 waits at a barrier.
    from ondemand_seg.data.stream import find_stream_states

    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517")
    done = run(["--synthetic-only", "--steps", "3", "--output-dir", "ddp", "--workers", "1"], tmp_path, launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("mIoU") == 1, "only rank 0 logs"
    assert len(rows(tmp_path / "ddp", "train")) == 3
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    states = checkpoint["loader"]
    assert len(states) == 2 and states[0] != states[1], "each rank's stream position is saved"
    # The 2 ranks' shards are resharded over one process's 2 workers.
    resumed = run(["--synthetic-only", "--steps", "5", "--output-dir", "one", "--workers", "2", "--resume",
                   str(tmp_path / "ddp" / "checkpoint.pt"), "--allow-changed", "steps"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("processes changed: 2 ranks x 1 worker -> 1 rank x 2 workers; the stream's position resharded"
            in resumed.stdout), resumed.stdout
    assert [r["step"] for r in rows(tmp_path / "one", "train")] == [4, 5]
    after = find_stream_states(torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["loader"])
    assert sorted((s["shard_id"], s["shards"]) for s in after) == [(0, 2), (1, 2)]
    assert after[0]["plan"]["served"] == 3 * 2 * 4 and sum(s["served"] for s in after) == 2 * 4


@pytest.mark.slow
@pytest.mark.parametrize("source", ["--synthetic-only", "--real-only"])
def test_a_run_resumed_in_a_new_process_sees_the_batches_of_an_uninterrupted_one(tmp_path, small_voc, source):
    # The in-process resumes above share this process's caches and state with the run they resume;
    # here nothing is carried over but the checkpoint (the stream or the seeded real data, in a worker).
    flags = [source, "--steps", "4", "--checkpoint-every", "2", "--workers", "1", "--eval-root", str(small_voc)]
    if source == "--real-only":
        flags += ["--voc-root", str(small_voc)]
    whole = run([*flags, "--output-dir", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed = run([*flags, "--output-dir", "two", "--resume", str(tmp_path / "whole" / "checkpoint_000002.pt")], tmp_path)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "whole")[2:], rel=1e-4)


def forbid_building(trainer, monkeypatch):
    """Make the run fail loudly if it gets as far as the process group, the data or the model."""
    def too_late(*args, **kwargs):
        raise AssertionError("the run got as far as building things before the bad flag was refused")

    for builder in ("init_distributed", "default_voc_root", "build_model", "build_train_loader"):
        monkeypatch.setattr(trainer, builder, too_late)


def refusal(trainer, capsys, flags):
    """The error line ``train_deeplab.py FLAGS`` stops with, run in this process: exit status 2 and
    one line on stderr, as argparse refuses its own flags (which print their usage first)."""
    with pytest.raises(SystemExit) as refused:
        trainer.cli(flags)
    lines = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2, lines
    assert lines[-1].startswith("train_deeplab.py: error: "), lines
    assert len(lines) == 1 or lines[0].startswith("usage:"), lines
    return lines[-1]


def regular_file(tmp_path):
    """A file where a folder is expected, and beside it a FIFO named after it (``.fifo.json``)."""
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    if not (tmp_path / "notes.txt.fifo.json").exists():
        os.mkfifo(tmp_path / "notes.txt.fifo.json")
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--voc-root", "nowhere"], "--voc-root nowhere has no VOCdevkit/VOC2012 folder"),
        (["--backbone", "vgg"], "--backbone: unknown backbone 'vgg'"),
        (["--backbone-weights", "missing.safetensors"], "--backbone-weights missing.safetensors is not a file"),
        (["--classes-per-prompt", "0"], "classes_per_prompt must be >= 1, got 0"),
        (["--ignore-band", "0.7"], "ignore_band must be in [0, 0.5), got 0.7"),
        (["--ignore-band", "0.05", "--no-ignore-band"], "not allowed with argument --ignore-band"),
        (["--classes-per-prompt", "3", "1"], "classes_per_prompt must be (min, max) with min <= max, got (3, 1)"),
        (["--class-thresholds", "ring=0.5", "dragon=0.3"], "outside the label space: ['dragon']"),
        (["--class-thresholds", "ring"], "takes CLASS=γ items, got 'ring'"),
        (["--class-thresholds", "ring=1.5"], "threshold for 'ring' must be in (0, 1), got 1.5"),
        (["--class-thresholds", "ring=0.5", "--threshold-mode", "otsu"], "need threshold_mode 'fixed'"),
        (["--real-images", "4"], "--real-images picks real training images and cannot go with --synthetic-only"),
        (["--synthetic-length", "8"], "--synthetic-length sizes the synthetic part of a mixed run"),
        (["--prefetch-batches", "0"], "--prefetch-batches must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--threads", "1000000"], "--threads must be at most 1024, got 1000000"),
        (["--cache-size", "3"], "--cache-size 3 is less than the generation batch (4, --gen-batch-size)"),
        (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1.0"),
        (["--ema-decay", "nan"], "--ema-decay must be in [0, 1), got nan"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
        (["--lr=-1e-3"], "--lr must be a finite number > 0, got -0.001"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
        (["--weight-decay=-inf"], "--weight-decay must be a finite number >= 0, got -inf"),
        (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--workers", "1000000"], "--workers must be at most 256, got 1000000"),
        (["--eval-limit", "0"], "--eval-limit must be >= 1, got 0"),
        (["--eval-every", "-5"], "--eval-every must be >= 0, got -5"),
        (["--noise-cutoff", "0.5", "--noise-warmup", "-1"], "--noise-warmup must be >= 0, got -1"),
        (["--noise-cutoff", "0.5", "--noise-drop-fraction", "0"], "drop_fraction must be in (0, 1], got 0.0"),
        (["--device", "banana"], "--device: device 'banana' is not a torch device name"),
        (["--device", "cuda"], "--device: device 'cuda' is not available on this machine"),
        (["--device", "cpu", "--data-dir", "{file}/toyworld"], "--data-dir {file}/toyworld is under {file}, which is a file"),
        (["--data-dir", "{file}"], "--data-dir {file} is a file"),
        (["--crop-size", "100000"], "--crop-size must be at most 8192, got 100000"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        # flags that would do nothing with the others
        (["--allow-changed", "lr"], "--allow-changed accepts changed flags on --resume, and this run does not resume"),
        (["--noise-mode", "relabel"], "--noise-mode tunes noise learning, which is off without --noise-cutoff"),
        (["--noise-warmup", "10"], "--noise-warmup tunes noise learning, which is off without --noise-cutoff"),
        (["--augment", "basic", "--splice-fit", "whole"], "--splice-fit places the splices of --augment full"),
        (["--synthetic-ratio", "0.3"], "--synthetic-ratio sets the synthetic share of a mix, and --synthetic-only runs"),
        (["--classes", ""], "classes must hold non-empty strings, got '' in ['']"),
        (["--seed", str(2**64)], f"--seed must be at most {2**63 - 1} (2**63 - 1), got {2**64}"),
        (["--vocabulary", "{file}.fifo.json"], "{file}.fifo.json is a FIFO"),
    ],
)
def test_bad_flags_fail_early_and_clearly(tmp_path, monkeypatch, capsys, args, message):
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    file = regular_file(tmp_path)
    flags = [*FAST, "--synthetic-only", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"),
             *(arg.format(file=file) for arg in args)]
    assert message.format(file=file) in refusal(trainer, capsys, flags)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--synthetic-only", "--pseudo-images", "{images}"],
         "--pseudo-images adds pseudo-labelled images beside the real ones and --synthetic-only trains on the stream "
         "alone: drop --synthetic-only (a mix) or use --real-only"),
        (["--pseudo-tags", "{images}/tags.json"], "--pseudo-tags names the classes of the --pseudo-images images"),
        (["--pseudo-images", "{tmp}/nowhere"], "--pseudo-images: {tmp}/nowhere does not exist"),
        (["--pseudo-images", "{tmp}/empty"], "--pseudo-images: {tmp}/empty holds no image file (names ending in"),
        (["--pseudo-images", "{images}", "--pseudo-tags", "{tmp}/short.json"],
         "--pseudo-tags: {tmp}/short.json must hold one list of class names per image (5)"),
        (["--pseudo-images", "{images}", "--pseudo-tags", "{tmp}/dog.json"],
         "--pseudo-tags: {tmp}/dog.json: image 1 (b_gray.png) names 'dog', not in the label space; known classes: "
         "circle, square"),
        (["--classes", "circle", "square", "--pseudo-images", "{images}", "--pseudo-tags", "{tmp}/ring.json"],
         "--pseudo-tags: {tmp}/ring.json: image 0 (a_rgb.png) names 'ring', not among the classes labelled "
         "(circle, square)"),
        (["--pseudo-images", "{images}", "--pseudo-tags", "{tmp}/missing.json"],
         "--pseudo-tags: {tmp}/missing.json does not exist"),
        (["--pseudo-images", "{images}", "--pseudo-strength", "0"], "--pseudo-strength must be in (0, 1], got 0.0"),
    ],
)
def test_bad_pseudo_image_flags_fail_early_naming_the_value(tmp_path, monkeypatch, capsys, image_folder, flags, message):
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.json").write_text(json.dumps([["ring"]] * 4))
    (tmp_path / "dog.json").write_text(json.dumps({"a_rgb.png": ["ring"], "b_gray.png": ["dog"], "c_rgba.png": ["ring"],
                                                   "d_tall.jpg": ["ring"], "e_flat.png": ["ring"]}))
    (tmp_path / "ring.json").write_text(json.dumps([["ring"]] * 5))
    names = dict(tmp=tmp_path, images=image_folder)
    base = [*FAST, "--voc-root", fake_voc(tmp_path), "--data-dir", str(tmp_path / "data"),
            "--output-dir", str(tmp_path / "out")]
    assert message.format(**names) in refusal(trainer, capsys, [*base, *(flag.format(**names) for flag in flags)])


def test_noise_learning_needs_synthetic_labels(tmp_path, monkeypatch, capsys):
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    flags = [*FAST, "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")]
    assert refusal(trainer, capsys, [*flags, "--real-only", "--noise-cutoff", "0.5"]).endswith(
        "--noise-cutoff prunes synthetic labels and a --real-only run has none")


def test_unknown_class_fails_when_no_vocabulary_is_given(tmp_path, monkeypatch, capsys):
    # With the model preset's vocabulary a misspelt class is an error, not a new zero-shot class
    # (a class outside the preset's vocabulary is free text only with --vocabulary).
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    flags = ["--model", "toy", "--synthetic-only", "--classes", "dragon", "--data-dir", str(tmp_path / "data"),
             "--output-dir", str(tmp_path / "out")]
    assert "unknown class 'dragon'" in refusal(trainer, capsys, flags)


@pytest.mark.parametrize("flags", [["--eval-root", "{real}"], [], ["--vocabulary", "voc"]],
                         ids=["eval-root", "eval-root-defaults-to-voc-root", "other-label-space"])
def test_a_data_dir_that_is_only_read_may_be_anywhere(tmp_path, monkeypatch, flags):
    # Real data named for training and evaluation (--eval-root defaults to --voc-root): --data-dir
    # is never written, so it is not checked, and ToyWorld's label space is not needed.
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    write_voc(tmp_path / "real", n_train=4, n_val=1, image_size=16)
    args = trainer.get_args_parser().parse_args([
        *FAST, "--voc-root", str(tmp_path / "real"), *(flag.format(real=tmp_path / "real") for flag in flags),
        "--data-dir", str(regular_file(tmp_path) / "toyworld"), "--output-dir", str(tmp_path / "out")])
    with pytest.raises(AssertionError, match="got as far as building"):
        trainer.main(args)


def test_a_flag_error_is_one_line_and_exit_status_2_from_the_command_line(tmp_path):
    done = run(["--synthetic-only", "--lr", "inf"], tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr == "train_deeplab.py: error: --lr must be a finite number > 0, got inf\n"


def recorded_checkpoint(trainer, tmp_path, flags, ema=False):
    """A checkpoint as a run with ``flags`` records them, holding only what the resume check reads: the
    flags (``--voc-root`` set to the ToyWorld folder when none is given, as the run does) and the
    classifier's shape."""
    args = trainer.get_args_parser().parse_args(flags)
    config, args.classes = trainer.generator_config(args)
    if trainer.uses_toyworld(args):
        args.voc_root = args.voc_root or args.data_dir
        args.eval_root = args.eval_root or args.voc_root
    state = {"model": {trainer.CLASSIFIER_WEIGHT: torch.zeros(len(config.label_space), 256, 1, 1)}, "optimizer": {},
             "scheduler": {}, "step": 2, "epoch": 0, "loader": [{}], "rng": torch.get_rng_state(),
             "args": trainer.saved_args(args)}
    if ema:
        state["ema"] = {}
    path = tmp_path / "recorded.pt"
    torch.save(state, path)
    return path


def resume_flags(tmp_path, *flags):
    """FAST synthetic-only flags of a run in ``tmp_path``, then ``flags``."""
    return [*FAST, "--synthetic-only", "--workers", "1", "--data-dir", str(tmp_path / "data"),
            "--output-dir", str(tmp_path / "out"), *flags]


def fake_voc(tmp_path):
    """A folder that passes the trainer's VOC-folder check (nothing is read from it before building)."""
    (tmp_path / "voc" / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    return str(tmp_path / "voc")


@pytest.mark.parametrize(
    "flags, changed",
    [
        (["--seed", "1"], "--seed 0 -> 1"),
        (["--batch-size", "8"], "--batch-size 4 -> 8"),
        (["--gen-batch-size", "2"], "--gen-batch-size unset -> 2"),
        (["--backbone", "resnet50"], "--backbone mobilenet_v3_large -> resnet50"),
        (["--reuse", "2"], "--reuse 8 -> 2"),
        (["--cache-size", "8"], "--cache-size 64 -> 8"),
        (["--augment", "basic"], "--augment full -> basic"),
        (["--crop-size", "32"], "--crop-size 64 -> 32"),
        (["--gen-steps", "3"], "--gen-steps 2 -> 3"),
        (["--guidance", "3"], "--guidance unset -> 3.0"),
        (["--image-size", "32"], "--image-size unset -> [32]"),
        (["--threshold", "0.3", "--no-ignore-band"], "--threshold unset -> 0.3, --no-ignore-band False -> True"),
        (["--model", "toy"], "--model random-weights -> toy"),
        (["--classes", "circle", "ring"],
         "--classes ['circle', 'square', 'triangle', 'ring', 'cross'] -> ['circle', 'ring']"),
        (["--voc-root", "{voc}"], "--voc-root ToyWorld -> {voc}"),
        (["--vocabulary", "voc", "--eval-root", "{voc}"],
         "--vocabulary toy -> voc, --classes ['circle', 'square', 'triangle', 'ring', 'cross'] -> ['aeroplane', "),
        (["--vocabulary", "voc", "--eval-root", "{voc}"], "the label space (--model, --vocabulary, --classes) 6 -> 21 classes"),
        (["--seed", "1", "--allow-changed", "lr"], "--seed 0 -> 1;"),
        (["--lr", "1e-3"], "--lr 0.002 -> 0.001; resume with the checkpoint's values or accept --lr with --allow-changed"),
        (["--steps", "9"], "--steps 1200 -> 9; resume with the checkpoint's values or accept --steps with --allow-changed"),
        (["--noise-cutoff", "0.5", "--weight-decay", "0", "--allow-changed", "weight-decay"],
         "--noise-cutoff unset -> 0.5; resume with the checkpoint's values or accept --noise-cutoff with --allow-changed"),
    ],
)
def test_resume_refuses_another_run_naming_each_changed_flag_before_building(tmp_path, monkeypatch, capsys, flags, changed):
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    checkpoint = recorded_checkpoint(trainer, tmp_path, resume_flags(tmp_path))
    voc = fake_voc(tmp_path)
    flags = [flag.format(voc=voc) for flag in flags]
    error = refusal(trainer, capsys, resume_flags(tmp_path, "--resume", str(checkpoint), *flags))
    assert f"--resume {checkpoint} continues a run with other flags: " in error
    assert changed.format(voc=voc) in error, error


def test_resume_refuses_the_real_only_source_and_a_flag_allow_changed_never_accepts(tmp_path, monkeypatch, capsys):
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    checkpoint = recorded_checkpoint(trainer, tmp_path, resume_flags(tmp_path))
    flags = resume_flags(tmp_path, "--resume", str(checkpoint))
    flags.remove("--synthetic-only")
    assert "--synthetic-only True -> False, --real-only False -> True;" in refusal(trainer, capsys, [*flags, "--real-only"])
    assert "argument --allow-changed: invalid choice: 'seed'" in refusal(
        trainer, capsys, [*flags, "--seed", "1", "--allow-changed", "seed"])


def test_resume_refuses_another_folder_of_pseudo_labelled_images(tmp_path, monkeypatch, capsys, image_folder):
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    other = shutil.copytree(image_folder, tmp_path / "other")
    flags = [*FAST, "--real-only", "--voc-root", fake_voc(tmp_path), "--data-dir", str(tmp_path / "data"),
             "--output-dir", str(tmp_path / "out")]
    checkpoint = recorded_checkpoint(trainer, tmp_path, [*flags, "--pseudo-images", str(image_folder)])
    error = refusal(trainer, capsys, [*flags, "--resume", str(checkpoint), "--pseudo-images", str(other),
                                      "--pseudo-tags", str(other / "tags.json")])
    assert re.search(rf"--pseudo-images {image_folder} \(sha256:\w+\) -> {other} \(sha256:\w+\), "
                     rf"--pseudo-tags unset -> {other / 'tags.json'} \(sha256:\w+\);", error), error


def test_resume_lets_flags_that_keep_the_run_change(tmp_path, monkeypatch):
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    checkpoint = recorded_checkpoint(trainer, tmp_path, resume_flags(tmp_path, "--ema-decay", "0.5"), ema=True)
    args = trainer.get_args_parser().parse_args(resume_flags(
        tmp_path, "--resume", str(checkpoint), "--steps", "9", "--checkpoint-every", "3", "--eval-every", "3",
        "--eval-limit", "2", "--eval-root", fake_voc(tmp_path), "--threads", "2", "--device", "cpu",
        "--prefetch-batches", "5", "--workers", "0", "--lr", "1e-3", "--ema-decay", "0.9", "--noise-cutoff", "0.5",
        "--allow-changed", "lr", "steps", "ema-decay", "noise-cutoff"))
    args.data_dir = args.output_dir = tmp_path / "elsewhere"
    config, args.classes = trainer.generator_config(args)
    accepted = trainer.check_resume_args(torch.load(checkpoint, weights_only=True), args, config.label_space)
    assert accepted == {"lr": ("0.002", "0.001"), "steps": ("1200", "9"), "ema_decay": ("0.5", "0.9"),
                        "noise_cutoff": ("unset", "0.5")}
    with pytest.raises(AssertionError, match="got as far as building"):
        trainer.main(args)


def test_a_checkpoint_without_a_record_of_some_flags_is_compared_on_the_others(tmp_path, monkeypatch):
    trainer = load_trainer(monkeypatch)
    checkpoint = torch.load(recorded_checkpoint(trainer, tmp_path, resume_flags(tmp_path)), weights_only=True)
    del checkpoint["args"]["reuse"], checkpoint["args"]["seed"]
    args = trainer.get_args_parser().parse_args(resume_flags(tmp_path, "--reuse", "2", "--seed", "3"))
    config, args.classes = trainer.generator_config(args)
    assert trainer.check_resume_args(checkpoint, args, config.label_space) == {}
    assert trainer.unrecorded_flags(checkpoint, args) == ["--reuse", "--seed"]
    args.batch_size = 8
    with pytest.raises(SystemExit, match="other flags: --batch-size 4 -> 8;"):
        trainer.check_resume_args(checkpoint, args, config.label_space)


def test_a_checkpoint_recording_no_worker_count_or_no_real_data_is_not_misread(tmp_path, monkeypatch):
    trainer = load_trainer(monkeypatch)
    saved = torch.load(recorded_checkpoint(trainer, tmp_path, resume_flags(tmp_path)), weights_only=True)
    args = trainer.get_args_parser().parse_args(resume_flags(tmp_path, "--voc-root", fake_voc(tmp_path)))
    config, args.classes = trainer.generator_config(args)
    for workers in ("abc", "-3"):  # the loader states are laid out by it: a traceback, or "-3 workers -> 1"
        checkpoint = copy.deepcopy(saved)
        checkpoint["args"]["workers"] = workers
        with pytest.raises(SystemExit, match=f"its args record --workers '{workers}', not a number of DataLoader workers"):
            trainer.check_resume_args(checkpoint, args, config.label_space)
    # No record of --voc-root is not a record of ToyWorld (a refusal naming a change nobody made).
    del saved["args"]["voc_root"]
    assert trainer.check_resume_args(saved, args, config.label_space) == {}
    assert "--voc-root" in trainer.unrecorded_flags(saved, args)


def test_resume_flag_lists_name_real_flags_and_keep_what_picks_the_samples_compared(monkeypatch):
    trainer = load_trainer(monkeypatch)
    parser_keys = set(vars(trainer.get_args_parser().parse_args([])))
    compared = parser_keys - set(trainer.RESUME_FREE)
    assert set(trainer.RESUME_FREE) <= parser_keys and set(trainer.RESUME_ALLOWABLE) <= compared
    never = {"seed", "batch_size", "gen_batch_size", "backbone", "from_export", "synthetic_only", "real_only", "voc_root",
             "synthetic_ratio", "real_images", "synthetic_length", "model", "vocabulary", "classes", "image_size",
             "gen_steps", "guidance", "threshold", "reuse", "cache_size", "augment", "crop_size", "pseudo_label_rest",
             "pseudo_images", "pseudo_tags", "pseudo_strength"}
    assert never <= compared - set(trainer.RESUME_ALLOWABLE)


def test_an_accepted_lr_and_weight_decay_change_is_applied_printed_and_logged(synthetic_run, tmp_path, monkeypatch):
    trainer = load_trainer(monkeypatch)
    whole, checkpoint = synthetic_run.root / "whole", synthetic_run.root / "whole" / "checkpoint_000002.pt"
    _, printed = train_in_process(trainer, [
        *synthetic_run.flags, "--output-dir", str(tmp_path / "resumed"), "--lr", "1e-3", "--weight-decay", "0.01",
        "--resume", str(checkpoint), "--allow-changed", "lr", "weight-decay"])
    assert "changed (--allow-changed): --lr 0.002 -> 0.001; --weight-decay 0.0001 -> 0.01" in printed
    assert rows(tmp_path / "resumed", "resume") == [{
        "event": "resume", "step": 2, "checkpoint": str(checkpoint),
        "changed": "--lr 0.002 -> 0.001; --weight-decay 0.0001 -> 0.01"}]
    # The schedule goes on from where it was, on the new base rate.
    rates = [row["lr"] for row in rows(whole, "train")]
    assert [row["lr"] for row in rows(tmp_path / "resumed", "train")] == pytest.approx([r / 2 for r in rates[2:]])
    group = torch.load(tmp_path / "resumed" / "checkpoint_000004.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == 1e-3 and group["weight_decay"] == 0.01


def polynomial_rate(step, steps, lr=2e-3):
    """The rate after ``step`` steps of a run of ``steps`` (the trainer's decay, power 0.9)."""
    return lr * (1 - step / steps) ** 0.9


def test_a_finished_run_resumed_with_more_steps_trains_on_at_a_rate_decaying_to_the_new_end(
        synthetic_run, tmp_path, monkeypatch):
    # Resumed from its last checkpoint, where the rate has decayed to 0, with --steps 6: the rate
    # of steps 5 and 6 is the one a 6-step run has there, and the weights move again.
    trainer = load_trainer(monkeypatch)
    end = synthetic_run.root / "whole" / "checkpoint_000004.pt"
    flags = [*synthetic_run.flags, "--steps", "6", "--output-dir", str(tmp_path / "longer"), "--resume", str(end)]
    _, printed = train_in_process(trainer, [*flags, "--allow-changed", "steps"])
    assert "changed (--allow-changed): --steps 4 -> 6" in printed
    trained = rows(tmp_path / "longer", "train")
    assert [row["step"] for row in trained] == [5, 6]
    assert [row["lr"] for row in trained] == pytest.approx([polynomial_rate(5, 6), 0.0])
    before = torch.load(end, weights_only=True)["model"]
    after = torch.load(tmp_path / "longer" / "checkpoint_000006.pt", weights_only=True)["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before if "running_" not in k and "num_batches" not in k)
    assert torch.load(tmp_path / "longer" / "checkpoint.pt", weights_only=True)["scheduler"]["total_iters"] == 6


def test_the_rate_decay_is_retargeted_to_the_resumed_runs_steps(monkeypatch):
    # The schedule a checkpoint holds, continued with another --steps (and a new --lr), against the
    # closed form of a run started with those flags. A checkpoint with no record of --steps (no
    # change accepted) is re-targeted all the same: its schedule's own length is what is compared.
    trainer = load_trainer(monkeypatch)

    def schedule(steps, lr=2e-3, state=None):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=steps, power=trainer.LR_POWER)
        if state is not None:
            optimizer.load_state_dict(state[0])
            scheduler.load_state_dict(state[1])
        return optimizer, scheduler

    optimizer, scheduler = schedule(4)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    saved = (optimizer.state_dict(), scheduler.state_dict())
    for steps, flags, changes in [(8, [], {"steps": ("4", "8")}), (3, [], {"steps": ("4", "3")}),
                                  (8, ["--lr", "1e-3"], {"steps": ("4", "8"), "lr": ("0.002", "0.001")}),
                                  (6, [], {}), (4, [], {})]:
        args = trainer.get_args_parser().parse_args(["--steps", str(steps), *flags])
        optimizer, scheduler = schedule(4, state=saved)
        trainer.apply_allowed_changes(changes, optimizer, scheduler, args)
        rates = []
        for _ in range(2, steps):
            optimizer.step()
            scheduler.step()
            rates.append(scheduler.get_last_lr()[0])
        assert rates == pytest.approx([polynomial_rate(step, steps, args.lr) for step in range(3, steps + 1)]), (steps, flags)
        assert rates[-1] == 0.0


def test_resume_refuses_steps_that_end_before_the_checkpoint(tmp_path, monkeypatch, capsys):
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    checkpoint = recorded_checkpoint(trainer, tmp_path, resume_flags(tmp_path))
    error = refusal(trainer, capsys, resume_flags(tmp_path, "--resume", str(checkpoint), "--steps", "1",
                                                  "--allow-changed", "steps"))
    assert error.endswith(f"--steps 1 ends before step 2, where --resume {checkpoint} continues"), error


def finite(state):
    return all(bool(torch.isfinite(value).all()) for value in state.values() if value.is_floating_point())


def test_a_diverging_run_stops_keeping_the_last_good_checkpoint(tmp_path, monkeypatch, small_voc):
    # A huge rate: step 1's loss is finite and its weights huge but finite; step 2's loss is NaN.
    trainer = load_trainer(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        train_in_process(trainer, synthetic_flags(tmp_path, small_voc, "--lr", "1e30", "--steps", "4",
                                                  "--checkpoint-every", "1", "--output-dir", "diverged"))
    assert str(stopped.value) == (
        "error: the loss is nan at step 2 (1 non-finite in a row; --max-nonfinite-steps 0); the run stopped, "
        "keeping the last good checkpoint (diverged/checkpoint.pt)")
    kept = torch.load(tmp_path / "diverged" / "checkpoint.pt", weights_only=True)
    assert kept["step"] == 1 and finite(kept["model"])
    assert not (tmp_path / "diverged" / "checkpoint_000002.pt").exists()
    assert [r["step"] for r in rows(tmp_path / "diverged", "nonfinite_loss")] == [2]
    assert not rows(tmp_path / "diverged", "final")


def in_process_run_flags(tmp_path, small_voc, *flags):
    """A tiny synthetic-only run in this process, checkpointed every step into ``tmp_path/out``."""
    return synthetic_flags(tmp_path, small_voc, "--checkpoint-every", "1", "--output-dir", str(tmp_path / "out"), *flags)


def test_nonfinite_losses_are_skipped_up_to_the_patience_then_stop_the_run(tmp_path, monkeypatch, capsys, small_voc):
    trainer = load_trainer(monkeypatch)
    calls = []
    forward = torch.nn.CrossEntropyLoss.forward

    def nan_at_steps_2_4_5(self, logits, masks):
        calls.append(None)
        loss = forward(self, logits, masks)
        return loss * float("nan") if len(calls) in (2, 4, 5) else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", nan_at_steps_2_4_5)
    with pytest.raises(SystemExit) as stopped:
        trainer.cli(in_process_run_flags(tmp_path, small_voc, "--steps", "6", "--max-nonfinite-steps", "1"))
    assert str(stopped.value) == ("error: the loss is nan at step 5 (2 non-finite in a row; --max-nonfinite-steps 1); "
                                  f"the run stopped, keeping the last good checkpoint ({tmp_path / 'out' / 'checkpoint.pt'})")
    assert "warning: the loss is nan at step 2; the step is skipped" in capsys.readouterr().err
    out = tmp_path / "out"
    assert [(r["step"], r["in_a_row"]) for r in rows(out, "nonfinite_loss")] == [(2, 1), (4, 1), (5, 2)]
    saved = {step: torch.load(out / f"checkpoint_{step:06d}.pt", weights_only=True) for step in range(1, 5)}
    assert not (out / "checkpoint_000005.pt").exists() and torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    weights = {step: {k: v for k, v in s["model"].items() if "running_" not in k and "num_batches" not in k}
               for step, s in saved.items()}

    def same(a, b):
        return all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])

    assert same(1, 2) and not same(2, 3) and same(3, 4), "a skipped step leaves the weights as they were"
    assert all(finite(s["model"]) for s in saved.values())


def test_weights_that_are_not_finite_stop_the_run_before_they_are_saved(tmp_path, monkeypatch, small_voc):
    trainer = load_trainer(monkeypatch)
    optimizer_step = torch.optim.AdamW.step

    def overflow_at_step_2(self, *args, **kwargs):
        result = optimizer_step(self, *args, **kwargs)
        if self.state_dict()["state"][0]["step"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflow_at_step_2)
    with pytest.raises(SystemExit) as stopped:
        trainer.cli(in_process_run_flags(tmp_path, small_voc, "--steps", "3", "--ema-decay", "0.5"))
    out = tmp_path / "out"
    assert str(stopped.value) == (
        "error: the weights are not finite at step 2 (backbone.0.0.weight, averaged module.backbone.0.0.weight); "
        f"no checkpoint was written for it; the run stopped, keeping the last good checkpoint ({out / 'checkpoint.pt'})")
    kept = torch.load(out / "checkpoint.pt", weights_only=True)
    assert kept["step"] == 1 and finite(kept["model"]) and finite({k: v for k, v in kept["ema"].items()})
    assert not (out / "checkpoint_000002.pt").exists()


def test_nonfinite_tensors_names_each_one_holding_nan_or_inf(monkeypatch):
    trainer = load_trainer(monkeypatch)
    state = {"a": torch.zeros(3), "b": torch.tensor([0.0, float("-inf")]), "c": torch.tensor([float("nan")]),
             "steps": torch.tensor(4), "n": 2}
    assert trainer.nonfinite_tensors(state) == ["b", "c"]


def truncated_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "step": 2}, path)
    path.write_bytes(path.read_bytes()[:1500])
    return path


def backbone_weights(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save({"features.0.0.weight": torch.zeros(16, 3, 3, 3)}, path)
    return path


@pytest.mark.parametrize(
    "flag, make, message",
    [
        ("--resume", lambda tmp: tmp / "missing.pt", "--resume: checkpoint {path} does not exist"),
        ("--resume", truncated_checkpoint, "--resume: checkpoint {path} is truncated, corrupt or not a PyTorch file"),
        ("--resume", backbone_weights, "--resume: {path} is not a train_deeplab.py checkpoint: it lacks model"),
        ("--output-dir", regular_file, "--output-dir {path} is a file"),
        ("--output-dir", lambda tmp: regular_file(tmp) / "run", "--output-dir {path} is under {path.parent}, which is a file"),
        ("--checkpoint-every", lambda tmp: 0, "--checkpoint-every must be >= 1, got 0"),
    ],
    ids=["resume-missing", "resume-truncated", "resume-foreign", "output-is-file", "output-under-file", "checkpoint-every-0"],
)
def test_bad_resume_or_output_dir_fails_before_the_model_and_data_are_built(tmp_path, monkeypatch, flag, make, message):
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    path = make(tmp_path)
    args = trainer.get_args_parser().parse_args([*FAST, "--synthetic-only", "--data-dir", str(tmp_path / "data"),
                                                 "--output-dir", str(tmp_path / "out"), flag, str(path)])
    with pytest.raises(SystemExit) as refused:
        trainer.main(args)
    assert refused.value.code == 2 and str(refused.value).startswith(message.format(path=path)), str(refused.value)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE is POSIX")
def test_a_disk_too_full_for_checkpoints_warns_then_stops_clearly_keeping_the_previous_one(tmp_path, small_voc):
    # A file-size limit makes every write past 1 MB fail (EFBIG), as a nearly full disk does: the
    # metrics fit, a checkpoint does not. In a subprocess: the limit is the process's.
    out = tmp_path / "full"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"the previous good checkpoint")
    done = run(["--synthetic-only", "--steps", "2", "--checkpoint-every", "1", "--output-dir", "full", "--workers", "0",
                "--eval-root", str(small_voc)], tmp_path, max_file_bytes=1 << 20)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # Step 1: a warning naming the file and the cause, and training goes on.
    assert ("warning: could not write checkpoint full/checkpoint_000001.pt: [Errno 27] File too large; "
            "training continues") in done.stderr, done.stderr[-3000:]
    assert [r["step"] for r in rows(out, "checkpoint_failed")] == [1]
    assert [r["step"] for r in rows(out, "train")] == [1, 2]
    # The last step: nothing after it retries, so the run stops with an error naming the file.
    assert "error: could not write checkpoint full/checkpoint_000002.pt: [Errno 27] File too large" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "generator_config.json", "metrics.csv",
                                                     "metrics.jsonl"], "no partial .tmp is left"
    assert (out / "checkpoint.pt").read_bytes() == b"the previous good checkpoint"


def help_entries(text):
    """``{first flag: its help, whitespace collapsed}`` for every option in argparse help output."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line
        else:
            current = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def test_help_documents_every_flag_and_each_default_once(monkeypatch, capsys):
    trainer = load_trainer(monkeypatch)
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as done:
        trainer.cli(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    entries = help_entries(text)
    for flag in ("--synthetic-only", "--voc-root", "--eval-root", "--synthetic-ratio", "--backbone",
                 "--backbone-weights", "--resume", "--reuse", "--workers", "--vocabulary", "--gen-steps",
                 "--gen-batch-size", "--threshold", "--print-config"):
        assert flag in entries, flag
    assert "--label-space" in entries["--vocabulary"], "the old flag name still works"
    assert "(default: None)" not in text and "(default: False)" not in text
    twice = {flag: entry for flag, entry in entries.items() if entry.lower().count("default") > 1}
    assert not twice, twice
    # Flags with a value of their own say it; generator flags say where an unset value comes from.
    for flag in ("--steps", "--reuse", "--crop-size", "--lr", "--gen-steps", "--threshold", "--vocabulary"):
        assert "default" in entries[flag].lower(), entries[flag]


def test_online_noise_learning_counts_dropped_samples(tmp_path, monkeypatch, small_voc):
    # A plain cutoff (drop fraction 1): the random tiny model scores most regions alike, and ties
    # with the class quantile are kept by design (tested in test_noise.py).
    trainer = load_trainer(monkeypatch)
    train_in_process(trainer, synthetic_flags(tmp_path, small_voc, "--steps", "3", "--noise-cutoff", "0.99", "--noise-warmup",
                                              "1", "--noise-drop-fraction", "1", "--output-dir", str(tmp_path / "noise")))
    counts = rows(tmp_path / "noise", "final")[0]["noise_filter"]
    # Two steps after warm-up, 4 samples each, at least one class region per sample.
    assert counts["scored"] >= 8 and counts["dropped"] >= 1
    assert sum(counts["per_class"].values()) == counts["dropped"] and set(counts["per_class"]) <= set(TOY_CLASSES)


def test_noise_learning_in_a_mixed_run_prunes_synthetic_labels_only(tmp_path, monkeypatch, small_voc):
    # In process, to see what the filter is handed: per batch, which samples are synthetic.
    trainer = load_trainer(monkeypatch)
    seen = []
    filter_call = trainer.LabelNoiseFilter.__call__

    def recording(self, step, logits, masks, prunable=None):
        kept = filter_call(self, step, logits, masks, prunable)
        seen.append((prunable, masks, kept))
        return kept

    monkeypatch.setattr(trainer.LabelNoiseFilter, "__call__", recording)
    args = trainer.get_args_parser().parse_args([
        *FAST, "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"), "--voc-root", str(small_voc),
        "--real-images", "4", "--synthetic-length", "8", "--synthetic-ratio", "0.5", "--steps", "6", "--workers", "0",
        "--noise-cutoff", "0.99", "--noise-warmup", "0", "--noise-drop-fraction", "1"])
    trainer.main(args)
    assert len(seen) == 6
    flags = torch.cat([prunable for prunable, _, _ in seen])
    assert flags.dtype == torch.bool and flags.any() and not flags.all(), "every batch alike: no sample flagged by source"
    for prunable, masks, kept in seen:
        assert torch.equal(kept[~prunable], masks[~prunable]), "a real label was pruned"
    pruned = sum(int((kept != masks).any()) for _, masks, kept in seen)
    counts = rows(tmp_path / "out", "final")[0]["noise_filter"]
    assert pruned >= 1 and counts["dropped"] >= 1


def test_generator_flags_override_only_their_fields_of_the_preset(monkeypatch, capsys):
    preset = resolve_config("toy")
    config = printed_config(load_trainer(monkeypatch), capsys, "--vocabulary", "toy", "--classes-per-prompt", "1", "--threshold", "0.3",
                            "--threshold-mode", "fixed", "--class-thresholds", "ring=0.56", "circle=0.3")
    assert config["generator"]["classes_per_prompt"] == 1
    assert config["mask"]["class_thresholds"] == {"ring": 0.56, "circle": 0.3}
    assert config["mask"]["threshold_mode"] == "fixed" and config["mask"]["threshold"] == 0.3
    # Every field no flag names stays the toy preset's (not the library's defaults).
    assert {int(k): v for k, v in config["mask"]["resolution_weights"].items()} == preset.mask.resolution_weights
    assert tuple(config["mask"]["timestep_window"]) == preset.mask.timestep_window
    assert config["generator"]["num_inference_steps"] == preset.generator.num_inference_steps
    assert config["image_size"] == list(preset.image_size)
    assert config["label_space"] == list(TOY_CLASSES)


@pytest.mark.parametrize("vocabulary", ["voc", "cityscapes", "ade20k"])
def test_vocabulary_accepts_each_builtin(monkeypatch, capsys, vocabulary):
    config = printed_config(load_trainer(monkeypatch), capsys, "--vocabulary", vocabulary)
    assert config["label_space"] == list(load_vocabulary(vocabulary).label_space)
    assert config["vocabulary"]["name"] == vocabulary
    # Nothing but the vocabulary was asked for: the rest is the toy preset's.
    preset = resolve_config("toy")
    assert config["generator"]["classes_per_prompt"] == preset.generator.classes_per_prompt == 2
    assert config["mask"]["class_thresholds"] == {}


def test_vocabulary_reads_a_user_file_and_label_space_is_its_old_name(tmp_path, monkeypatch, capsys):
    trainer = load_trainer(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pets.json").write_text(json.dumps({"classes": ["background", "cat", "dog"],
                                                    "templates": ["a photo of a {class}"]}))
    config = printed_config(trainer, capsys, "--label-space", "pets.json", "--model", "random-weights",
                            "--classes-per-prompt", "3", "--classes", "dog", "hamster")
    # A class the file lacks joins as free text (zero-shot), after the file's own classes.
    assert config["label_space"] == ["background", "cat", "dog", "hamster"]
    assert config["vocabulary"]["name"] == "pets" and config["vocabulary"]["templates"] == ["a photo of a {class}"]
    assert config["generator"]["classes_per_prompt"] == 3
    ranged = printed_config(trainer, capsys, "--label-space", "pets.json", "--model", "random-weights",
                            "--classes-per-prompt", "1", "3")
    assert ranged["generator"]["classes_per_prompt"] == [1, 3]


def test_the_segmenter_skips_dilated_taps_that_read_padding_only(monkeypatch):
    trainer = load_trainer(monkeypatch)
    args = trainer.get_args_parser().parse_args([])
    model = trainer.build_model(args, 6)
    cropped = [m for m in model.modules() if type(m).__name__ == "TapCroppedConv2d"]
    assert len(cropped) == 6  # the ASPP's three branches and MobileNetV3's three dilated convs


def test_a_checkpoint_whose_loader_states_were_tampered_is_refused_naming_them(synthetic_run, tmp_path, monkeypatch,
                                                                               capsys):
    from ondemand_seg.data.stream import find_stream_states

    trainer = load_trainer(monkeypatch)
    saved = torch.load(synthetic_run.root / "whole" / "checkpoint_000002.pt", weights_only=True)

    def served_negative(checkpoint):
        find_stream_states(checkpoint["loader"])[0]["served"] = -7

    def state_removed(checkpoint):  # the worker would start from the beginning, serving its samples again
        state = find_stream_states(checkpoint["loader"])[0]
        for key in ("served", "plan", "fingerprint"):
            state.pop(key)

    def loader_a_string(checkpoint):  # an AssertionError inside torchdata before
        checkpoint["loader"] = "x"

    for tamper, message in [(served_negative, "stream state's served must be >= 0, got -7"),
                            (state_removed, r"rank 0's loader state holds 0 stream state\(s\), not one per worker \(1\)"),
                            (loader_a_string, "its 'loader' must hold one DataLoader state per rank, got str")]:
        checkpoint = copy.deepcopy(saved)
        tamper(checkpoint)
        path = tmp_path / f"{tamper.__name__}.pt"
        torch.save(checkpoint, path)
        error = refusal(trainer, capsys, [*synthetic_run.flags, "--output-dir", str(tmp_path / tamper.__name__),
                                          "--resume", str(path)])
        assert re.search(f"--resume {re.escape(str(path))}: {message}", error), error


def test_pseudo_labelling_flags_are_checked_before_building(exported_run, tmp_path, monkeypatch, capsys, small_voc):
    trainer = load_trainer(monkeypatch)
    forbid_building(trainer, monkeypatch)
    real = ["--voc-root", str(small_voc), "--real-images", "4", "--workers", "0", "--output-dir", str(tmp_path / "out")]
    assert refusal(trainer, capsys, [*FAST, *real, "--real-only", "--pseudo-label-rest", "--pseudo-strength", "0.01"]
                   ).endswith("--pseudo-strength: strength [0.01] starts no step of a 50-step schedule "
                              "(num_inference_steps); use at least 0.02 or more num_inference_steps")
    assert "without either it does nothing" in refusal(
        trainer, capsys, [*FAST, *real, "--real-only", "--pseudo-strength", "0.5"])
    pixart = save_tiny_pipeline(tmp_path / "pixart", "pixart")
    capsys.readouterr()
    assert refusal(trainer, capsys, ["--model", str(pixart), "--vocabulary", "toy", *real, "--real-only",
                                     "--pseudo-label-rest"]).endswith(
        "--pseudo-label-rest: labelling real images needs an image-to-image pipeline, and diffusers has none for "
        "PixArt-α/Σ; supported: Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 and Flux")
    # With --from-export the export's model labels (its settings are that model's), so it must be here as it was.
    other = tmp_path / "other-weights"
    shutil.copytree(exported_run / "voc", other)
    metadata = json.loads((other / "metadata.json").read_text())
    metadata["plan"]["model"] = "folder:0123"
    (other / "metadata.json").write_text(json.dumps(metadata))
    assert refusal(trainer, capsys, reading_flags(exported_run, *real, "--pseudo-label-rest", "--from-export",
                                                  str(other))).endswith(
        f"--pseudo-label-rest labels with the model --from-export {other} was generated with ('random-weights'), and "
        "it is not here with the same weights; drop --pseudo-label-rest or train with that model generating live "
        "(--model)")
    assert trainer.labelling_model(trainer.get_args_parser().parse_args(
        ["--from-export", str(exported_run / "voc")])) == "random-weights"
    # Every train image taken by --real-images leaves none to pseudo-label: refused before the labeller is used.
    args = trainer.get_args_parser().parse_args([*FAST, *real[:2], "--real-only", "--real-images", "12",
                                                 "--pseudo-label-rest"])
    config, args.classes = trainer.generator_config(args)
    with pytest.raises(SystemExit, match=r"no train image left to pseudo-label \(--real-images 12 of 12"):
        trainer.pseudo_labelled_rest(args, config, labeler=None)


def test_a_worker_state_saved_under_other_settings_is_refused_before_the_workers_start(exported_run, tmp_path,
                                                                                      monkeypatch, capsys):
    # A checkpoint from before the range gate: its states' fingerprints lack the gate's newer fields.
    trainer = load_trainer(monkeypatch)
    flags = reading_flags(exported_run, "--synthetic-only", "--from-export", str(exported_run / "voc"), "--workers", "1",
                          "--checkpoint-every", "2")
    train_in_process(trainer, [*flags, "--steps", "2", "--output-dir", str(tmp_path / "first")])
    checkpoint = torch.load(tmp_path / "first" / "checkpoint.pt", weights_only=True)
    from ondemand_seg.data.stream import find_stream_states

    for state in find_stream_states(checkpoint["loader"]):
        del state["fingerprint"]["export"]["quality"]["range_margin"]
    torch.save(checkpoint, tmp_path / "old.pt")
    capsys.readouterr()
    error = refusal(trainer, capsys, [*flags, "--steps", "4", "--allow-changed", "steps", "--resume",
                                      str(tmp_path / "old.pt"), "--output-dir", str(tmp_path / "resumed")])
    assert error.endswith("stream state was saved under other settings, so resuming would not continue its sample "
                          "sequence: export.quality.range_margin: None -> 0.25 (saved -> now); resume with the settings "
                          "it was saved with"), error


def test_an_export_pass_smaller_than_a_batch_is_an_error_not_an_endless_loop(exported_run, tmp_path, monkeypatch,
                                                                             capsys):
    trainer = load_trainer(monkeypatch)
    # 12 samples served once make no batch of 16: every pass would end without a step, forever.
    with pytest.raises(SystemExit) as stopped:
        trainer.cli(reading_flags(exported_run, "--synthetic-only", "--from-export", str(exported_run / "hf"), "--reuse",
                                  "1", "--batch-size", "16", "--steps", "2", "--output-dir", str(tmp_path / "out")))
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar, as the data shows it only then
    assert stopped.value.code == 2
    assert error.endswith("a pass over the training data served no full batch of --batch-size 16 (it would be "
                          f"repeated forever without a step): ExportSource('{exported_run / 'hf'}': hf, samples 0 to 11, "
                          "seed 0) holds 12 samples, each served --reuse 1 times, split over 1 rank x 0 workers in "
                          "whole generation blocks, and each worker leaves out its last partial batch; lower "
                          "--batch-size or --workers, or raise --reuse"), error


def test_resume_refuses_pseudo_images_or_tags_edited_in_place(tmp_path, monkeypatch, image_folder):
    # Same paths, other content: the pseudo-masks of the resumed run would differ from the first's.
    trainer = load_trainer(monkeypatch)
    images, tags = tmp_path / "images", tmp_path / "tags.json"
    shutil.copytree(image_folder, images)
    shutil.move(images / "tags.json", tags)
    args = trainer.get_args_parser().parse_args(["--real-only", "--pseudo-images", str(images), "--pseudo-tags",
                                                 str(tags), "--output-dir", str(tmp_path / "out")])
    config, args.classes = trainer.generator_config(args)
    checkpoint = {"args": trainer.saved_args(args), "model": {}, "step": 0}
    assert trainer.check_resume_args(checkpoint, args, config.label_space) == {}
    PIL.Image.new("RGB", (32, 32), (9, 9, 9)).save(images / "a_rgb.png")
    tags.write_text(tags.read_text().replace("circle", "square"))
    trainer.content_identity.cache_clear()  # as a new process would read them
    with pytest.raises(SystemExit, match=r"--pseudo-images .*images \(sha256:\w+\) -> .*images \(sha256:\w+\), "
                                         r"--pseudo-tags .*tags.json \(sha256:\w+\) -> .*tags.json \(sha256:\w+\)"):
        trainer.check_resume_args(checkpoint, args, config.label_space)


def test_the_pseudo_images_a_checkpoint_records_are_hashed_before_they_are_labelled(tmp_path, monkeypatch, image_folder):
    # Hashed at the first checkpoint instead, an image edited while the run labelled or trained was
    # recorded as what it labelled, and a resume with the edited folder passed the check.
    from ondemand_seg.data.fingerprint import files_digest
    from ondemand_seg.real.images import image_files

    trainer = load_trainer(monkeypatch)
    images = shutil.copytree(image_folder, tmp_path / "images")
    before = files_digest(image_files(images))[:16]

    class Stopped(Exception):
        pass

    def edit_then_stop(args, config):  # where the run goes on to label the images
        PIL.Image.new("RGB", (32, 32), (9, 9, 9)).save(images / "a_rgb.png")
        raise Stopped

    monkeypatch.setattr(trainer, "prepare_folders", edit_then_stop)
    args = trainer.get_args_parser().parse_args(["--real-only", "--pseudo-images", str(images), "--device", "cpu",
                                                 "--output-dir", str(tmp_path / "out"), "--data-dir",
                                                 str(tmp_path / "data")])
    with pytest.raises(Stopped):
        trainer.main(args)
    assert f"(sha256:{before})" in trainer.saved_args(args)["pseudo_images"]


def test_backbone_weights_that_are_not_weights_are_named_and_a_pickle_runs_no_code(tmp_path, monkeypatch):
    import pickle

    trainer = load_trainer(monkeypatch)
    marker = tmp_path / "ran"

    class Code:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w')",)

    (tmp_path / "code.pth").write_bytes(pickle.dumps({"w": Code()}))
    (tmp_path / "garbage.safetensors").write_bytes(b"garbage")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    for name, message in [("code.pth", "cannot be read as weights (UnpicklingError: Weights only load failed"),
                          ("garbage.safetensors", "cannot be read as weights (SafetensorError"),
                          ("tensor.pth", "holds Tensor, not a dict of named tensors")]:
        with pytest.raises(SystemExit) as refused:
            trainer.read_backbone_weights(tmp_path / name)
        assert refused.value.code == 2 and f"--backbone-weights {tmp_path / name} {message}" in str(refused.value)
    assert not marker.exists(), "the pickle's code ran"
