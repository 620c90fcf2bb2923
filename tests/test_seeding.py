import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ondemand_seg.generation.seeding as seeding
from ondemand_seg.data.sharding import shard, split_by_node, split_by_worker
from ondemand_seg.generation.seeding import (
    SubStream,
    augment_seed,
    calibration_keys,
    calibration_seed,
    derive_seed,
    evaluation_seed,
    sample_keys,
    sample_seed,
    schedule_seed,
    serving_seed,
    splice_generator,
)

BASE = 1234
SAMPLE_STREAMS = (SubStream.IMAGE, SubStream.PROMPT)


def test_derive_seed_is_deterministic_63_bit_and_key_sensitive():
    assert derive_seed(BASE, 1, 2) == derive_seed(BASE, 1, 2)
    seeds = [derive_seed(base, *keys) for base in (0, 1, BASE)
             for keys in [(), (0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)


def test_evaluation_seed_is_the_one_key_derive_seed():
    for base in (0, 7, BASE):
        for index in range(50):
            assert evaluation_seed(base, index) == derive_seed(base, index)


def test_sample_seed_uses_its_key_layout():
    for index, attempt, stream in itertools.product(range(5), range(3), SAMPLE_STREAMS):
        assert sample_keys(index, attempt, stream) == (index, attempt, int(stream))
        assert sample_seed(BASE, index, attempt, stream) == derive_seed(BASE, *sample_keys(index, attempt, stream))
    for stream in (SubStream.AUGMENT, SubStream.SCHEDULE, SubStream.CALIBRATION):
        with pytest.raises(ValueError, match="IMAGE or PROMPT"):
            sample_keys(0, 0, stream)
        with pytest.raises(ValueError, match="IMAGE or PROMPT"):
            calibration_keys(0, 0, stream)


def test_calibration_keys_never_equal_sample_keys():
    # Structural: a calibration key tuple has four entries, a sample's three, so no inputs make them equal.
    calibration = {calibration_keys(c, k, s) for c, k, s in itertools.product(range(51), range(51), SAMPLE_STREAMS)}
    samples = {sample_keys(i, a, s) for i, a, s in itertools.product(range(51), range(51), SAMPLE_STREAMS)}
    assert len(calibration) == len(samples) == 51 * 51 * 2
    assert not calibration & samples
    assert {len(k) for k in calibration} == {4} and {len(k) for k in samples} == {3}
    # Augmentation keys are four long too; they carry AUGMENT third where calibration carries CALIBRATION.
    augment = {(i, a, int(SubStream.AUGMENT), u) for i, a, u in itertools.product(range(51), range(51), range(4))}
    assert not calibration & augment
    for index, attempt, use in itertools.product(range(5), range(3), range(3)):
        assert augment_seed(BASE, index, attempt, use) == derive_seed(BASE, index, attempt, int(SubStream.AUGMENT), use)
    # The old calibration layout, (3, class, k), was training sample 3's (index, attempt, stream):
    old = {(3, c, k) for c, k in itertools.product(range(51), range(2))}
    assert old <= samples, "the check above would have caught the old layout"


def test_calibration_seeds_never_equal_training_seeds():
    calibration = {calibration_seed(BASE, c, k, s) for c, k, s in itertools.product(range(51), range(51), SAMPLE_STREAMS)}
    training = {sample_seed(BASE, i, a, s) for i, a, s in itertools.product(range(51), range(4), SAMPLE_STREAMS)}
    assert len(calibration) == 51 * 51 * 2 and not calibration & training
    assert derive_seed(BASE, 3, 1, 0) in training, "the old calibration seed of class 1 was a training seed"


def all_layouts(base):
    """Every named seed function over a range of its keys: ``{(layout, keys): seed}``."""
    seeds = {}
    for i, a, s in itertools.product(range(20), range(3), SAMPLE_STREAMS):
        seeds["sample", i, a, s] = sample_seed(base, i, a, s)
    for i, a, u in itertools.product(range(20), range(3), range(3)):
        seeds["augment", i, a, u] = augment_seed(base, i, a, u)
    for shards in range(1, 9):
        for shard_id in range(shards):
            seeds["schedule", shard_id, shards] = schedule_seed(base, shard_id, shards)
            for plan_base in (1, 2, 4, 96):
                seeds["resharded schedule", shard_id, shards, plan_base] = schedule_seed(base, shard_id, shards, plan_base)
    for c, k, s in itertools.product(range(21), range(10), SAMPLE_STREAMS):
        seeds["calibration", c, k, s] = calibration_seed(base, c, k, s)
    for i in range(200):
        seeds["evaluation", i] = evaluation_seed(base, i)
    for shards in (1, 2, 4):
        for shard_id, n in itertools.product(range(shards), range(20)):
            seeds["serving", shard_id, shards, n] = serving_seed(base, shard_id, shards, n)
    return seeds


def test_every_layout_gives_distinct_seeds_for_distinct_keys():
    seeds = all_layouts(BASE)
    assert len(set(seeds.values())) == len(seeds), "two uses share a seed"
    # and the same keys under another base seed give other seeds
    assert not set(seeds.values()) & set(all_layouts(BASE + 1).values())


def test_splice_generator_is_seeded_apart_from_the_augmentation_seed():
    seed = augment_seed(BASE, 5, 0)
    draws = splice_generator(seed).integers(0, 2**31, 8)
    assert np.array_equal(draws, splice_generator(seed).integers(0, 2**31, 8))
    assert not np.array_equal(draws, np.random.default_rng(seed).integers(0, 2**31, 8))
    assert not np.array_equal(draws, splice_generator(augment_seed(BASE, 5, 0, 1)).integers(0, 2**31, 8))


def test_shard_without_workers_or_ranks():
    assert split_by_node() == (0, 1) and split_by_worker() == (0, 1) and shard() == (0, 1)


def test_shard_counts_workers_within_ranks(monkeypatch):
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=3))
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    assert split_by_worker() == (1, 3) and split_by_node() == (2, 4)
    assert shard() == (2 * 3 + 1, 4 * 3)
    # Every (rank, worker) pair gets its own shard.
    ids = set()
    for rank, worker in itertools.product(range(4), range(3)):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda w=worker: SimpleNamespace(id=w, num_workers=3))
        monkeypatch.setattr(torch.distributed, "get_rank", lambda r=rank: r)
        ids.add(shard())
    assert ids == {(s, 12) for s in range(12)}
