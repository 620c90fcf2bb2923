"""ondemand_seg.ray on a local Ray instance (2 CPUs): every index once, the stream's bytes, feeding
torch and two training workers, exports identical to the local ones, and the errors before Ray
starts. The default suite runs one generation and one export on Ray; the rest is marked slow."""
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from test_export import read_hf, read_voc, read_webdataset

from ondemand_seg import DiffuMaskDataset, DiffuMaskGenerator, DiffuMaskStream
from ondemand_seg import ray as on_ray
from ondemand_seg.exports import ExportError, export
from ondemand_seg.ray.__main__ import main

CLASSES = ["circle", "square"]
SETTINGS = {"generator": {"num_inference_steps": 2, "batch_size": 2}}
# Samples 3..9 in blocks of 2: the first block [2, 4) is cut, the last [8, 10) whole.
START, N = 3, 7
INDICES = list(range(START, START + N))
FORMATS = ["voc", "webdataset", "hf"]


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance for every test that needs one ("local": our own size even where
    `ray start` left a cluster running)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference():
    """The raw samples 3..9 by index, as DiffuMaskDataset draws them here (one thread: conftest)."""
    dataset = DiffuMaskDataset("toy", CLASSES, START + N, **SETTINGS)
    return {sample.index: sample for sample in dataset.raw(INDICES)}


@pytest.fixture
def no_model(monkeypatch):
    import ondemand_seg.generation.generator as source

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded")

    monkeypatch.setattr(source, "load_pipeline", refuse)


@pytest.fixture
def nothing_on_ray(monkeypatch):
    """Handing Ray any work fails the test."""
    ray = pytest.importorskip("ray")

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was handed work")

    monkeypatch.setattr(ray.data, "from_items", refuse)


def assert_every_index_once(rows, reference):
    """``rows`` hold each index of the range once, with the reference's bytes (and, where the row
    has them, its prompt, attempt and seed)."""
    assert sorted(int(row["index"]) for row in rows) == INDICES
    for row in rows:
        sample = reference[int(row["index"])]
        assert np.array_equal(row["image"], sample.image) and np.array_equal(row["mask"], sample.mask)
        assert row["image"].dtype == row["mask"].dtype == np.uint8
        if "prompt" in row:
            assert (row["prompt"], row["attempt"], row["seed"]) == (sample.prompt, sample.attempt, 0)


