"""Paged-KV transfer benchmark: moving a request's blocks between vLLM-layout KV tensors and the
engine, against the best numpy code a user could write for the same job, in the same run.

Model geometry: Llama-3-8B-like, 32 layers, 8 KV heads, head_dim 128, fp16, block 16 tokens, in
the flash-attn layout `(2, num_blocks, 16, 8, 128)` per layer: 2 MiB of KV per block. A request
of 128 blocks (2048 tokens, 256 MiB) is stored from scattered cache blocks and loaded back into
other scattered blocks. Every figure is the request's bytes over the best of 5 runs, taken in turns
with the other ways of doing the same job.

- store: `PagedKv.store` gathers straight into the engine's slots (one copy of each byte). The
  numpy way needs a contiguous payload for `Engine.store` (each block's layers back to back, as
  the engine keeps them), so it copies twice at best: into a preallocated buffer, then into the
  slots. Two ways of filling the buffer are timed and the better one is the baseline: one
  `buf[b, layer] = kv[:, block]` per block and layer (no temporaries), and `np.take(kv, ids,
  axis=1, out=tmp)` per layer into a preallocated temporary, then one strided copy into the buffer.
  `np.copyto` of the same number of contiguous bytes (one copy) is the memory-bandwidth ceiling.
- load: `PagedKv.load` copies the engine's slots straight into the tensors (one copy) vs three
  numpy ways, the best of which is the baseline: `Engine.load` into a preallocated buffer, then
  a scatter per layer with fancy indexing (`kv[:, ids] = buf[:, layer]`) or per block and layer
  (two copies); and `Engine.views` (zero-copy read-only views of the engine's slots) with one
  `kv[:, block] = view[layer]` per block and layer (one copy).

All paths are checked to move the same bytes. Ratios are native GB/s over baseline GB/s.

Run: `.venv/bin/python benchmarks/kv_layout_bench.py` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import numpy as np

from xconnector import Engine
from xconnector._native import PagedKv

LAYERS, HEADS, DIM, BLOCK = 32, 8, 128, 16


def best_seconds(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Each function's best time of `repeats`, after one warm-up run each. Runs alternate between
    the functions, so a change in the machine's load hits them all alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
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
    kv_src, kv_dst = PagedKv(src, BLOCK), PagedKv(dst, BLOCK)
    bb = kv_src.block_bytes
    tokens = rng.integers(0, 128_000, request_blocks * BLOCK, dtype=np.uint32)
    perm = rng.permutation(num_blocks)
    ids_src = perm[:request_blocks].tolist()
    ids_dst = perm[request_blocks : 2 * request_blocks].tolist()
    idx_src, idx_dst = np.asarray(ids_src), np.asarray(ids_dst)
    total = request_blocks * bb
    print(
        f"{layers} layers, block {BLOCK} tokens = {bb / 2**20:.2f} MiB; "
        f"request: {request_blocks} blocks = {total / 2**20:.0f} MiB; "
        f"GB/s = request bytes / best of {repeats} run{'s' if repeats > 1 else ''}"
    )

    def row(what: str, label: str, seconds: float) -> None:
        print(f"{what:<7}{label:<62}{total / seconds / 1e9:6.2f} GB/s")

    # The payload buffer of the numpy paths, as (block, layer, 2, 16, heads, dim): a view, no copy.
    staging = np.empty(total, np.uint8)
    payload = staging.view(np.float16).reshape(request_blocks, layers, 2, BLOCK, HEADS, DIM)
    layer_tmp = np.empty((2, request_blocks, BLOCK, HEADS, DIM), np.float16)

    def gather_per_block() -> None:
        for b, block in enumerate(ids_src):
            for layer, t in enumerate(src):
                payload[b, layer] = t[:, block]

    def gather_take_per_layer() -> None:
        for layer, t in enumerate(src):
            # mode="clip": with the default "raise", numpy buffers `out` (one more copy).
            np.take(t, idx_src, axis=1, out=layer_tmp, mode="clip")
            payload[:, layer] = layer_tmp.swapaxes(0, 1)

    expected = np.frombuffer(kv_src.pack(ids_src), np.uint8)
    for gather in (gather_per_block, gather_take_per_layer):
        staging.fill(0)
        gather()
        assert np.array_equal(staging, expected), gather.__name__

    # One request's worth of capacity: each store evicts the previous one and reuses its warm
    # pages, so first-touch page faults are not what is measured.
    store_engine = Engine(block_bytes=bb, capacity_bytes=total, block_size=BLOCK)
    counter = iter(range(1, 1 << 30))

    def next_tokens() -> np.ndarray:
        return tokens + np.uint32(next(counter) * 1_000_000)

    def native_store() -> None:
        assert kv_src.store(store_engine, next_tokens(), ids_src) == request_blocks

    def numpy_store(gather: Callable[[], None]) -> Callable[[], None]:
        def store() -> None:
            gather()
            assert store_engine.store(next_tokens(), staging) == request_blocks

        return store

    ceiling_src = np.ones(total, np.uint8)
    ceiling_dst = np.empty(total, np.uint8)

    def memcpy() -> None:
        np.copyto(ceiling_dst, ceiling_src)

    t_native, t_blocks, t_take, t_copy = best_seconds(
        [native_store, numpy_store(gather_per_block), numpy_store(gather_take_per_layer), memcpy],
        repeats,
    )
    t_base = min(t_blocks, t_take)
    row("store", "native gather, cache blocks -> engine slots (1 copy)", t_native)
    row("", "numpy per-block copies to a buffer + Engine.store (2 copies)", t_blocks)
    row("", "numpy take(out=) per layer + Engine.store (3 copies)", t_take)
    print(f"       ratio native/best numpy {t_base / t_native:5.2f}x")
    row("", "np.copyto of the same bytes, contiguous (1 copy, ceiling)", t_copy)
    print(f"       native store at {t_copy / t_native:.0%} of the ceiling")

    engine = Engine(block_bytes=bb, capacity_bytes=total, block_size=BLOCK)
    kv_src.store(engine, tokens, ids_src)

    def native_load() -> None:
        assert kv_dst.load(engine, tokens, ids_dst) == len(tokens)

    def numpy_load_per_layer() -> None:
        assert engine.load(tokens, staging) == len(tokens)
        for layer, t in enumerate(dst):
            t[:, idx_dst] = payload[:, layer].swapaxes(0, 1)

    def numpy_load_per_block() -> None:
        assert engine.load(tokens, staging) == len(tokens)
        for b, block in enumerate(ids_dst):
            for layer, t in enumerate(dst):
                t[:, block] = payload[b, layer]

    def numpy_load_from_views() -> None:
        for view, block in zip(engine.views(tokens), ids_dst, strict=True):
            with view:  # zero-copy and read-only; the block stays pinned while `kv` lives
                kv = np.frombuffer(view, np.float16).reshape(layers, 2, BLOCK, HEADS, DIM)
                for layer, t in enumerate(dst):
                    t[:, block] = kv[layer]

    loads = (native_load, numpy_load_per_layer, numpy_load_per_block, numpy_load_from_views)
    for load in loads:
        for t in dst:
            t.fill(0)
        load()
        for s, d in zip(src, dst, strict=True):
            assert np.array_equal(s[:, ids_src], d[:, ids_dst]), load.__name__
    t_native, t_layer, t_block, t_views = best_seconds(loads, repeats)
    t_base = min(t_layer, t_block, t_views)
    row("load", "native scatter, engine slots -> cache blocks (1 copy)", t_native)
    row("", "Engine.load + numpy fancy-index scatter per layer (2 copies)", t_layer)
    row("", "Engine.load + numpy per-block copies (2 copies)", t_block)
    row("", "Engine.views + numpy per-block copies (1 copy)", t_views)
    print(f"       ratio native/best numpy {t_base / t_native:5.2f}x")
    print("loaded bytes equal the stored ones (native and numpy paths)")


if __name__ == "__main__":
    main()
