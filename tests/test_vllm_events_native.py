"""The core's vLLM event rules (`VllmBlockNames`, `VllmRankAgreement`) against the pure-Python
implementation `xconnector.integrations.vllm.kv_events` had before they moved to Rust: the same
names, parents, extra keys and mediums for random engine changes, and the same announcements for
random rank reports. No vLLM needed."""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from typing import Any

import pytest

from xconnector import native
from xconnector.exceptions import InvalidInputError

MEDIUMS = {"memory": "CPU", "disk": "STORAGE"}


def old_sub_id(chunk_hash: int, j: int, k: int) -> int:
    if k == 1:
        return chunk_hash
    raw = chunk_hash.to_bytes(8, "little") + j.to_bytes(4, "little")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


class OldNames:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.learnt: OrderedDict[int, list[Any]] = OrderedDict()
        self.reported: dict[tuple[str, int], list[Any]] = {}

    def learn(
        self, engine_block: int, block_size: int, tokens: list[int], names: list[Any]
    ) -> None:
        k = engine_block // block_size
        for i, h in enumerate(native().sequence_hashes(tokens, engine_block)):
            if (i + 1) * k > len(names):
                break
            self.learnt[h] = names[i * k : (i + 1) * k]
            self.learnt.move_to_end(h)
        while len(self.learnt) > self.capacity:
            self.learnt.popitem(last=False)

    def of(self, h: int, k: int, medium: str | None = None) -> list[Any]:
        if medium is not None and (medium, h) in self.reported:
            return self.reported[(medium, h)]
        learnt = self.learnt.get(h)
        return learnt if learnt is not None else [old_sub_id(h, j, k) for j in range(k)]

    def stored(self, medium: str, h: int, k: int) -> list[Any]:
        self.reported[(medium, h)] = names = self.of(h, k, medium)
        return names

    def removed(self, medium: str, h: int, k: int) -> list[Any]:
        return self.reported.pop((medium, h), None) or self.of(h, k)


def old_extra_keys(n: int, first: bool, lora: str | None, salt: str | None) -> Any:
    head = (lora,) if lora else ()
    keys: list[tuple[Any, ...] | None] = [head or None] * n
    if salt and first and n:
        keys[0] = (*head, salt)
    return keys if any(keys) else None


def old_events(changes: list[Any], bs: int, engine_block: int, names: OldNames) -> list[Any]:
    k = engine_block // bs
    out: list[Any] = []
    for kind, medium, parent, hashes, tokens, lora, salt in changes:
        if kind == "removed":
            ids = [n for h in hashes for n in names.removed(medium, h, k)]
            out.append(("removed", MEDIUMS[medium], ids, None, [], None, None))
            continue
        ids = [n for h in hashes for n in names.stored(medium, h, k)]
        up = None if parent is None else names.of(parent, k, medium)[-1]
        keys = old_extra_keys(len(ids), parent is None, lora, salt)
        out.append(("stored", MEDIUMS[medium], ids, up, list(tokens), lora, keys))
    return out


def test_sub_block_names_are_pythons_blake2b_with_an_8_byte_digest() -> None:
    rng = random.Random(7)
    hashes = [rng.getrandbits(64) for _ in range(50)] + [0, (1 << 64) - 1]
    changes = [("stored", "memory", None, hashes, [], None, None)]
    ((_, _, ids, *_),) = native().VllmBlockNames().events(changes, 16, 64)
    assert ids == [old_sub_id(h, j, 4) for h in hashes for j in range(4)]


