"""Which sample index a stream shard serves next, as pure bookkeeping on indices (nothing is
generated here), and how a stream's position moves to another number of shards.

A shard's draw order comes from a :class:`ServingPlan`: first the plan's carried-over entries
that fall to it (every ``shards``-th, from its ``shard_id``), then fresh indices in aligned blocks
of the generation batch: shard ``j`` draws blocks ``j, j + shards, ...`` of ``batch`` indices
from the plan's base. Every batch a shard generates is then one aligned block whatever the
sharding, so sample ``i`` comes out of the same pipeline batch (and so the same bytes) in any
run, export or dataset that generates aligned blocks. :func:`reshard` turns the positions of every shard of one run into
a new plan for any other number of shards (ranks × DataLoader workers): samples drawn but not yet
served ``reuse`` times, and fresh indices a slower shard had not reached, are carried over; fresh
indices restart past the furthest shard. No serving is repeated and no index is skipped.

A finite source (an export) gives the schedule a ``stop``: fresh indices from ``stop`` on are never
drawn, and a shard whose cache empties with nothing left to draw is exhausted. Up to that point it
draws and picks exactly as the endless schedule does.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..generation.seeding import schedule_seed


@dataclass(eq=False)
class CacheEntry:
    """One drawn index in a shard's cache: how often it has been served, and its generated sample
    once drawn (``None`` until then)."""

    index: int
    uses: int = 0
    sample: Any = None


@dataclass(frozen=True)
class ServingPlan:
    """What every shard of a run draws from (the same plan for all of them).

    base: the first fresh index; carried: ``(index, uses)`` of samples to serve before fresh
    ones, ``uses`` servings already made; served: servings made before this plan (so a
    ``num_samples`` quota counts what earlier runs served).
    """

    base: int = 0
    carried: tuple[tuple[int, int], ...] = field(default=())
    served: int = 0

    def to_dict(self) -> dict:
        return {"base": self.base, "carried": [list(c) for c in self.carried], "served": self.served}

    @classmethod
    def from_dict(cls, data: Any) -> "ServingPlan":
        """The plan a state dict holds; an error naming what is malformed."""
        if not isinstance(data, dict) or set(data) != {"base", "carried", "served"}:
            raise ValueError(f"stream state's plan must be a dict with base, carried and served, got {data!r}")
        for key in ("base", "served"):
            if not _is_count(data[key]):
                raise ValueError(f"stream state's plan {key} must be an int >= 0, got {data[key]!r}")
        carried = data["carried"]
        if not isinstance(carried, (list, tuple)) or not all(
                isinstance(c, (list, tuple)) and len(c) == 2 and all(_is_count(v) for v in c) for c in carried):
            raise ValueError("stream state's plan carried must be a list of [index, uses] pairs of ints >= 0")
        return cls(data["base"], tuple((int(i), int(u)) for i, u in carried), data["served"])

    def quota(self, num_samples: int | None, shard_id: int, shards: int) -> int | None:
        """Servings shard ``shard_id`` of ``shards`` makes under this plan, of ``num_samples`` in all."""
        if num_samples is None:
            return None
        remaining = max(0, num_samples - self.served)
        return remaining // shards + (shard_id < remaining % shards)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class ServingSchedule:
    """One shard's serving order under a plan: it draws ``batch`` entries at a time into a cache of
    at most ``cache_size``, serves a random cached entry (from the shard's own schedule seed) and
    drops an entry once served ``reuse`` times. A pure function of its arguments and the count
    served, so replaying ``n`` servings rebuilds the state after them without generating anything.
    ``stop``: the first index a finite source does not hold (``None``: endless).
    """

    def __init__(self, plan: ServingPlan, shard_id: int, shards: int, *, seed: int, batch: int, cache_size: int,
                 reuse: int, stop: int | None = None) -> None:
        self.plan, self.shard_id, self.shards = plan, shard_id, shards
        self.batch, self.cache_size, self.reuse, self.stop = batch, cache_size, reuse, stop
        self.carried = plan.carried[shard_id::shards]
        self.cache: list[CacheEntry] = []
        self.drawn = 0
        self.served = 0
        self.served_since_draw = 0
        self.pick = random.Random(schedule_seed(seed, shard_id, shards, plan.base))

    def _entry(self, position: int) -> CacheEntry | None:
        """The ``position``-th entry of this shard's draw order; ``None`` past a finite source's end
        (fresh indices grow with the position, so every later one is past it too)."""
        if position < len(self.carried):
            index, uses = self.carried[position]
            return CacheEntry(index, uses)
        index = self.fresh_index(position - len(self.carried))
        return CacheEntry(index) if self.stop is None or index < self.stop else None

    @property
    def exhausted(self) -> bool:
        """Whether a finite source has nothing left for this shard: its cache is empty and
        nothing is left to draw."""
        return not self.cache and self._entry(self.drawn) is None

    def fresh_index(self, k: int) -> int:
        """The index of this shard's ``k``-th fresh draw: blocks ``shard_id + shards·b`` of ``batch``."""
        block = self.shard_id + self.shards * (k // self.batch)
        return self.plan.base + block * self.batch + k % self.batch

    def advance(self) -> CacheEntry:
        """Serve one more: draw a batch when the cache has room (at most one draw per batch served,
        so the first samples come out after one batch, not after filling the cache) and return
        the entry served, its ``uses`` counting this serving."""
        if not self.cache or (len(self.cache) + self.batch <= self.cache_size and self.served_since_draw >= self.batch):
            drawn = [e for e in (self._entry(self.drawn + j) for j in range(self.batch)) if e is not None]
            self.cache.extend(drawn)
            self.drawn += len(drawn)
            self.served_since_draw = 0
        if not self.cache:
            raise ValueError(f"shard {self.shard_id} of {self.shards} has served every index below {self.stop} "
                             f"{self.reuse} time(s): nothing is left to serve")
        entry = self.cache[self.pick.randrange(len(self.cache))]
        entry.uses += 1
        self.served += 1
        self.served_since_draw += 1
        if entry.uses >= self.reuse:
            self.cache.remove(entry)
        return entry

    def checkpoint(self) -> tuple:
        """Everything :meth:`advance` changes, for :meth:`rollback`."""
        return ([(e, e.uses) for e in self.cache], self.pick.getstate(), self.drawn, self.served,
                self.served_since_draw)

    def rollback(self, checkpoint: tuple) -> None:
        entries, pick_state, self.drawn, self.served, self.served_since_draw = checkpoint
        self.cache = [e for e, _ in entries]
        for e, uses in entries:
            e.uses = uses
        self.pick.setstate(pick_state)

    def unfinished(self) -> list[tuple[int, int]]:
        """``(index, uses)`` this shard drew, or would draw before the furthest fresh index any
        shard drew, but has not served ``reuse`` times: what another run must still serve."""
        cached = [(e.index, e.uses) for e in self.cache]
        undrawn = list(self.carried[self.drawn:])
        return cached + undrawn

    @property
    def fresh_drawn(self) -> int:
        """How many fresh indices this shard has drawn."""
        return max(0, self.drawn - len(self.carried))


def reshard(states: Sequence[dict], *, seed: int, batch: int, cache_size: int, reuse: int,
            stop: int | None = None) -> ServingPlan:
    """A plan that continues every shard's position in ``states`` (one per shard of a run, any
    order, each as :meth:`~ondemand_seg.DiffuMaskStream.state_dict` wrote it) under any number
    of shards: what they drew and did not finish is carried over, fresh indices a shard had not
    reached below the furthest one are carried as unserved, and fresh indices restart past it.
    ``stop``: a finite source's end, past which nothing is carried.

    Raises:
        ValueError: the states are not exactly the shards ``0 .. shards - 1`` of one run (one plan).
    """
    shards = {state["shards"] for state in states}
    plans = {repr(state["plan"]) for state in states}
    ids = sorted(state["shard_id"] for state in states)
    if len(shards) != 1 or len(plans) != 1 or ids != list(range(next(iter(shards)))):
        raise ValueError(f"stream states to reshard must be every shard of one run, one each; got shards "
                         f"{[(s['shard_id'], s['shards']) for s in states]}")
    count = next(iter(shards))
    plan = ServingPlan.from_dict(states[0]["plan"])
    schedules = []
    for state in sorted(states, key=lambda s: s["shard_id"]):
        schedule = ServingSchedule(plan, state["shard_id"], count, seed=seed, batch=batch, cache_size=cache_size,
                                   reuse=reuse, stop=stop)
        for _ in range(state["served"]):
            schedule.advance()
        schedules.append(schedule)
    # Every block any shard reached, to its end: what lies below the new base.
    blocks = -(-max(s.fresh_drawn for s in schedules) // batch)
    carried = [pair for s in schedules for pair in s.unfinished()]
    carried += [(s.fresh_index(k), 0) for s in schedules for k in range(s.fresh_drawn, blocks * batch)
                if stop is None or s.fresh_index(k) < stop]
    return ServingPlan(base=plan.base + count * blocks * batch, carried=tuple(sorted(carried)),
                       served=plan.served + sum(s.served for s in schedules))
