"""The stream's serving schedule on indices alone, and resharding a run's position to another
number of ranks × workers: no serving repeated, no index skipped."""
import collections
import random

import pytest

from ondemand_seg.data.schedule import ServingPlan, ServingSchedule, reshard

SETTINGS = dict(seed=0, batch=2, cache_size=6)


def run(plan, shards, servings, reuse, served=None):
    """Serve ``servings[j]`` from shard ``j`` of ``shards``; the indices served (with repeats) and
    each shard's state as the stream saves it."""
    indices, states = [], []
    for shard_id in range(shards):
        schedule = ServingSchedule(plan, shard_id, shards, reuse=reuse, **SETTINGS)
        for _ in range(servings[shard_id]):
            indices.append(schedule.advance().index)
        states.append({"served": schedule.served, "shard_id": shard_id, "shards": shards, "plan": plan.to_dict()})
    return indices, states


def accounted(plan, counts, reuse):
    """Every index below the plan's fresh base is served ``reuse`` times or carried with the
    servings it has had; nothing at or above the base was served."""
    carried = dict(plan.carried)
    assert len(carried) == len(plan.carried), "an index is carried twice"
    for index in range(plan.base):
        assert counts[index] == carried.get(index, reuse), (index, counts[index], carried.get(index))
    assert not [i for i in counts if i >= plan.base], "a fresh index was served before its plan"
    assert all(uses < reuse for uses in carried.values())


@pytest.mark.parametrize("reuse", [1, 2, 3])
def test_two_by_two_to_one_by_three_to_three_by_one_serves_each_index_reuse_times(reuse):
    counts = collections.Counter()
    plan = ServingPlan()
    # 2 ranks x 2 workers (4 shards) at uneven positions, then 1 x 3, then 3 x 1.
    for shards, servings in ((4, [7, 3, 11, 0]), (3, [5, 9, 2]), (3, [4, 4, 13])):
        indices, states = run(plan, shards, servings, reuse)
        counts.update(indices)
        assert max(counts.values()) <= reuse, "an index was served more than reuse times"
        plan = reshard(states, reuse=reuse, **SETTINGS)
        accounted(plan, counts, reuse)
        assert plan.served == sum(counts.values())
    # Serving on under the last plan finishes every index below its base, and no more than that.
    schedule = ServingSchedule(plan, 0, 1, reuse=reuse, **SETTINGS)
    for _ in range(reuse * (len(plan.carried) + SETTINGS["cache_size"]) * 4):
        counts[schedule.advance().index] += 1
    assert all(counts[i] == reuse for i in range(plan.base))
    assert max(counts.values()) <= reuse


def test_the_same_sharding_continues_the_same_order():
    plan = ServingPlan()
    whole = ServingSchedule(plan, 1, 3, reuse=2, **SETTINGS)
    order = [whole.advance().index for _ in range(20)]
    resumed = ServingSchedule(plan, 1, 3, reuse=2, **SETTINGS)
    for _ in range(8):
        resumed.advance()
    assert [resumed.advance().index for _ in range(12)] == order[8:]


def test_a_fresh_plan_draws_aligned_blocks_of_the_batch_by_turns():
    schedules = [ServingSchedule(ServingPlan(), j, 3, reuse=1, **SETTINGS) for j in range(3)]
    served = [sorted(s.advance().index for _ in range(4)) for s in schedules]
    assert served == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]


def test_a_resharded_plan_is_random_over_shards_and_orders():
    rng = random.Random(0)
    for _ in range(20):
        shards = rng.randint(1, 5)
        plan, counts = ServingPlan(), collections.Counter()
        for _ in range(3):
            indices, states = run(plan, shards, [rng.randint(0, 15) for _ in range(shards)], reuse=2)
            counts.update(indices)
            rng.shuffle(states)  # any order of the shards' states
            plan = reshard(states, reuse=2, **SETTINGS)
            accounted(plan, counts, 2)
            shards = rng.randint(1, 5)


def test_reshard_refuses_a_missing_or_repeated_shard_and_mixed_plans():
    _, states = run(ServingPlan(), 3, [2, 2, 2], reuse=1)
    with pytest.raises(ValueError, match="every shard of one run"):
        reshard(states[:2], reuse=1, **SETTINGS)
    with pytest.raises(ValueError, match="every shard of one run"):
        reshard(states + states[:1], reuse=1, **SETTINGS)
    other = dict(states[0], plan=ServingPlan(base=9).to_dict())
    with pytest.raises(ValueError, match="every shard of one run"):
        reshard([other, *states[1:]], reuse=1, **SETTINGS)


@pytest.mark.parametrize("plan, message", [
    ({"base": -1, "carried": [], "served": 0}, "plan base must be an int >= 0"),
    ({"base": 0, "carried": [[1]], "served": 0}, r"carried must be a list of \[index, uses\]"),
    ({"base": 0, "carried": [], "served": "2"}, "plan served must be an int"),
    ({"base": 0, "carried": []}, "plan must be a dict with base, carried and served"),
    ([0, [], 0], "plan must be a dict"),
])
def test_malformed_plans_are_refused(plan, message):
    with pytest.raises(ValueError, match=message):
        ServingPlan.from_dict(plan)


def test_a_quota_counts_what_earlier_plans_served():
    assert ServingPlan(served=10).quota(25, 0, 4) == 4 and ServingPlan(served=10).quota(25, 3, 4) == 3
    assert ServingPlan(served=30).quota(25, 0, 2) == 0
    assert ServingPlan().quota(None, 0, 2) is None


def test_a_finite_schedule_draws_as_the_endless_one_below_its_stop_then_exhausts():
    endless = ServingSchedule(ServingPlan(), 0, 2, reuse=2, **SETTINGS)
    finite = ServingSchedule(ServingPlan(), 0, 2, reuse=2, stop=11, **SETTINGS)
    served = []
    while not finite.exhausted:
        served.append(finite.advance().index)
    # Shard 0 of 2 holds blocks 0, 2, 4 of 2 indices: 0, 1, 4, 5, 8, 9 (10 is shard 1's).
    assert collections.Counter(served) == dict.fromkeys([0, 1, 4, 5, 8, 9], 2)
    assert [endless.advance().index for _ in range(4)] == served[:4], "the same picks before the stop"
    with pytest.raises(ValueError, match="shard 0 of 2 has served every index below 11 2 time"):
        finite.advance()
    # Resharded part-way, nothing at or past the stop is carried: shard 0 served all of 0, 1, 4,
    # shard 1 one of 2, 3; the endless blocks' 5, 6, 7 do not exist.
    states = []
    for shard_id, count in ((0, 3), (1, 1)):
        schedule = ServingSchedule(ServingPlan(), shard_id, 2, reuse=1, stop=5, **SETTINGS)
        for _ in range(count):
            schedule.advance()
        states.append({"served": count, "shard_id": shard_id, "shards": 2, "plan": ServingPlan().to_dict()})
    plan = reshard(states, reuse=1, stop=5, **SETTINGS)
    assert len(plan.carried) == 1 and plan.carried[0][0] in (2, 3)