@pytest.mark.parametrize("seed", range(20))
def test_events_match_the_former_python_rules(seed: int) -> None:
    rng = random.Random(seed)
    bs, k = 16, rng.choice([1, 2, 4])
    engine_block = bs * k
    capacity = rng.choice([2, 8, 1 << 17])
    new, old = native().VllmBlockNames(capacity), OldNames(capacity)
    prompts = [[rng.randrange(1000) for _ in range(engine_block * 6)] for _ in range(4)]
    for _ in range(60):
        tokens = rng.choice(prompts)[: engine_block * rng.randint(1, 6)]
        ours = native().sequence_hashes(tokens, engine_block)
        if rng.random() < 0.3:
            vllm: list[Any] = [
                rng.choice([rng.getrandbits(64), rng.randbytes(32)])
                for _ in range(len(ours) * k - rng.randint(0, k))
            ]
            new.learn(engine_block, bs, tokens, vllm)
            old.learn(engine_block, bs, tokens, vllm)
            continue
        changes = []
        for _ in range(rng.randint(1, 3)):
            a = rng.randrange(len(ours))
            b = rng.randint(a + 1, len(ours))
            medium = rng.choice(["memory", "disk"])
            if rng.random() < 0.4:
                changes.append(("removed", medium, None, ours[a:b], [], None, None))
            else:
                parent = ours[a - 1] if a else None
                lora, salt = rng.choice([None, "", "lora-a"]), rng.choice([None, "", "t"])
                changes.append(
                    (
                        "stored",
                        medium,
                        parent,
                        ours[a:b],
                        tokens[a * engine_block : b * engine_block],
                        lora,
                        salt,
                    )
                )
        assert new.events(changes, bs, engine_block) == old_events(changes, bs, engine_block, old)
    for h in {h for p in prompts for h in native().sequence_hashes(p, engine_block)}:
        for medium in (None, "memory", "disk"):
            assert new.of(h, k, medium) == old.of(h, k, medium)


def old_merge(
    world: int, holders: dict[Any, set[int]], announced: set[Any], batches: list[Any]
) -> list[Any]:
    out: list[Any] = []
    for rank, batch in enumerate(batches):
        for kind, medium, names in batch:
            if kind == "stored":
                runs: list[list[int]] = []
                for i, name in enumerate(names):
                    holders.setdefault((medium, name), set()).add(rank)
                    if len(holders[(medium, name)]) >= world and (medium, name) not in announced:
                        announced.add((medium, name))
                        if runs and runs[-1][-1] == i - 1:
                            runs[-1].append(i)
                        else:
                            runs.append([i])
                out += [("stored", r[0], r[-1] + 1) for r in runs]
                continue
            gone = []
            for name in names:
                key = (medium, name)
                if key not in holders:
                    continue
                holders[key].discard(rank)
                if key in announced:
                    announced.discard(key)
                    gone.append(name)
                if not holders[key]:
                    del holders[key]
            if gone:
                out.append(("removed", gone))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_rank_agreement_matches_the_former_python_rules(seed: int) -> None:
    rng = random.Random(seed)
    world = rng.randint(1, 4)
    agree = native().VllmRankAgreement(world)
    assert agree.world == world
    holders: dict[Any, set[int]] = {}
    announced: set[Any] = set()
    pool: list[Any] = [*range(12), *(bytes([i]) * 4 for i in range(6))]
    for _ in range(40):
        batches = [
            [
                (
                    rng.choice(["stored", "removed"]),
                    rng.choice(["CPU", "STORAGE", None]),
                    rng.sample(pool, rng.randint(1, 6)),
                )
                for _ in range(rng.randint(0, 3))
            ]
            for _ in range(world)
        ]
        want = old_merge(world, holders, announced, batches)
        got: list[Any] = []
        for rank, batch in enumerate(batches):
            for kind, medium, names in batch:
                if kind == "stored":
                    got += [("stored", a, b) for a, b in agree.stored(rank, medium, names)]
                elif gone := agree.removed(rank, medium, names):
                    got.append(("removed", gone))
        assert got == want


def test_bad_names_and_mediums_are_refused() -> None:
    names = native().VllmBlockNames()
    with pytest.raises(TypeError, match="int of 64 bits or bytes"):
        names.learn(16, 16, list(range(16)), ["not a name"])
    with pytest.raises(TypeError):
        native().VllmRankAgreement(1).stored(0, "CPU", [-1])
    with pytest.raises(InvalidInputError, match="unknown medium"):
        names.events([("stored", "redis", None, [1], [], None, None)], 16, 16)
    with pytest.raises(InvalidInputError, match="must be 1 to 65536 times vLLM"):
        names.events([], 16, 8)
