"""Faults lose nothing: a failed ``next()`` leaves the stream's schedule where it was, and running
out of memory retries with a smaller generation batch and yields the very same samples."""
import itertools
import logging
import threading

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ondemand_seg import DiffuMaskDataset, DiffuMaskStream, GeneratorConfig
from ondemand_seg.generation.generator import CapturingPipeline

CLASSES = ["ring", "square"]


def untransformed(image, target):
    return image, target


def toy(**options):
    """The embedded toy model at its 32x32 size, 2 steps, batches of 4, samples left as PIL."""
    return dict(dict(generator=GeneratorConfig(num_inference_steps=2, batch_size=4), transforms=untransformed), **options)


def as_bytes(pair):
    image, target = pair
    return np.asarray(image).tobytes(), np.asarray(target).tobytes()


class Failing:
    """Wraps ``generate``: raises ``error`` on the calls numbered in ``fail_on`` (from 0), records
    every call's batch size."""

    def __init__(self, generate, error, fail_on):
        self.generate, self.error, self.fail_on = generate, error, set(fail_on)
        self.sizes = []

    def __call__(self, prompts, *args, **kwargs):
        call = len(self.sizes)
        self.sizes.append(len(prompts))
        if call in self.fail_on:
            raise self.error
        return self.generate(prompts, *args, **kwargs)


def oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def inject(source, error, fail_on):
    failing = Failing(source.capturing.generate, error, fail_on)
    source.capturing.generate = failing
    return failing


@pytest.fixture(scope="module")
def reference():
    """Eight fault-free samples of the stream the tests below break."""
    return [as_bytes(p) for p in DiffuMaskStream("toy", CLASSES, num_samples=8, **toy())]


def test_one_oom_retries_with_half_the_batch_and_yields_the_same_samples(reference, caplog):
    stream = DiffuMaskStream("toy", CLASSES, num_samples=8, **toy())
    failing = inject(stream.source, oom(), fail_on=[0])
    with caplog.at_level(logging.WARNING, logger="ondemand_seg.generation.generator"):
        served = [as_bytes(p) for p in stream]
    assert len(set(reference)) == 8, "the reference has eight distinct samples"
    assert served == reference, "every index once, in order, byte for byte"
    assert failing.sizes == [4, 2, 2, 2, 2], "halved once, and kept halved for the rest of the process"
    assert stream.stats()["oom_retries"] == 1
    assert stream.stats()["accepted"] == 8
    assert "ran out of memory at batch size 4" in caplog.text and "retrying with 2" in caplog.text


def test_oom_at_batch_one_is_a_clear_error_and_serves_nothing():
    stream = DiffuMaskStream("toy", CLASSES, num_samples=8, **toy())
    iterator = iter(stream)
    failing = inject(stream.source, oom(), fail_on=range(100))
    with pytest.raises(torch.OutOfMemoryError, match=r"every generation batch size tried \(4, 2, 1; configured "
                                                     r"generator.batch_size=4\).*lower image_size") as raised:
        next(iterator)
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError), "the original error is chained"
    assert failing.sizes == [4, 2, 1]
    assert stream.stats()["oom_retries"] == 2
    assert stream.state_dict()["served"] == 0


@pytest.mark.parametrize("where", ["generation", "transform"])
def test_failed_next_serves_the_same_sample_next_and_resumes_exactly(where):
    options = toy(reuse=2, cache_size=8)
    whole = [as_bytes(p) for p in itertools.islice(iter(DiffuMaskStream("toy", CLASSES, **options)), 12)]

    calls = []

    def transform_failing_once(image, target):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("boom in transform")
        return image, target

    if where == "transform":
        options = dict(options, transforms=transform_failing_once)
    stream = DiffuMaskStream("toy", CLASSES, **options)
    iterator = iter(stream)
    if where == "generation":
        # The second draw (indices 4..7) happens at the fifth serving.
        inject(stream.source, RuntimeError("boom in generation"), fail_on=[1])
    served, state_after_failure = [], None
    while len(served) < 12:
        try:
            served.append(as_bytes(next(iterator)))
        except RuntimeError as error:
            assert "boom" in str(error) and state_after_failure is None, "exactly one failure surfaces"
            state_after_failure = stream.state_dict()
    failed_at = 4 if where == "generation" else 5
    position = {key: state_after_failure[key] for key in ("served", "shard_id", "shards")}
    assert position == {"served": failed_at, "shard_id": 0, "shards": 1}, "the failed serving is not counted"
    assert served == whole, "the next call yields the sample that failed, and nothing is lost or repeated"

    resumed = DiffuMaskStream("toy", CLASSES, **options)  # the same transform: a function is known by its name
    resumed.load_state_dict(state_after_failure)
    rest = [as_bytes(p) for p in itertools.islice(iter(resumed), 12 - failed_at)]
    assert rest == whole[failed_at:]


