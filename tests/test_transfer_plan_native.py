"""The native TransferPlanner plans exactly what the v1 connector's Python planning did before it
moved into the core (commit 0e876b2): the same loads, saves, conditional saves, step numbers and
loads-off switch, over random sequences of lookups, allocations, steps (new, cached, resumed
requests), confirmations, failures and finished requests. `Reference` is that Python, kept here
as the specification the port must match."""

from __future__ import annotations

import random
from typing import Any

from xconnector._native import TransferPlanner

Load = tuple[str, int, list[int], int]
Save = tuple[str, int, list[int], bool]


class Reference:
    """The connector's scheduler-side planning as it was written in Python."""

    def __init__(self, block_size: int, engine_block: int, world: int, unconfirmed: int) -> None:
        self.bs, self.eb, self.world, self.unconfirmed = (
            block_size,
            engine_block,
            world,
            unconfirmed,
        )
        self.tracked: dict[str, list[Any]] = {}  # req -> [num_tokens, block_ids, saved]
        self.pending: dict[str, Load] = {}
        self.local: dict[str, int] = {}
        self.inflight: dict[int, set[int]] = {}
        self.step, self.off = 0, False

    def note_lookup(self, rid: str, local_hit: int) -> None:
        self.local[rid] = local_hit

    def plan_load(self, rid: str, external: int, ids: list[int]) -> None:
        if external <= 0:
            self.pending.pop(rid, None)
            return
        local = self.local.get(rid, 0)
        total = local + external
        self.pending[rid] = (rid, total, ids[: total // self.bs], local // self.bs)

    def begin_step(self) -> tuple[int, int | None]:
        self.step += 1
        turned_off = None
        if self.inflight:
            oldest = min(self.inflight)
            if self.step - oldest > self.unconfirmed and not self.off:
                self.off, turned_off = True, self.step - oldest
        return self.step, turned_off

    def schedule_new(
        self, rid: str, num_tokens: int, ids: list[int], computed: int
    ) -> tuple[Load | None, Save | None]:
        self.tracked[rid] = [num_tokens, list(ids), False]
        return self._plan(rid, computed)

    def schedule_cached(
        self, rid: str, new_ids: list[int] | None, resumed: bool, computed: int
    ) -> tuple[Load | None, Save | None]:
        tracked = self.tracked.get(rid)
        if tracked is None:
            return None, None
        if resumed:
            tracked[1] = list(new_ids) if new_ids is not None else []
        elif new_ids:
            tracked[1].extend(new_ids)
        return self._plan(rid, computed)

    def _plan(self, rid: str, computed: int) -> tuple[Load | None, Save | None]:
        tracked = self.tracked[rid]
        load = self.pending.pop(rid, None)
        if load is not None:
            self.inflight.setdefault(self.step, set()).update(load[2][load[3] :])
        if tracked[2] or computed < tracked[0]:
            return load, None
        full = tracked[0] // self.eb * self.eb
        save_blocks = tracked[1][: full // self.bs]
        if not full or len(save_blocks) < full // self.bs:
            tracked[2] = True
            return load, None
        waits = {s for s, ids in self.inflight.items() if not ids.isdisjoint(save_blocks)}
        if waits and (waits != {self.step} or self.world != 1):
            return load, None
        tracked[2] = True
        return load, (rid, full, save_blocks, bool(waits))

    def confirm(self, steps: list[int], failed: list[str]) -> None:
        for step in steps:
            self.inflight.pop(step, None)
        for rid in failed:
            if rid in self.tracked:
                self.tracked[rid][2] = False

    def finished(self, rid: str) -> None:
        for d in (self.tracked, self.pending, self.local):
            d.pop(rid, None)


def plain(planned: Any) -> tuple[Any, Any]:
    load, save = planned
    return (
        None if load is None else (load[0], load[1], list(load[2]), load[3]),
        None if save is None else (save[0], save[1], list(save[2]), save[3]),
    )


def test_the_native_planner_plans_what_the_python_planning_did() -> None:
    rng = random.Random(20261202)
    for _ in range(1500):
        bs = rng.choice([1, 2, 4, 16])
        eb, world, limit = (
            bs * rng.choice([1, 2, 3]),
            rng.choice([1, 1, 2]),
            rng.choice([1, 2, 256]),
        )
        ref, native = Reference(bs, eb, world, limit), TransferPlanner(bs, eb, world, limit)
        for _ in range(40):
            rid, k = rng.choice("abcd"), rng.random()

            def ids() -> list[int]:
                return [rng.randint(0, 12) for _ in range(rng.randint(0, 8))]

            if k < 0.15:
                hit = rng.randint(0, 20) * bs // 4
                ref.note_lookup(rid, hit)
                native.note_lookup(rid, hit)
            elif k < 0.3:
                external, blocks = rng.randint(0, 20), ids()
                ref.plan_load(rid, external, blocks)
                native.plan_load(rid, external, blocks)
            elif k < 0.4:
                assert ref.begin_step() == tuple(native.begin_step())
            elif k < 0.6:
                n, blocks, computed = rng.randint(0, 20), ids(), rng.randint(0, 22)
                want = ref.schedule_new(rid, n, blocks, computed)
                assert plain(native.schedule_new(rid, n, blocks, computed)) == plain(want)
            elif k < 0.8:
                blocks = ids() if rng.random() < 0.7 else None
                resumed, computed = rng.random() < 0.2, rng.randint(0, 22)
                want = ref.schedule_cached(rid, blocks, resumed, computed)
                got = native.schedule_cached(rid, blocks, resumed, computed)
                assert plain(got) == plain(want)
            elif k < 0.92:
                steps = sorted({rng.randint(0, ref.step + 1) for _ in range(rng.randint(0, 3))})
                failed = sorted({rng.choice("abcd") for _ in range(rng.randint(0, 2))})
                ref.confirm(steps, failed)
                native.confirm(steps, failed)
            else:
                ref.finished(rid)
                native.finished(rid)
            assert native.loads_off == ref.off
