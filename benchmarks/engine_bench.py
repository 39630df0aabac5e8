"""Native engine benchmark: lookup latency, hashing throughput, store/load bandwidth.

Every number comes with a baseline measured in the same run on the same data:

- lookup of a fully cached 32k-token prompt (block 16), median of many calls, with a small and a
  large cache around it (lookup must not grow with the cache);
- sequence hashing against vLLM-style chained hashing in pure Python
  (`hashlib.sha256(pickle.dumps((parent, tuple(block), None)))`);
- store and load bandwidth against a `memoryview` slice copy and `numpy.copyto` of the same bytes
  (one `memcpy`), for large blocks (256 KiB) and for small ones (16 KiB).

Run: `.venv/bin/python benchmarks/engine_bench.py` (add `--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import array
import hashlib
import pickle
import statistics
import time
from collections.abc import Callable

import numpy as np

from xconnector import Engine, sequence_hashes

BLOCK = 16
PROMPT_TOKENS = 32 * 1024


def median_ns(fn: Callable[[object], object], arg: object, calls: int) -> float:
    for _ in range(min(50, calls)):
        fn(arg)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn(arg)
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def prompt(seed: int, n: int = PROMPT_TOKENS) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128_000, n, dtype=np.uint32)


def filled_engine(tokens: np.ndarray, extra: int) -> Engine:
    """An engine holding `tokens` plus `extra` blocks of other prompts."""
    n_blocks = PROMPT_TOKENS // BLOCK
    block_bytes = 16  # lookup latency does not depend on payload size; keeps 1M blocks small
    engine = Engine(
        block_bytes=block_bytes, capacity_bytes=(n_blocks + extra) * block_bytes, model="bench"
    )
    payload = bytes(n_blocks * block_bytes)
    for i in range(0, extra, n_blocks):  # one 32k filler prompt at a time
        k = min(n_blocks, extra - i) * BLOCK
        engine.store(prompt(1000 + i)[:k], payload[: k // BLOCK * block_bytes])
    engine.store(tokens, payload)
    assert engine.lookup(tokens) == PROMPT_TOKENS
    return engine


def bench_lookup(extra_blocks: list[int], calls: int) -> None:
    print(f"lookup: fully cached {PROMPT_TOKENS}-token prompt, block {BLOCK}, median of {calls}")
    tokens = prompt(0)
    as_list = tokens.tolist()
    as_array = array.array("I", tokens.tobytes())
    for extra in extra_blocks:
        lookup = filled_engine(tokens, extra).lookup
        entries = extra + PROMPT_TOKENS // BLOCK
        r_np = median_ns(lookup, tokens, calls) / 1e3
        r_arr = median_ns(lookup, as_array, calls) / 1e3
        r_list = median_ns(lookup, as_list, max(calls // 4, 10)) / 1e3
        print(
            f"  {entries:>9,} blocks cached: numpy {r_np:7.1f} us | array('I') {r_arr:7.1f} us"
            f" | list {r_list:7.1f} us (list conversion included)"
        )


def python_chained_hashes(tokens: list[int]) -> list[bytes]:
    """vLLM's pure-Python prefix hashing scheme, the baseline."""
    parent: bytes | None = None
    out = []
    for i in range(0, len(tokens) - len(tokens) % BLOCK, BLOCK):
        parent = hashlib.sha256(pickle.dumps((parent, tuple(tokens[i : i + BLOCK]), None))).digest()
        out.append(parent)
    return out


def bench_hashing(repeats: int) -> None:
    tokens = prompt(1)
    as_list = tokens.tolist()
    assert len(sequence_hashes(tokens)) == len(python_chained_hashes(as_list))
    # An empty engine's lookup is hashing plus ~11 index probes (binary search), with no
    # Python ints to create: the hashing cost on the engine's own hot path.
    empty = Engine(block_bytes=16, capacity_bytes=16, model="bench")
    baseline = best_seconds(lambda: python_chained_hashes(as_list), repeats)
    to_list = best_seconds(lambda: sequence_hashes(tokens), repeats * 10)
    in_lookup = best_seconds(lambda: empty.lookup(tokens), repeats * 10)
    mtok = PROMPT_TOKENS / 1e6
    print(f"hashing: {PROMPT_TOKENS} tokens, block {BLOCK}, best of {repeats} / {repeats * 10}")
    rows = [
        ("python sha256 chain (vLLM-style)", baseline),
        ("sequence_hashes() -> list[int]", to_list),
        ("Engine.lookup() on an empty cache", in_lookup),
    ]
    for name, secs in rows:
        ratio = "" if secs is baseline else f"  ratio {baseline / secs:6.1f}x"
        print(f"  {name:<34}: {mtok / secs:8.1f} Mtok/s {secs * 1e6:8.1f} us{ratio}")


def bench_bandwidth(block_bytes: int, blocks: int, repeats: int) -> None:
    nbytes = block_bytes * blocks
    tokens_per_prompt = blocks * BLOCK
    # Room for two prompts: the timed stores evict the previous prompt's (already warm) slots.
    engine = Engine(block_bytes=block_bytes, capacity_bytes=2 * nbytes, model="bench")
    src = np.random.default_rng(2).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)

    # Pre-generate token arrays so the timed region is the store alone.
    token_sets = [prompt(i + 10_000, tokens_per_prompt) for i in range(repeats + 3)]
    it = iter(token_sets)
    for _ in range(2):  # fill the budget so later stores reuse warm slots
        engine.store(next(it), src)
    store_s = float("inf")
    for _ in range(repeats):
        t = next(it)
        t0 = time.perf_counter()
        stored = engine.store(t, src)
        store_s = min(store_s, time.perf_counter() - t0)
        assert stored == blocks
    last = token_sets[repeats + 1]
    load_s = best_seconds(lambda: engine.load(last, dst), repeats)
    assert engine.load(last, dst) == tokens_per_prompt and np.array_equal(dst, src)

    src_mv, dst_mv = memoryview(src), memoryview(dst)

    def mv_copy() -> None:
        dst_mv[:] = src_mv

    mv_s = best_seconds(mv_copy, repeats)
    np_s = best_seconds(lambda: np.copyto(dst, src), repeats)
    gbs = lambda s: nbytes / s / 1e9  # noqa: E731
    size = f"{blocks} blocks x {block_bytes // 1024} KiB = {nbytes >> 20} MiB"
    print(f"bandwidth: {size}, best of {repeats}")
    print(f"  memoryview copy : {gbs(mv_s):6.2f} GB/s")
    print(f"  numpy copyto    : {gbs(np_s):6.2f} GB/s")
    print(
        f"  engine store    : {gbs(store_s):6.2f} GB/s  ratio {mv_s / store_s:.2f}x memoryview, "
        f"{np_s / store_s:.2f}x numpy"
    )
    print(
        f"  engine load     : {gbs(load_s):6.2f} GB/s  ratio {mv_s / load_s:.2f}x memoryview, "
        f"{np_s / load_s:.2f}x numpy"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    args = ap.parse_args()
    if args.quick:
        bench_lookup([1_000, 20_000], calls=50)
        bench_hashing(repeats=2)
        bench_bandwidth(block_bytes=64 * 1024, blocks=64, repeats=3)
    else:
        bench_lookup([1_000, 1_000_000], calls=2_000)
        bench_hashing(repeats=5)
        bench_bandwidth(block_bytes=256 * 1024, blocks=1024, repeats=7)
        bench_bandwidth(block_bytes=16 * 1024, blocks=4096, repeats=7)


if __name__ == "__main__":
    main()