def test_dataset_retries_oom_with_the_same_items():
    expected = [as_bytes(p) for p in DiffuMaskDataset("toy", CLASSES, length=4, **toy()).__getitems__([0, 1, 2, 3])]
    dataset = DiffuMaskDataset("toy", CLASSES, length=4, **toy())
    failing = inject(dataset.source, oom(), fail_on=[0])
    assert [as_bytes(p) for p in dataset.__getitems__([0, 1, 2, 3])] == expected
    assert failing.sizes == [4, 2, 2]
    assert dataset.stats()["oom_retries"] == 1


def test_oom_retries_in_a_worker_are_counted_in_the_main_process(reference, monkeypatch):
    generate, failed = CapturingPipeline.generate, []

    def generate_failing_once(sampler, *args, **kwargs):
        if not failed:
            failed.append(True)
            raise oom()
        return generate(sampler, *args, **kwargs)

    # Patched on the class before the forked worker starts, so the worker's own sampler fails once.
    monkeypatch.setattr(CapturingPipeline, "generate", generate_failing_once)
    stream = DiffuMaskStream("toy", CLASSES, num_samples=8, **toy())
    loader = DataLoader(stream, batch_size=None, num_workers=1, multiprocessing_context="fork")
    served = [as_bytes(p) for p in loader]
    assert served == reference
    assert not failed, "the failure happened in the worker, not here"
    assert stream.stats()["oom_retries"] == 1 and stream.stats()["accepted"] == 8


def run_in_threads(work, count=2):
    """``work(n)`` in ``count`` threads at once; their results by ``n``, and any exception re-raised."""
    results, errors = {}, []

    def run(n):
        try:
            results[n] = work(n)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    if errors:
        raise errors[0]
    return results


def test_two_threads_iterating_one_stream_each_get_the_reference_sequence(reference):
    stream = DiffuMaskStream("toy", CLASSES, num_samples=8, **toy())
    results = run_in_threads(lambda n: [as_bytes(p) for p in stream])
    assert results == {0: reference, 1: reference}


def test_two_threads_sharing_one_iterator_split_the_sequence(reference):
    iterator = iter(DiffuMaskStream("toy", CLASSES, num_samples=8, **toy()))
    results = run_in_threads(lambda n: [as_bytes(p) for p in iterator])
    assert sorted(results[0] + results[1]) == sorted(reference), "each sample served once, none corrupted"


def test_two_threads_indexing_one_dataset_get_the_reference_items():
    def make():
        return DiffuMaskDataset("toy", CLASSES, length=8, cache_size=4, **toy())

    reference = [as_bytes(make()[i]) for i in range(8)]
    dataset = make()
    results = run_in_threads(lambda n: [as_bytes(dataset[i]) for i in (range(8) if n == 0 else reversed(range(8)))])
    assert results[0] == reference and results[1] == reference[::-1]


def test_a_worker_forked_while_another_thread_draws_does_not_wait_on_its_lock(reference):
    stream = DiffuMaskStream("toy", CLASSES, num_samples=8, **toy())
    holding, release = threading.Event(), threading.Event()

    def draw_slowly():
        with stream.source.lock:  # as a thread in the middle of a draw holds it
            holding.set()
            release.wait(timeout=120)

    thread = threading.Thread(target=draw_slowly)
    thread.start()
    holding.wait(timeout=60)
    try:
        loader = DataLoader(stream, batch_size=None, num_workers=1, multiprocessing_context="fork", timeout=120)
        served = [as_bytes(pair) for pair in loader]
    finally:
        release.set()
        thread.join()
    assert served == reference


def test_state_dict_counts_only_servings_returned(monkeypatch):
    import time

    stream = DiffuMaskStream("toy", CLASSES, num_samples=8, **toy())
    iterator = iter(stream)
    next(iterator), next(iterator)
    started = threading.Event()
    real_samples = stream.source.samples

    def slow_failure(indices):
        started.set()
        time.sleep(1.0)
        raise RuntimeError("boom")

    monkeypatch.setattr(stream.source, "samples", slow_failure)
    while iterator.schedule.cache and all(e.sample is not None for e in iterator.schedule.cache):
        next(iterator)  # serve from the cache until the next serving must generate
    before = stream.state_dict()["served"]
    failed = []
    thread = threading.Thread(target=lambda: failed.append(pytest.raises(RuntimeError, next, iterator)))
    thread.start()
    started.wait(timeout=60)
    assert stream.state_dict()["served"] == before, "a serving in flight is not counted"
    thread.join()
    assert stream.state_dict()["served"] == before, "nor once it failed"
    monkeypatch.setattr(stream.source, "samples", real_samples)
    next(iterator)
    assert stream.state_dict()["served"] == before + 1
