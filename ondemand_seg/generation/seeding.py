"""Every seed in the library comes from here.

A seed is NumPy's ``SeedSequence`` hash of the base seed and a tuple of integer keys. Each use has
its own key layout, and no two layouts can produce the same tuple (they differ in length or in
the tag they end with), so no two uses ever share a seed:

==========================  ===============================  ======================================
use                         keys                             function
==========================  ===============================  ======================================
sample latent noise         ``(index, attempt, IMAGE)``      :func:`sample_seed`
sample prompt               ``(index, attempt, PROMPT)``     :func:`sample_seed`
sample augmentation         ``(index, attempt, AUGMENT, u)`` :func:`augment_seed` (``u``: the use)
splice layout               ``(1,)`` under an aug. seed     :func:`splice_generator`
stream serving order        ``(shard, shards, SCHEDULE)``    :func:`schedule_seed`
... after a reshard         ``(shard, shards, SCHEDULE, b)`` :func:`schedule_seed` (``b``: plan base)
calibration image / prompt  ``(class, k, CALIBRATION, s)``   :func:`calibration_seed`
evaluation sample           ``(index,)``                     :func:`evaluation_seed`
serving of a real sample    ``(shard, shards, SERVING, n)``  :func:`serving_seed`
==========================  ===============================  ======================================

A sample is named by its global index and a retry counter (a rejected sample is redrawn with the
next attempt); its seeds depend on (base seed, index, attempt) alone, so sample ``i`` is the same
whatever the batch, worker or rank that draws it.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np


class SubStream(IntEnum):
    """The tag that ends (or, for augmentation, calibration, servings and resharded schedules, stands
    third in) a key tuple."""

    IMAGE = 0
    PROMPT = 1
    AUGMENT = 2
    SCHEDULE = 3
    CALIBRATION = 4
    SERVING = 5


def derive_seed(base_seed: int, *keys: int) -> int:
    """A 63-bit seed from ``base_seed`` and integer ``keys`` (NumPy's SeedSequence hashing, so
    nearby keys give unrelated seeds). Use the named functions below rather than calling this."""
    words = np.random.SeedSequence(entropy=int(base_seed), spawn_key=tuple(int(k) for k in keys)).generate_state(2)
    return int((int(words[0]) << 32 | int(words[1])) & (2**63 - 1))


def sample_keys(index: int, attempt: int, stream: SubStream) -> tuple[int, ...]:
    """Key tuple of a training sample's latent noise (``IMAGE``) or prompt (``PROMPT``)."""
    if stream not in (SubStream.IMAGE, SubStream.PROMPT):
        raise ValueError(f"a sample's own seeds are IMAGE or PROMPT, got {stream!r}")
    return (int(index), int(attempt), int(stream))


def sample_seed(base_seed: int, index: int, attempt: int, stream: SubStream) -> int:
    """Seed of sample ``index`` at retry ``attempt``: its latent noise or its prompt draw."""
    return derive_seed(base_seed, *sample_keys(index, attempt, stream))


def augment_seed(base_seed: int, index: int, attempt: int, use: int = 0) -> int:
    """Seed of the ``use``-th augmentation of sample ``index`` (retry ``attempt``)."""
    return derive_seed(base_seed, int(index), int(attempt), int(SubStream.AUGMENT), int(use))


def splice_generator(seed: int | None) -> np.random.Generator:
    """The generator that draws a splice layout under an augmentation seed, apart from the
    augmentation library's own generator, which is seeded with ``seed`` itself. Its entropy is the
    augmentation seed, not the base seed, so its key shares no space with the layouts above."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))


def schedule_seed(base_seed: int, shard_id: int, shards: int, plan_base: int = 0) -> int:
    """Seed of one stream shard's serving order (which cached sample is served next); a plan that
    continues a run under other sharding (``plan_base`` > 0, its first fresh index) has its own."""
    if plan_base == 0:
        return derive_seed(base_seed, int(shard_id), int(shards), int(SubStream.SCHEDULE))
    return derive_seed(base_seed, int(shard_id), int(shards), int(SubStream.SCHEDULE), int(plan_base))


def calibration_keys(class_id: int, k: int, stream: SubStream) -> tuple[int, ...]:
    """Key tuple of calibration sample ``k`` of ``class_id``: four keys, tagged ``CALIBRATION``
    third, so it never equals a training sample's three keys or an augmentation's tag."""
    if stream not in (SubStream.IMAGE, SubStream.PROMPT):
        raise ValueError(f"a calibration sample's seeds are IMAGE or PROMPT, got {stream!r}")
    return (int(class_id), int(k), int(SubStream.CALIBRATION), int(stream))


def calibration_seed(base_seed: int, class_id: int, k: int, stream: SubStream) -> int:
    """Seed of calibration sample ``k`` of class ``class_id`` (latent noise or prompt)."""
    return derive_seed(base_seed, *calibration_keys(class_id, k, stream))


def serving_seed(base_seed: int, shard_id: int, shards: int, serving: int) -> int:
    """Seed of the ``serving``-th item a shard (one rank's DataLoader worker, :func:`shard`) serves
    from a dataset that cannot name its samples' seeds itself, e.g. real images augmented at each
    epoch: the seed follows the serving order, which the sampler fixes."""
    return derive_seed(base_seed, int(shard_id), int(shards), int(SubStream.SERVING), int(serving))


def evaluation_seed(base_seed: int, index: int) -> int:
    """Seed of evaluation sample ``index`` (benchmarks): one key, apart from every other layout."""
    return derive_seed(base_seed, int(index))