def split_rows(iterators) -> list[list[dict]]:
    """The rows each of ``iterators`` yields, read at once from one thread each (a streaming split
    hands out blocks only while all of them read)."""
    seen = [[] for _ in iterators]

    def read(k):
        for batch in iterators[k].iter_batches(batch_size=2):
            seen[k] += [dict(zip(batch, values)) for values in zip(*batch.values())]

    threads = [threading.Thread(target=read, args=(k,)) for k in range(len(iterators))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seen


def assert_each_row_once_across(seen, reference):
    """Every consumer got rows, and together they got each index once, with its bytes."""
    assert all(seen)
    assert_every_index_once(sum(seen, []), reference)


def test_generate_gives_every_index_once_with_the_streams_bytes_and_feeds_training(ray_instance, reference):
    # Materialized: the actor starts and generates once for the three reads below. One actor: each
    # costs a process that imports torch and diffusers (the slow tests run two).
    dataset = on_ray.generate("toy", CLASSES, N, start=START, actors=1, columns=("index", "image", "mask"),
                              **SETTINGS).materialize()
    assert dataset.columns() == ["index", "image", "mask"]
    rows = dataset.take_all()
    assert_every_index_once(rows, reference)
    assert rows[0]["image"].shape == (32, 32, 3) and rows[0]["mask"].shape == (32, 32)
    stream = DiffuMaskStream("toy", CLASSES, num_samples=START + N, transforms=lambda image, target: (image, target),
                             **SETTINGS)
    served = {(np.asarray(image).tobytes(), np.asarray(target).tobytes()) for image, target in stream}
    assert {(row["image"].tobytes(), row["mask"].tobytes()) for row in rows} <= served

    batches = list(dataset.iter_torch_batches(batch_size=4))
    assert sorted(i for b in batches for i in b["index"].tolist()) == INDICES
    assert sorted(tuple(b["image"].shape) for b in batches) == [(3, 32, 32, 3), (4, 32, 32, 3)]
    assert {(str(b["image"].dtype), str(b["mask"].dtype)) for b in batches} == {("torch.uint8", "torch.uint8")}

    assert_each_row_once_across(split_rows(dataset.streaming_split(2, equal=False)), reference)


@pytest.mark.slow
def test_an_export_from_ray_actors_is_the_local_exports_files(ray_instance, reference, tmp_path):
    options = dict(start=START, format="webdataset", shard_size=3, image_format="png", progress=False)
    local = export(DiffuMaskGenerator("toy", CLASSES, **SETTINGS), tmp_path / "local", N, **options)
    # One actor writes the three shards in turn: each actor costs a process that imports torch and
    # diffusers, and the slow tests below run two.
    metadata = on_ray.export("toy", CLASSES, tmp_path / "ray", N, actors=1, **options, **SETTINGS)
    assert metadata == local and metadata["complete"] and metadata["samples"] == N
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")
    samples = read_webdataset(tmp_path / "ray", metadata)
    assert sorted(samples) == INDICES
    assert all(np.array_equal(samples[i]["image.png"], reference[i].image) for i in INDICES)
    assert all(np.array_equal(samples[i]["mask.png"][..., 0], reference[i].mask) for i in INDICES)


def tree(root):
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_importing_the_package_imports_no_ray():
    code = "import sys, ondemand_seg, ondemand_seg.ray, ondemand_seg.ray.__main__; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_without_ray_the_error_names_the_install_command(no_model, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    message = r'pip install "ondemand_seg\[ray\]"'
    with pytest.raises(ModuleNotFoundError, match=message):
        on_ray.generate("toy", CLASSES, 4)
    with pytest.raises(ModuleNotFoundError, match=message):
        on_ray.export("toy", CLASSES, tmp_path / "out", 4)
    with pytest.raises(SystemExit) as exit:
        main(["export", "--out", str(tmp_path / "out"), "--n", "4"])
    assert exit.value.code == 2


@pytest.mark.parametrize("kwargs, error, message", [
    ({"n": 0}, ValueError, "n must be >= 1, got 0"), ({"start": -1}, ValueError, "start must be >= 0, got -1"),
    ({"actors": 0}, ValueError, "actors must be >= 1, got 0"), ({"actors": 1.5}, TypeError, "actors must be an int"),
    ({"num_gpus": -1}, ValueError, "num_gpus must be >= 0, got -1.0"),
    ({"num_cpus": "2"}, TypeError, "num_cpus must be a number, got '2'"),
    ({"num_cpus": float("nan")}, ValueError, "num_cpus must be finite"),
    ({"classes": ["circle", "circle"]}, ValueError, "circle"),
    ({"mask": {"threshold": 2.0}}, ValueError, "threshold"),
    ({"generator": {"batch_size": 0}}, ValueError, "batch_size"),
    ({"model": "no/such/folder"}, FileNotFoundError, "no/such/folder"),
    ({"classes": ["circle", "giraffe"]}, ValueError, "unknown class 'giraffe'"),
    ({"columns": ["index", "label"]}, ValueError, "unknown column 'label'"),
    ({"columns": "image"}, TypeError, "columns must be a non-empty sequence"),
])
def test_bad_arguments_are_named_before_ray_is_handed_anything(kwargs, error, message, no_model, nothing_on_ray):
    arguments = {"model": "toy", "classes": CLASSES, "n": 4, **kwargs}
    with pytest.raises(error, match=message):
        on_ray.generate(arguments.pop("model"), arguments.pop("classes"), arguments.pop("n"), **arguments)


def test_bad_export_arguments_are_named_before_ray_is_handed_anything(no_model, nothing_on_ray, tmp_path):
    (tmp_path / "FILE").write_text("")
    for kwargs, error, message in [
        ({"format": "parquet"}, ValueError, "format must be one of voc, webdataset, hf, got 'parquet'"),
        ({"out": tmp_path / "FILE"}, ValueError, "is a file"), ({"shard_size": 0}, ValueError, "shard_size"),
        ({"overwrite": "yes"}, TypeError, "overwrite"), ({"num_gpus": -1}, ValueError, "num_gpus"),
    ]:
        arguments = {"out": tmp_path / "out", **kwargs}
        with pytest.raises(error, match=message):
            on_ray.export("toy", CLASSES, arguments.pop("out"), 4, **arguments)
    with pytest.raises(SystemExit) as exit:
        main(["export", "--out", str(tmp_path / "out"), "--n", "4", "--actors", "0"])
    assert exit.value.code == 2


def test_an_address_where_no_cluster_listens_is_a_usage_error_not_a_wait(no_model, nothing_on_ray, tmp_path, capsys):
    import socket
    import time

    with socket.socket() as closed:  # a port nothing listens on: bound, then released
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for address, message in [(f"127.0.0.1:{port}", "nothing accepts a connection there"),
                             ("bogus.invalid:1", "nothing accepts a connection there"),
                             ("nohost", "must be 'auto', 'local', HOST:PORT")]:
        started = time.monotonic()
        with pytest.raises(SystemExit) as exit:  # ray.init waited minutes for a cluster's head there
            main(["export", "--out", str(tmp_path / "out"), "--n", "4", "--address", address])
        assert exit.value.code == 2 and message in capsys.readouterr().err
        assert time.monotonic() - started < 30


@pytest.mark.slow
def test_two_actors_stream_to_two_training_workers_every_index_once(ray_instance, reference):
    # Not materialized: the two readers pull rows while the actors generate them.
    # (dataset.columns() would run it once more to see the first block.)
    dataset = on_ray.generate("toy", CLASSES, N, start=START, actors=2, **SETTINGS)
    seen = split_rows(dataset.streaming_split(2, equal=False))
    assert_each_row_once_across(seen, reference)
    assert {tuple(row) for row in sum(seen, [])} == {on_ray.COLUMNS}


@pytest.mark.slow
@pytest.mark.parametrize("fmt, read", [("voc", lambda root, metadata, tmp_path: read_voc(root)),
                                       ("hf", lambda root, metadata, tmp_path: read_hf(root, tmp_path))])
def test_ray_exports_read_back_as_the_local_ones_and_resume(fmt, read, ray_instance, tmp_path, monkeypatch):
    options = dict(start=START, format=fmt, shard_size=3, image_format="png", progress=False)
    local = export(DiffuMaskGenerator("toy", CLASSES, **SETTINGS), tmp_path / "local", N, **options)
    metadata = on_ray.export("toy", CLASSES, tmp_path / "ray", N, actors=2, **options, **SETTINGS)
    assert metadata == local and metadata["complete"]
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")
    assert len(read(tmp_path / "ray", metadata, tmp_path)) == N
    monkeypatch.setattr(ray_instance.data, "from_items", lambda *a, **k: pytest.fail("a finished export ran again"))
    assert on_ray.export("toy", CLASSES, tmp_path / "ray", N, **options, **SETTINGS) == metadata
    with pytest.raises(ExportError, match="seed: 0 -> 1"):
        on_ray.export("toy", CLASSES, tmp_path / "ray", N, seed=1, **options, **SETTINGS)


@pytest.mark.slow
def test_ray_actors_finish_a_killed_export_writing_only_its_unfinished_shards(ray_instance, tmp_path, monkeypatch):
    options = dict(start=START, format="webdataset", shard_size=3, image_format="png", progress=False)
    whole = export(DiffuMaskGenerator("toy", CLASSES, **SETTINGS), tmp_path / "whole", N, **options)
    out = tmp_path / "ray"
    original = DiffuMaskGenerator.samples

    def killed_at_7(self, indices):
        if 7 in indices:
            raise RuntimeError("killed")
        return original(self, indices)

    monkeypatch.setattr(DiffuMaskGenerator, "samples", killed_at_7)  # here only: actors are other processes
    with pytest.raises(RuntimeError, match="killed"):
        export(DiffuMaskGenerator("toy", CLASSES, **SETTINGS), out, N, **options)
    finished = {name: (out / name).stat().st_mtime_ns for name in tree(out) if name != "metadata.json"}
    assert "shard-stats/000000.json" in finished and "shard-stats/000001.json" not in finished
    assert on_ray.export("toy", CLASSES, out, N, actors=2, **options, **SETTINGS) == whole
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished
    assert tree(out) == tree(tmp_path / "whole")


@pytest.mark.slow
def test_the_command_exports_from_ray_actors(tmp_path):
    local = tmp_path / "local"
    export(DiffuMaskGenerator("toy", CLASSES, **SETTINGS), local, N, format="webdataset", shard_size=3,
           image_format="png", progress=False)
    out = tmp_path / "ray"
    done = subprocess.run([sys.executable, "-m", "ondemand_seg.ray", "export", "--out", str(out), "--n", str(N),
                           "--format", "webdataset", "--shard-size", "3", "--image-format", "png", "--classes", *CLASSES,
                           "--gen-steps", "2", "--gen-batch-size", "2", "--actors", "2", "--address", "local",
                           "--num-cpus", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {N} samples (webdataset, 3 shards) to {out} with 2 Ray actor(s)" in done.stdout
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert tree(out) == tree(local)


def test_an_actors_generator_keeps_its_counts_without_shared_semaphores(no_model):
    import multiprocessing.sharedctypes

    pool = on_ray.ActorPool.check(1, 0, 1)
    generator = on_ray.Recipe.of(DiffuMaskGenerator("toy", CLASSES, **SETTINGS), pool).build()
    # A named semaphore in a Ray actor is released at exit through a resource tracker that no longer
    # knows it: one KeyError traceback each from every actor.
    shared = (multiprocessing.sharedctypes.SynchronizedBase,)
    assert not isinstance(generator.gate_stats._values, shared)
    assert not isinstance(generator.oom_retries._value, shared)
    generator.gate_stats.add([None, "empty mask"])
    generator.oom_retries.add()
    counts = generator.counts()
    assert (counts["generated"], counts["accepted"], counts["empty mask"], counts["oom_retries"]) == (2, 1, 1, 1)


@pytest.mark.slow
def test_a_ray_export_writes_again_a_finished_shard_whose_files_were_deleted(ray_instance, tmp_path):
    options = dict(start=START, format="voc", shard_size=3, image_format="png", progress=False)
    whole = export(DiffuMaskGenerator("toy", CLASSES, **SETTINGS), tmp_path / "whole", N, **options)
    shutil.copytree(tmp_path / "whole", tmp_path / "ray")
    lost = [name for name in tree(tmp_path / "ray") if "0000000004." in name]  # sample 4, in finished shard 0
    assert lost
    for name in lost:
        (tmp_path / "ray" / name).unlink()
    assert on_ray.export("toy", CLASSES, tmp_path / "ray", N, **options, **SETTINGS) == whole
    assert tree(tmp_path / "ray") == tree(tmp_path / "whole")


def test_actors_the_cluster_could_never_place_are_refused_not_waited_for(ray_instance, no_model, tmp_path, capsys):
    # The local instance has 2 CPUs and no GPU: Ray would wait for such an actor forever.
    with pytest.raises(on_ray.ClusterTooSmall, match=r"num_gpus=1 per actor, but the Ray cluster has 0 GPU\(s\) in all"):
        on_ray.export("toy", CLASSES, tmp_path / "gpu", N, num_gpus=1, progress=False, **SETTINGS)
    with pytest.raises(on_ray.ClusterTooSmall, match=r"num_cpus=64 per actor, but the Ray cluster has 2 CPU\(s\) in all"):
        on_ray.generate("toy", CLASSES, N, num_cpus=64, **SETTINGS)
    with pytest.raises(SystemExit) as refused:
        main(["export", "--out", str(tmp_path / "cli"), "--n", "4", "--num-gpus", "0.5", "--gen-steps", "2"])
    assert refused.value.code == 2
    assert "num_gpus=0.5 per actor, but the Ray cluster has 0 GPU(s) in all" in capsys.readouterr().err
