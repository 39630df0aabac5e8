"""Paged-KV transfer benchmark: moving a request's blocks between vLLM-layout KV tensors and the
engine, against what Python code would do with numpy in the same run.

Model geometry: Llama-3-8B-like, 32 layers, 8 KV heads, head_dim 128, fp16, block 16 tokens, in
the flash-attn layout `(2, num_blocks, 16, 8, 128)` per layer: 2 MiB of KV per block. A request
of 128 blocks (2048 tokens, 256 MiB) is stored from scattered cache blocks and loaded back into
other scattered blocks.

- store: `HostKv.store` (native gather straight into the engine's slots) vs the numpy way
  (`np.take` per layer into a contiguous buffer, then `Engine.store`), and a plain `np.copyto`
  of the same number of bytes (the memory-bandwidth ceiling);
- load: `HostKv.load` (engine slots straight into the tensors) vs `Engine.load` into a buffer
  followed by a numpy scatter (`kv[:, ids] = ...` per layer).

Run: `.venv/bin/python benchmarks/kv_layout_bench.py` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from xconnector import Engine
from xconnector.adapters.vllm import HostKv

LAYERS, HEADS, DIM, BLOCK = 32, 8, 128, 16


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    args = ap.parse_args()
    layers = 4 if args.quick else LAYERS
    request_blocks = 16 if args.quick else 128
    num_blocks = 2 * request_blocks + 8
    repeats = 1 if args.quick else 5
    rng = np.random.default_rng(0)
    shape = (2, num_blocks, BLOCK, HEADS, DIM)
    src = [rng.standard_normal(shape, dtype=np.float32).astype(np.float16) for _ in range(layers)]
    dst = [np.zeros(shape, np.float16) for _ in range(layers)]
    kv_src, kv_dst = HostKv(src, BLOCK, None), HostKv(dst, BLOCK, None)
    bb = kv_src.block_bytes
    tokens = rng.integers(0, 128_000, request_blocks * BLOCK, dtype=np.uint32)
    perm = rng.permutation(num_blocks)
    ids_src = perm[:request_blocks].tolist()
    ids_dst = perm[request_blocks : 2 * request_blocks].tolist()
    total = request_blocks * bb
    print(
        f"{layers} layers, block {BLOCK} tokens = {bb / 2**20:.2f} MiB; "
        f"request: {request_blocks} blocks = {total / 2**20:.0f} MiB"
    )

    # One request's worth of capacity: each store evicts the previous one and reuses its warm
    # pages, so first-touch page faults are not what is measured.
    store_engine = Engine(block_bytes=bb, capacity_bytes=total, block_size=BLOCK)
    counter = iter(range(1, 1 << 30))

    def next_tokens() -> np.ndarray:
        return tokens + np.uint32(next(counter) * 1_000_000)

    def native_store() -> None:
        assert kv_src.store(store_engine, next_tokens(), ids_src) == request_blocks

    staging = np.empty(total, np.uint8)

    def numpy_store() -> None:
        view = staging.reshape(request_blocks, bb)
        col = 0
        for t in src:
            part = np.take(t, ids_src, axis=1)  # (2, n, 16, 8, 128)
            part = np.moveaxis(part, 1, 0).reshape(request_blocks, -1).view(np.uint8)
            view[:, col : col + part.shape[1]] = part
            col += part.shape[1]
        assert store_engine.store(next_tokens(), staging) == request_blocks

    ceiling_src = np.ones(total, np.uint8)
    ceiling_dst = np.empty(total, np.uint8)

    def memcpy() -> None:
        np.copyto(ceiling_dst, ceiling_src)

    t_native = best_seconds(native_store, repeats)
    t_numpy = best_seconds(numpy_store, repeats)
    t_copy = best_seconds(memcpy, repeats)
    gbs = lambda t: total / t / 1e9  # noqa: E731
    print(
        f"store  native gather into engine {gbs(t_native):6.2f} GB/s | numpy take + Engine.store "
        f"{gbs(t_numpy):6.2f} GB/s | ratio {t_numpy / t_native:5.2f}x"
    )
    print(f"       np.copyto of the same bytes {gbs(t_copy):6.2f} GB/s (memory bandwidth ceiling)")

    engine = Engine(block_bytes=bb, capacity_bytes=total, block_size=BLOCK)
    kv_src.store(engine, tokens, ids_src)

    def native_load() -> None:
        assert kv_dst.load(engine, tokens, ids_dst) == len(tokens)

    def numpy_load() -> None:
        engine.load(tokens, staging)
        view = staging.reshape(request_blocks, bb)
        col = 0
        for t in dst:
            n = t[:, 0].nbytes
            part = (
                view[:, col : col + n]
                .view(np.float16)
                .reshape(request_blocks, 2, BLOCK, HEADS, DIM)
            )
            t[:, ids_dst] = np.moveaxis(part, 0, 1)
            col += n

    t_native = best_seconds(native_load, repeats)
    t_numpy = best_seconds(numpy_load, repeats)
    print(
        f"load   native scatter from engine {gbs(t_native):6.2f} GB/s | "
        f"Engine.load + numpy scatter {gbs(t_numpy):6.2f} GB/s | ratio {t_numpy / t_native:5.2f}x"
    )
    for s, d in zip(src, dst, strict=True):
        assert np.array_equal(s[:, ids_src], d[:, ids_dst])
    print("loaded bytes equal the stored ones")


if __name__ == "__main__":
    main()
