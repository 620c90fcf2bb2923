import collections
import io
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import ondemand_seg
from ondemand_seg import DiffuMaskDataset, DiffuMaskGenerator, DiffuMaskStream
from ondemand_seg.cli import main
from ondemand_seg.data.fingerprint import model_fingerprint
from ondemand_seg.exports import ExportError, export
from ondemand_seg.settings.label_spaces import voc_palette

CLASSES = ["circle", "square"]
SETTINGS = {"generator": {"num_inference_steps": 2, "batch_size": 2}}
# 8 samples in shards of 3 (two full shards and a short one), drawn in batches of 2: shard 1 shares
# a generation batch with each of its neighbours.
N, SHARD = 8, 3
FORMATS = ["voc", "webdataset", "hf"]


def make_generator(seed=0, **settings):
    return DiffuMaskGenerator("toy", CLASSES, seed=seed, **{**SETTINGS, **settings})


def tree(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def reference():
    """The generator's samples 0..N-1, drawn in its batches."""
    return {sample.index: sample for sample in make_generator().samples(range(N))}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each format exported once, uninterrupted, with lossless images: folder and metadata."""
    generator = make_generator()
    root = tmp_path_factory.mktemp("exports")
    return {fmt: (root / fmt, export(generator, root / fmt, N, format=fmt, shard_size=SHARD, image_format="png",
                                     progress=False)) for fmt in FORMATS}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(data)))


def read_voc(root):
    from torchvision.datasets import VOCSegmentation

    dataset = VOCSegmentation(root, year="2012", image_set="train")
    ids = [int(Path(path).stem) for path in dataset.images]
    return {index: (np.asarray(image), target) for index, (image, target) in zip(ids, dataset)}


def read_webdataset(root, metadata):
    import webdataset

    samples = webdataset.WebDataset(f"{root}/{metadata['files']['urls']}", shardshuffle=False).decode("rgb8")
    return {sample["json"]["index"]: sample for sample in samples}


def read_hf(root, tmp_path):
    import datasets

    return datasets.load_dataset("parquet", data_files=f"{root}/data/*.parquet", split="train",
                                 cache_dir=str(tmp_path / "hf-cache"))


def test_voc_is_read_by_torchvision_with_the_generators_bytes(exports, reference):
    root, _ = exports["voc"]
    samples = read_voc(root)
    assert sorted(samples) == list(range(N))
    for index, (image, target) in samples.items():
        assert target.mode == "P" and target.getpalette()[:6] == voc_palette()[:6]
        assert np.array_equal(image, reference[index].image)
        assert np.array_equal(np.asarray(target), reference[index].mask)
    records = [json.loads(line) for path in sorted((root / "VOCdevkit/VOC2012/SampleRecords").iterdir())
               for line in path.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(N))
    assert records[0]["prompt"] == reference[0].prompt and records[0]["seed"] == 0


def test_webdataset_is_read_by_webdataset_with_the_generators_bytes(exports, reference):
    root, metadata = exports["webdataset"]
    assert metadata["files"]["urls"] == "train-{000000..000002}.tar"
    import tarfile

    with tarfile.open(root / "train-000000.tar") as tar:  # shard size by count: 3 samples x 3 files
        assert len(tar.getnames()) == 3 * SHARD
    samples = read_webdataset(root, metadata)
    assert sorted(samples) == list(range(N))
    generator = make_generator()
    for index, sample in samples.items():
        assert np.array_equal(sample["image.png"], reference[index].image)
        assert all(np.array_equal(sample["mask.png"][..., c], reference[index].mask) for c in range(3))
        prompt = generator.prompt(index, reference[index].attempt)
        assert sample["json"] == {"index": index, "attempt": reference[index].attempt, "prompt": reference[index].prompt,
                                  "classes": list(prompt.class_names), "seed": 0}


def test_hf_is_loaded_by_datasets_with_the_generators_bytes(exports, reference, tmp_path):
    import datasets

    root, metadata = exports["hf"]
    for dataset in (read_hf(root, tmp_path), datasets.load_dataset(str(root), split="train",
                                                                    cache_dir=str(tmp_path / "cache"))):
        assert isinstance(dataset.features["image"], datasets.Image)
        assert isinstance(dataset.features["mask"], datasets.Image)
        assert dataset.features["classes"].feature.names == list(metadata["label_space"])
        assert dataset["index"] == list(range(N))
        for row in dataset:
            sample = reference[row["index"]]
            assert np.array_equal(np.asarray(row["image"]), sample.image)
            assert row["mask"].mode == "P" and np.array_equal(np.asarray(row["mask"]), sample.mask)
            assert row["prompt"] == sample.prompt and row["attempt"] == sample.attempt
            names = [dataset.features["classes"].feature.int2str(c) for c in row["classes"]]
            assert " and ".join(f"a {name}" for name in names) in sample.prompt


def test_exported_samples_are_the_streams_raw_samples(exports):
    root, metadata = exports["webdataset"]
    stream = DiffuMaskStream("toy", CLASSES, num_samples=N, transforms=lambda image, target: (image, target),
                             **SETTINGS)
    served = sorted((np.asarray(image).tobytes(), np.asarray(target).tobytes()) for image, target in stream)
    exported = sorted((s["image.png"].tobytes(), s["mask.png"][..., 0].tobytes())
                      for s in read_webdataset(root, metadata).values())
    assert served == exported


def test_metadata_holds_config_model_labels_counts_and_pixel_shares(exports, reference):
    root, metadata = exports["voc"]
    assert json.loads((root / "metadata.json").read_text()) == metadata
    generator = make_generator()
    assert metadata["complete"] and metadata["samples"] == N and metadata["shards"] == 3
    assert metadata["config"] == generator.config.to_dict()
    assert metadata["model"] == "toy" and metadata["model_fingerprint"] == model_fingerprint("toy")
    assert metadata["label_space"] == list(generator.label_space) and metadata["classes"] == CLASSES
    assert metadata["palette"]["circle"] == voc_palette()[3:6] and metadata["palette"]["ignore"] == [224, 224, 192]
    assert metadata["versions"]["ondemand_seg"] == ondemand_seg.__version__
    # Shard 1's first and last sample are drawn in batches shared with shards 0 and 2: drawn twice.
    assert metadata["gate"]["accepted"] == N + 2 and metadata["gate"]["generated"] >= N + 2
    masks = np.stack([reference[i].mask for i in range(N)])
    for name in ("background", "circle", "square"):
        share = (masks == generator.label_space.index(name)).mean()
        assert metadata["pixel_share"][name] == pytest.approx(share, abs=1e-6)
    assert sum(metadata["pixel_share"].values()) == pytest.approx(1, abs=1e-4)
    assert {name: metadata[name] for name in ("gate", "pixel_counts", "model_fingerprint")} == \
        {name: exports["hf"][1][name] for name in ("gate", "pixel_counts", "model_fingerprint")}


@pytest.fixture
def draws(monkeypatch):
    """Every index any generator is asked for, in order; ``draws.fail_at`` makes drawing it raise."""
    drawn, original = [], DiffuMaskGenerator.samples

    def samples(self, indices):
        indices = list(indices)
        if draws.fail_at in indices:
            raise RuntimeError("killed")
        drawn.extend(indices)
        return original(self, indices)

    draws = type("Draws", (), {"indices": drawn, "fail_at": None})
    monkeypatch.setattr(DiffuMaskGenerator, "samples", samples)
    return draws


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_killed_export_resumes_its_unfinished_shards_and_ends_identical(fmt, exports, draws, tmp_path):
    out = tmp_path / fmt
    draws.fail_at = 4  # in shard 1 (samples 3 to 5), after sample 3 was written
    with pytest.raises(RuntimeError, match="killed"):
        export(make_generator(), out, N, format=fmt, shard_size=SHARD, image_format="png", progress=False)
    assert draws.indices == [0, 1, 2, 3, 2, 3]
    names = set(tree(out))
    assert "shard-stats/000000.json" in names and "shard-stats/000001.json" not in names
    assert not [name for name in names if name.endswith(".tmp")]
    assert not {"train-000001.tar", "data/train-00001-of-00003.parquet"} & names
    assert not json.loads((out / "metadata.json").read_text())["complete"]
    if fmt == "voc":  # each file is whole; the shard is unfinished without its stats and split list
        assert "VOCdevkit/VOC2012/SegmentationClass/0000000003.png" in names
        assert "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt" not in names

    draws.fail_at, draws.indices[:] = None, []
    metadata = export(make_generator(), out, N, format=fmt, shard_size=SHARD, image_format="png", progress=False)
    assert draws.indices == [2, 3, 4, 5, 6, 7]  # shard 0 is not drawn again
    assert metadata["complete"] and tree(out) == tree(exports[fmt][0])

    draws.indices[:] = []
    export(make_generator(), out, N, format=fmt, shard_size=SHARD, image_format="png", progress=False)
    assert draws.indices == [] and tree(out) == tree(exports[fmt][0])


def test_another_plan_is_refused_naming_the_fields_and_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    export(make_generator(), out, 2, format="voc", shard_size=2, progress=False)
    with pytest.raises(ExportError) as error:
        export(make_generator(seed=1, generator={"num_inference_steps": 3}), out, 3, format="webdataset",
               progress=False)
    for change in ("seed: 0 -> 1", "generator.num_inference_steps: 2 -> 3", "n: 2 -> 3",
                   "format: 'voc' -> 'webdataset'", "shard_size: 2 -> 1000"):
        assert change in str(error.value)
    assert "--overwrite" in str(error.value)
    with pytest.raises(ExportError, match=r"generator.batch_size: 2 -> 1 \(there -> now\)"):
        export(make_generator(generator={"num_inference_steps": 2, "batch_size": 1}), out, 2, format="voc",
               shard_size=2, progress=False)

    metadata = export(make_generator(seed=1), out, 3, format="webdataset", overwrite=True, progress=False)
    assert metadata["seed"] == 1 and metadata["samples"] == 3
    assert sorted(tree(out)) == ["metadata.json", "shard-stats/000000.json", "train-000000.tar"]

    (out / "metadata.json").write_text("{not json")
    with pytest.raises(ExportError, match=f"{out / 'metadata.json'} is not valid JSON"):
        export(make_generator(), out, 2, progress=False)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="not empty and holds no export"):
            export(make_generator(), tmp_path / "mine", 2, overwrite=overwrite, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.fixture
def no_model(monkeypatch):
    """Loading any pipeline fails the test."""
    import ondemand_seg.generation.generator as source

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded")

    monkeypatch.setattr(source, "load_pipeline", refuse)


@pytest.mark.parametrize("argv, missing, message", [
    (["--format", "parquet"], None, "format must be one of voc, webdataset, hf, got 'parquet'"),
    (["--n", "0"], None, "--n must be >= 1, got 0"),
    (["--n", "-5"], None, "--n must be >= 1, got -5"),
    (["--shard-size", "0"], None, "--shard-size must be >= 1, got 0"),
    (["--workers", "-1"], None, "--workers must be >= 0, got -1"),
    (["--out", "FILE"], None, "is a file; give a folder"),
    (["--out", "FILE/sub"], None, "lies under .* which is a file"),
    (["--format", "webdataset"], "webdataset", r'pip install "ondemand_seg\[webdataset\]"'),
    (["--format", "hf"], "datasets", r'pip install "ondemand_seg\[hf\]"'),
    (["--classes", "dragon"], None, "unknown class 'dragon'"),
    (["--n", str(10**15), "--shard-size", "1"], None, "makes 1,000,000,000,000,000 shards, more than an export keeps"),
])
def test_bad_input_is_a_usage_error_before_any_model_loads(argv, missing, message, no_model, monkeypatch, tmp_path,
                                                           capsys):
    import re

    (tmp_path / "FILE").write_text("")
    if missing:
        monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    argv = [arg.replace("FILE", str(tmp_path / "FILE")) for arg in argv]
    defaults = {"--out": str(tmp_path / "out"), "--n": "2"}
    argv += [item for flag, value in defaults.items() if flag not in argv for item in (flag, value)]
    with pytest.raises(SystemExit) as exit:
        main(["export", *argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_bad_arguments_of_the_function_are_named(no_model, tmp_path):
    generator = make_generator()
    for kwargs, error, message in [
        ({"n": 0}, ValueError, "n must be >= 1, got 0"), ({"n": 2.0}, TypeError, "n must be an int"),
        ({"start": -1}, ValueError, "start must be >= 0, got -1"),
        ({"image_format": "webp"}, ValueError, "image_format must be one of jpg, png, got 'webp'"),
        ({"format": None}, ValueError, "format must be one of"), ({"overwrite": "yes"}, TypeError, "overwrite"),
    ]:
        with pytest.raises(error, match=message):
            export(generator, tmp_path / "out", **{"n": 2, **kwargs})
    with pytest.raises(TypeError, match="DiffuMaskGenerator"):
        export("toy", tmp_path / "out", 2)


def test_a_fifo_metadata_or_a_broken_stats_file_is_refused_naming_it(exports, no_model, tmp_path):
    """Neither blocks nor fails deep: a FIFO would block the read forever."""
    import os
    import shutil

    fifo = shutil.copytree(exports["webdataset"][0], tmp_path / "fifo")
    (fifo / "metadata.json").unlink()
    os.mkfifo(fifo / "metadata.json")
    with pytest.raises(ExportError, match=f"{fifo / 'metadata.json'} is a FIFO"):
        export(make_generator(), fifo, N, format="webdataset", shard_size=SHARD, image_format="png", progress=False)
    broken = shutil.copytree(exports["webdataset"][0], tmp_path / "broken")
    (broken / "shard-stats" / "000001.json").write_text('{"gate": 3}')
    with pytest.raises(ExportError, match=r"000001.json is not a shard's stats file .*write shard 1 anew"):
        export(make_generator(), broken, N, format="webdataset", shard_size=SHARD, image_format="png", progress=False)


@pytest.mark.slow
def test_a_finished_shard_whose_files_were_deleted_is_written_again(exports, tmp_path):
    import shutil

    original = exports["voc"][0]
    copy = shutil.copytree(original, tmp_path / "copy")
    lost = copy / "VOCdevkit" / "VOC2012" / "JPEGImages" / "0000000004.jpg"  # in shard 1 (samples 3-5)
    lost.unlink()
    metadata = export(make_generator(), copy, N, format="voc", shard_size=SHARD, image_format="png", progress=False)
    assert metadata["complete"] and tree(copy).keys() == tree(original).keys()
    assert lost.read_bytes() == (original / lost.relative_to(copy)).read_bytes()


@pytest.mark.slow
def test_two_threads_exporting_from_one_generator_count_only_their_own_draws(reference, tmp_path):
    import threading

    generator = make_generator()
    results = {}

    def run(name):
        results[name] = export(generator, tmp_path / name, 4, format="voc", shard_size=2, image_format="png",
                               progress=False)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    alone = export(make_generator(), tmp_path / "alone", 4, format="voc", shard_size=2, image_format="png",
                   progress=False)
    assert [results[name]["gate"] for name in ("a", "b")] == [alone["gate"]] * 2
    for name in ("a", "b"):
        masks = read_voc(tmp_path / name)
        assert all(np.array_equal(np.asarray(masks[i][1]), reference[i].mask) for i in range(4))


def test_start_offsets_the_indices(exports, reference, tmp_path):
    metadata = export(make_generator(), tmp_path / "out", 3, start=5, format="webdataset", shard_size=2,
                      image_format="png", progress=False)
    assert metadata["start"] == 5 and metadata["files"]["urls"] == "train-{000000..000001}.tar"
    samples = read_webdataset(tmp_path / "out", metadata)
    assert sorted(samples) == [5, 6, 7]
    for index, sample in samples.items():
        assert np.array_equal(sample["image.png"], reference[index].image)
        assert np.array_equal(sample["mask.png"][..., 0], reference[index].mask)


def test_with_batches_of_one_sample_i_is_samples_of_i(tmp_path):
    settings = {"generator": {"num_inference_steps": 2, "batch_size": 1}}
    export(make_generator(**settings), tmp_path, 3, start=2, format="voc", shard_size=2, image_format="png",
           progress=False)
    generator = make_generator(**settings)
    for index, (image, target) in read_voc(tmp_path).items():
        sample = generator.samples([index])[0]
        assert np.array_equal(image, sample.image) and np.array_equal(np.asarray(target), sample.mask)


def test_two_workers_write_the_same_bytes_as_one_process(exports, tmp_path):
    out = tmp_path / "out"
    metadata = export(make_generator(), out, N, format="webdataset", shard_size=SHARD, image_format="png", workers=2,
                      progress=False)
    assert metadata["gate"] == exports["webdataset"][1]["gate"]
    assert tree(out) == tree(exports["webdataset"][0])


def test_each_rank_writes_its_shards_and_the_last_one_writes_the_metadata(exports, monkeypatch, tmp_path):
    out = tmp_path / "out"
    rank = {"value": 0}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank["value"])
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    first = export(make_generator(), out, N, format="hf", shard_size=SHARD, image_format="png", progress=False)
    assert not first["complete"]
    assert sorted(p.name for p in (out / "shard-stats").iterdir()) == ["000000.json", "000002.json"]
    rank["value"] = 1
    assert export(make_generator(), out, N, format="hf", shard_size=SHARD, image_format="png", progress=False)["complete"]
    assert tree(out) == tree(exports["hf"][0])
    with pytest.raises(ExportError, match="differ from those in .*seed: 0 -> 1"):
        export(make_generator(seed=1), out, N, format="hf", shard_size=SHARD, image_format="png", progress=False)


def test_the_command_writes_a_voc_tree_with_jpeg_images(exports, reference, tmp_path, capsys):
    out = tmp_path / "voc"
    assert main(["export", "--out", str(out), "--n", "3", "--format", "voc", "--shard-size", "2", "--classes",
                 *CLASSES, "--gen-steps", "2", "--gen-batch-size", "2"]) == 0
    assert f"wrote 3 samples (voc, 2 shards) to {out}" in capsys.readouterr().out
    for index, (image, target) in read_voc(out).items():
        assert np.array_equal(np.asarray(target), reference[index].mask)
        assert np.abs(image.astype(int) - reference[index].image).mean() < 8  # JPEG, quality 95
    with PIL.Image.open(out / "VOCdevkit/VOC2012/JPEGImages/0000000000.jpg") as image:
        assert image.format == "JPEG"
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["image_format"] == "jpg"
    assert {k: v for k, v in metadata["plan"].items() if k not in ("n", "image_format", "shard_size")} == \
        {k: v for k, v in exports["voc"][1]["plan"].items() if k not in ("n", "image_format", "shard_size")}


def test_ondemand_seg_export_is_the_function():
    import ondemand_seg.exports  # noqa: F401 - a sub-package import must not rebind the name

    assert ondemand_seg.export is export


@pytest.mark.slow
def test_torchrun_ranks_write_one_export(exports, tmp_path):
    import subprocess

    out = tmp_path / "out"
    # "--": torchrun would take --n and --start for abbreviations of its own options.
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                           "-m", "--", "ondemand_seg", "export", "--start", "0", "--out", str(out), "--n", str(N), "--format", "webdataset",
                           "--shard-size", str(SHARD), "--image-format", "png", "--classes", *CLASSES,
                           "--gen-steps", "2", "--gen-batch-size", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert tree(out) == tree(exports["webdataset"][0])


# Reading an export back: ExportSource, and the datasets served from it.


def identity(image, target):
    return image, target


def served_indices(pairs, index_of):
    """The sample index of each served (PIL image, PIL mask) pair, by its bytes."""
    return [index_of[np.asarray(image).tobytes() + np.asarray(target).tobytes()] for image, target in pairs]


@pytest.fixture(scope="module")
def index_of(reference):
    return {sample.image.tobytes() + sample.mask.tobytes(): index for index, sample in reference.items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_export_is_read_back_as_the_generators_samples_without_a_model(fmt, exports, reference, no_model):
    from ondemand_seg.exports import ExportSource

    source = ExportSource(exports[fmt][0])
    assert source.indices == range(N) and len(source) == N and source.seed == 0 and source.classes == tuple(CLASSES)
    assert source.config.to_dict() == make_generator().config.to_dict()
    assert source.stats() == exports[fmt][1]["gate"]
    for sample in source.samples([7, 0, 3, 4]):  # across shards, out of order
        want = reference[sample.index]
        assert np.array_equal(sample.image, want.image) and np.array_equal(sample.mask, want.mask)
        assert (sample.prompt, sample.attempt) == (want.prompt, want.attempt)
    with pytest.raises(IndexError, match=rf"sample 8 is not in export .*{fmt}, which holds samples 0 to 7 \(seed 0\)"):
        source.samples([2, 8])


def schedule_within(stream_settings, n):
    """Servings of the live stream (one shard) made before it first draws an index >= ``n``: the
    stream from an export of ``n`` samples serves the same ones, then draws less."""
    from ondemand_seg.data.schedule import ServingPlan, ServingSchedule

    schedule = ServingSchedule(ServingPlan(), 0, 1, seed=0, batch=SETTINGS["generator"]["batch_size"], **stream_settings)
    while schedule.fresh_index(max(schedule.fresh_drawn - 1, 0)) < n:
        schedule.advance()
    return schedule.served - 1


def test_a_stream_from_an_export_serves_the_live_streams_batches_then_each_sample_reuse_times(exports, index_of):
    settings = dict(reuse=2, cache_size=4)
    live = DiffuMaskStream("toy", CLASSES, **settings, **SETTINGS)
    read = DiffuMaskStream.from_export(exports["hf"][0], **settings)
    same = schedule_within(settings, N)
    assert same >= 6
    for (image, mask), (want_image, want_mask) in zip(itertools.islice(read, same), itertools.islice(live, same)):
        assert torch.equal(image, want_image) and torch.equal(mask, want_mask), "augmented alike"
    assert read.fingerprint != live.fingerprint and read.fingerprint["export"]["seed"] == 0
    # A pass serves every sample reuse times, under any sharding, then stops; a new one starts again.
    plain = DiffuMaskStream.from_export(exports["voc"][0], transforms=identity, **settings)
    assert collections.Counter(served_indices(plain, index_of)) == dict.fromkeys(range(N), 2)
    assert len(list(plain)) == 2 * N
    with pytest.raises(ValueError, match=r"num_samples=17 is more than export .*voc serves in a pass: its 8 samples x "
                                         r"reuse 2 = 16"):
        DiffuMaskStream.from_export(exports["voc"][0], num_samples=17, **settings)
    other = DiffuMaskStream.from_export(exports["voc"][0], transforms=identity, seed=3, **settings)
    assert sorted(served_indices(other, index_of)) == sorted(served_indices(plain, index_of))
    assert served_indices(other, index_of) != served_indices(plain, index_of), "another seed, another order"


def test_the_dataset_from_an_export_gives_the_live_datasets_items(exports):
    live = DiffuMaskDataset("toy", CLASSES, length=N, cache_size=N, **SETTINGS)
    read = DiffuMaskDataset.from_export(exports["webdataset"][0], length=5)
    assert len(read) == 5 and len(DiffuMaskDataset.from_export(exports["webdataset"][0])) == N
    for i in range(5):
        assert all(torch.equal(a, b) for a, b in zip(read[i], live[i]))
    with pytest.raises(ValueError, match=r"length=9 is more than export .*webdataset holds: 8 samples \(0 to 7\)"):
        DiffuMaskDataset.from_export(exports["webdataset"][0], length=9)


def test_an_export_from_a_later_start_serves_its_own_indices(tmp_path, reference, index_of):
    export(make_generator(), tmp_path, 3, start=5, format="voc", shard_size=2, image_format="png", progress=False)
    stream = DiffuMaskStream.from_export(tmp_path, transforms=identity)
    assert sorted(served_indices(stream, index_of)) == [5, 6, 7]
    item = DiffuMaskDataset.from_export(tmp_path, transforms=identity).raw([0, 2])
    assert [sample.index for sample in item] == [5, 7]
    assert stream.state_dict()["plan"]["base"] == 5


def test_what_is_not_a_complete_export_is_refused_naming_it(exports, tmp_path):
    import shutil

    from ondemand_seg.exports import ExportSource

    with pytest.raises(ExportError, match=f"{tmp_path} holds no export \\(metadata.json is missing\\)"):
        ExportSource(tmp_path)
    with pytest.raises(ExportError, match="is not a folder"):
        DiffuMaskStream.from_export(tmp_path / "nowhere")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(exports["webdataset"][0], unfinished)
    metadata = json.loads((unfinished / "metadata.json").read_text())
    (unfinished / "metadata.json").write_text(json.dumps({"complete": False, "plan": metadata["plan"]}))
    with pytest.raises(ExportError, match=f"export {unfinished} is unfinished \\(3 shard\\(s\\) written\\): rerun its "
                                          "export command"):
        DiffuMaskDataset.from_export(unfinished)
    (unfinished / "metadata.json").write_text(json.dumps({**metadata, "samples": "8"}))
    with pytest.raises(ExportError, match="'samples' must be a int, got '8'"):
        ExportSource(unfinished)
    (unfinished / "metadata.json").write_text(json.dumps(metadata))
    (unfinished / "train-000001.tar").write_bytes(b"not a tar")
    with pytest.raises(ExportError, match="cannot read the tar shard .*train-000001.tar"):
        ExportSource(unfinished).samples([4])


def test_a_run_moves_from_2_ranks_x_2_workers_to_1_x_3_to_3_x_1_serving_each_sample_reuse_times(
        exports, index_of, monkeypatch):
    # Each phase's shards are served one after another in this process (as ranks and workers would
    # in theirs), some more than others; the stream from an export is finite, so that at the end of
    # the pass "none served twice, none skipped" is every sample served exactly reuse times.
    from ondemand_seg.data import sharding

    def make():
        return DiffuMaskStream.from_export(exports["voc"][0], reuse=2, cache_size=4, transforms=identity)

    def phase(ranks, workers, counts, resume):
        states, served = [], []
        for shard, count in enumerate(counts):
            monkeypatch.setattr(sharding, "split_by_node", lambda: (shard // workers, ranks))
            monkeypatch.setattr(sharding, "split_by_worker", lambda: (shard % workers, workers))
            stream = make()
            if resume is not None:
                stream.load_state_dict(resume)
            served += served_indices(itertools.islice(stream, count), index_of)
            states.append(stream.state_dict())
        return served, make().resharded_state(states)

    seen, state = phase(2, 2, [1, 3, 0, 2], None)
    more, state = phase(1, 3, [2, 1, 1], state)
    rest, _ = phase(3, 1, [99, 99, 99], state)
    assert len(seen) == 6 and len(more) == 4
    assert collections.Counter(seen + more + rest) == dict.fromkeys(range(N), 2)


def edited_copy(exports, fmt, tmp_path, **metadata_changes):
    """A copy of the ``fmt`` export whose metadata has ``metadata_changes`` (``config__x`` sets ``config["x"]``)."""
    import shutil

    folder = tmp_path / f"edited-{fmt}"
    shutil.copytree(exports[fmt][0], folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    for key, value in metadata_changes.items():
        *outer, last = key.split("__")
        target = metadata
        for part in outer:
            target = target[part]
        target[last] = value
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


@pytest.mark.parametrize("changes, message", [
    (dict(label_space=["background", "circle"]), r"'label_space' \['background', 'circle'\] is not its config's"),
    (dict(config__label_space=["background", "circle"], label_space=["background", "circle"]),
     r"'classes' must be names of its label space \['background', 'circle'\], got \['circle', 'square'\]"),
    (dict(classes=[1, 2]), r"'classes' must be names of its label space"),
    (dict(config__image_size=[-1, "a"]), r"settings this version cannot read: image_size must be"),
    (dict(config__vocabulary=None), r"settings this version cannot read"),
    (dict(image_format="gif"), r"'image_format' must be one of jpg, png, got 'gif'"),
    (dict(complete="yes"), r"'complete' must be true, got 'yes'"),
    (dict(seed=-5), r"'seed' must be >= 0, got -5"),
    (dict(gate=[1, 2]), r"'gate' must map reasons to counts"),
    (dict(samples=12), r"says 3 shard\(s\) of 3 for 12 samples, which take 4"),
])
def test_metadata_that_lies_is_refused_at_construction_naming_the_field(exports, tmp_path, changes, message):
    from ondemand_seg.exports import ExportSource

    with pytest.raises(ExportError, match=message):
        ExportSource(edited_copy(exports, "voc", tmp_path, **changes))


def test_export_files_that_are_not_what_the_export_wrote_are_refused_naming_them(exports, tmp_path):
    import os
    import tarfile

    from ondemand_seg.exports import ExportSource

    def grey_png(array):
        out = io.BytesIO()
        PIL.Image.fromarray(array, "L").save(out, "PNG")
        return out.getvalue()

    voc = edited_copy(exports, "voc", tmp_path)
    images, masks = voc / "VOCdevkit/VOC2012/JPEGImages", voc / "VOCdevkit/VOC2012/SegmentationClass"
    outside = np.zeros((32, 32), np.uint8)
    outside[4:9, 4:9] = 9  # the toy label space's 6 classes hold ids 0-5 (255 ignore)
    (masks / "0000000002.png").write_bytes(grey_png(outside))
    (images / "0000000001.jpg").write_bytes(grey_png(np.zeros((48, 40), np.uint8)))
    (images / "0000000000.jpg").unlink()
    (images / "0000000000.jpg").symlink_to("/dev/zero")
    (masks / "0000000003.png").unlink()
    os.mkfifo(masks / "0000000003.png")
    (images / "0000000004.jpg").unlink()
    (images / "0000000004.jpg").symlink_to(exports["hf"][0] / "metadata.json")  # a regular file, of another folder
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # A 100-megapixel grey PNG's header, with one compressed row: decoding would allocate it all.
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(bytes(10001))) + chunk(b"IEND", b"")
    (images / "0000000005.jpg").write_bytes(bomb)
    source = ExportSource(voc)
    for index, message in [(0, "0000000000.jpg is not a regular file"), (1, "image is 48x40 .* export's image size is 32x32"),
                           (2, r"mask holds label id\(s\) \[9\], outside the export's label space of 6 classes"),
                           (3, "0000000003.png is a FIFO"), (4, "links to .*metadata.json, outside the export folder"),
                           (5, "0000000005.jpg is 10000x10000, larger than any image")]:
        with pytest.raises(ExportError, match=message):
            source.samples([index])
    (voc / "VOCdevkit/VOC2012/SampleRecords/000001.jsonl").unlink()
    with pytest.raises(ExportError, match="cannot read .*SampleRecords/000001.jsonl: .* does not exist"):
        ExportSource(voc)  # a missing shard is found at construction

    wds = edited_copy(exports, "webdataset", tmp_path)
    with tarfile.open(wds / "train-000000.tar", "a") as tar:
        for name, kind in [("0000000001.mask.png", tarfile.REGTYPE)]:
            info = tarfile.TarInfo(name)
            data = grey_png(outside)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ExportError, match="train-000000.tar holds '0000000001.mask.png' twice"):
        ExportSource(wds).samples([1])
    with tarfile.open(wds / "train-000001.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != "0000000003.image.png"]
    with tarfile.open(wds / "train-000001.tar", "w") as tar:
        for member, data in members:
            if member.name == "0000000004.json":
                member.size, data = 5, b"{nope"
            tar.addfile(member, io.BytesIO(data))
        link = tarfile.TarInfo("0000000003.image.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(ExportError, match="0000000003.image.png is not a file"):
        ExportSource(wds).samples([3])
    with pytest.raises(ExportError, match="0000000004.json is not a JSON record"):
        ExportSource(wds).samples([4])

    import pyarrow as pa
    import pyarrow.parquet as pq

    hf = edited_copy(exports, "hf", tmp_path)
    shard = sorted((hf / "data").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    pq.write_table(table.set_column(table.schema.get_field_index("index"), "index",
                                    pa.array([str(i) for i in range(len(table))])), shard)
    with pytest.raises(ExportError, match="needs a column 'index' of integer, has a column of string"):
        ExportSource(hf).samples([0])
