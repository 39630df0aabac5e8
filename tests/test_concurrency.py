"""Eight Python threads on one engine: stores, lookups, loads and views race; invariants hold."""

from __future__ import annotations

import random
import threading

from conftest import BLOCK, BLOCK_BYTES, block_payload

from xconnector import Engine

THREADS = 8
OPS = 1500
CAPACITY_BLOCKS = 48


def prompt(rng: random.Random) -> list[int]:
    # 16 prompts sharing a 2-block system prompt, of 1 to 8 blocks.
    p = rng.randrange(16)
    n = rng.randrange(1, 9) * BLOCK
    return [i if i < 2 * BLOCK else p * 10_000 + i for i in range(n)]


def worker(engine: Engine, seed: int, errors: list[str]) -> None:
    rng = random.Random(seed)
    try:
        for _ in range(OPS):
            toks = prompt(rng)
            op = rng.randrange(4)
            if op == 0:
                engine.store(toks, block_payload(toks))
            elif op == 1:
                hit = engine.lookup(toks)
                assert hit % BLOCK == 0 and hit <= len(toks)
            elif op == 2:
                out = bytearray(len(toks) // BLOCK * BLOCK_BYTES)
                got = engine.load(toks, out)
                expected = block_payload(toks[:got])
                assert bytes(out[: len(expected)]) == expected, "loaded bytes differ from stored"
            else:
                views = engine.views(toks, max_blocks=3)
                data = b"".join(bytes(memoryview(v)) for v in views)
                assert data == block_payload(toks[: len(views) * BLOCK])
                for v in views:
                    v.release()
            s = engine.stats()
            assert s["used_bytes"] <= s["capacity_bytes"], s
    except Exception as e:  # reported by the main thread
        errors.append(f"thread {seed}: {e!r}")


def test_eight_threads_keep_the_engine_consistent() -> None:
    engine = Engine(
        block_bytes=BLOCK_BYTES, capacity_bytes=CAPACITY_BLOCKS * BLOCK_BYTES, model="concurrency"
    )
    errors: list[str] = []
    threads = [threading.Thread(target=worker, args=(engine, s, errors)) for s in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine._check_invariants()
    s = engine.stats()
    assert s["used_bytes"] <= CAPACITY_BLOCKS * BLOCK_BYTES
    assert s["allocated_bytes"] <= CAPACITY_BLOCKS * BLOCK_BYTES
    assert s["pinned_blocks"] == 0
    # The workload was real: evictions happened, and loads were served.
    assert s["evicted_blocks"] > 0 and s["loaded_blocks"] > 0 and s["hit_tokens"] > 0
