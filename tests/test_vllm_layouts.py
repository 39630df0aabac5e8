"""The inference adapter's KV layouts: detection from shapes, and pack/unpack round trips for
every layout with random KV and random block tables: bytes restored into other physical blocks
equal the originals exactly. numpy always; torch CPU tensors (and the device staging path, run
on CPU tensors) where torch is installed, as in the vLLM test environment."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from xconnector import Engine, native
from xconnector._native import PagedKv
from xconnector.adapters.vllm import StagedKv
from xconnector.exceptions import InvalidInputError

HAS_TORCH = importlib.util.find_spec("torch") is not None

SHAPES = {
    "flash_attn": lambda n, bs: (2, n, bs, 4, 16),
    "flashinfer": lambda n, bs: (n, 2, bs, 4, 16),
    "standard": lambda n, bs: (n, 4, bs, 32),
    "mla": lambda n, bs: (n, bs, 72),
}
BLOCK_DIM = {"flash_attn": 1, "flashinfer": 0, "standard": 0, "mla": 0}


def random_layers(
    layout: str, n: int, bs: int, layers: int, seed: int, permute: bool
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = SHAPES[layout](n, bs)
    out = []
    for _ in range(layers):
        data = rng.standard_normal(shape).astype(np.float16)
        if permute:  # same logical shape, another physical order (e.g. an HND view)
            order = rng.permutation(len(shape))
            data = np.ascontiguousarray(data.transpose(order)).transpose(np.argsort(order))
        out.append(data)
    return out


def block(t: np.ndarray, layout: str, b: int) -> np.ndarray:
    return np.take(t, b, axis=BLOCK_DIM[layout])


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("seed", range(4))
def test_detects_the_layout_and_round_trips_into_other_blocks(layout: str, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n, bs = 24, 16
    src = random_layers(layout, n, bs, layers=3, seed=seed, permute=False)
    dst = random_layers(layout, n, bs, layers=3, seed=seed + 50, permute=bool(seed % 2))
    before = [d.copy() for d in dst]
    a, b = PagedKv(src, bs), PagedKv(dst, bs)
    assert a.layout == b.layout == layout
    assert a.block_bytes == sum(block(s, layout, 0).nbytes for s in src)
    table_src = rng.choice(n, size=7, replace=False).tolist()
    table_dst = rng.choice(n, size=7, replace=False).tolist()
    b.unpack(table_dst, a.pack(table_src))
    for s, d, orig in zip(src, dst, before, strict=True):
        for x, y in zip(table_src, table_dst, strict=True):
            assert np.array_equal(block(s, layout, x), block(d, layout, y))
        for other in set(range(n)) - set(table_dst):
            assert np.array_equal(block(d, layout, other), block(orig, layout, other))


@pytest.mark.parametrize("layout", list(SHAPES))
def test_engine_round_trip_with_chunks_of_several_blocks(layout: str) -> None:
    n, bs = 32, 16
    src = random_layers(layout, n, bs, layers=2, seed=1, permute=False)
    dst = random_layers(layout, n, bs, layers=2, seed=2, permute=True)
    a, b = PagedKv(src, bs), PagedKv(dst, bs)
    # An engine block of 2 KV blocks (LMCache's chunk_size = 32 with vLLM's 16).
    engine = Engine(block_bytes=2 * a.block_bytes, capacity_bytes=64 * a.block_bytes, block_size=32)
    tokens = list(range(1000, 1000 + 4 * 32 + 5))
    ids_src = [3, 9, 1, 30, 17, 22, 5, 8, 11]
    assert a.store(engine, tokens, ids_src) == 4
    ids_dst = [31, 0, 2, 4, 6, 10, 12, 14]
    assert b.load(engine, tokens, ids_dst) == 4 * 32
    for s, d in zip(src, dst, strict=True):
        for x, y in zip(ids_src[:8], ids_dst, strict=True):
            assert np.array_equal(block(s, layout, x), block(d, layout, y))


def test_detection_and_input_errors() -> None:
    assert native().detect_kv_layout([2, 100, 16, 8, 128], 16) == "flash_attn"
    with pytest.raises(InvalidInputError, match="fits several layouts"):
        native().detect_kv_layout([2, 2, 16, 8, 128], 16)
    with pytest.raises(InvalidInputError, match="matches no known layout for block_size 32"):
        PagedKv([np.zeros((4, 2, 16, 8), np.float16)], 32)
    with pytest.raises(InvalidInputError, match="read-only"):
        ro = np.zeros((4, 2, 16, 8), np.float16)
        ro.flags.writeable = False
        PagedKv([ro], 16)
    with pytest.raises(InvalidInputError, match="expected a torch tensor or a numpy array"):
        PagedKv([b"\0" * 64], 16)
    with pytest.raises(InvalidInputError, match='unknown KV layout "HND"'):
        PagedKv([np.zeros((4, 2, 16, 8), np.float16)], 16, layout="HND")
    kv = PagedKv([np.zeros((4, 2, 16, 8), np.float16)], 16)
    engine = Engine(block_bytes=100, capacity_bytes=1000, block_size=16)
    with pytest.raises(InvalidInputError, match="not a whole number of these KV blocks"):
        kv.store(engine, list(range(32)), [0, 1])
    assert native().block_ids_from_slots([32, 33, 34, 35, 8, 9, 10, 11], 4) == [8, 2]


@pytest.mark.torch
@pytest.mark.skipif(not HAS_TORCH, reason="runs in .venv-vllm, where scripts/test.sh has torch")
@pytest.mark.parametrize("layout", list(SHAPES))
def test_torch_cpu_tensors_and_the_staging_path_give_the_same_bytes(layout: str) -> None:
    import torch

    n, bs = 16, 16
    src = [
        torch.from_numpy(x) for x in random_layers(layout, n, bs, layers=2, seed=3, permute=False)
    ]
    host = PagedKv(src, bs)
    # The staging path (device gather + host buffer), run on CPU tensors: a GPU is not lent here.
    staged = StagedKv(src, bs, None, staging_bytes=1 << 20)
    ids = [4, 0, 11]
    engine = Engine(
        block_bytes=host.block_bytes, capacity_bytes=32 * host.block_bytes, block_size=bs
    )
    tokens = list(range(3 * bs))
    assert staged.store(engine, tokens, ids) == 3
    stored = bytearray(3 * host.block_bytes)
    assert engine.load(tokens, stored) == 3 * bs
    assert bytes(stored) == host.pack(ids)  # the native copy's bytes exactly
    dst = [torch.zeros_like(t) for t in src]
    assert StagedKv(dst, bs, None, 1 << 20).load(engine, tokens, [7, 8, 9]) == 3 * bs
    for s, d in zip(src, dst, strict=True):
        for x, y in zip(ids, [7, 8, 9], strict=True):
            assert torch.equal(s.select(BLOCK_DIM[layout], x), d.select(BLOCK_DIM[layout], y))


@pytest.mark.torch
@pytest.mark.skipif(not HAS_TORCH, reason="runs in .venv-vllm, where scripts/test.sh has torch")
def test_the_staging_path_moves_a_long_request_in_parts_within_its_buffer() -> None:
    import torch

    n, bs = 40, 16
    src = [torch.from_numpy(x) for x in random_layers("flashinfer", n, bs, 3, 5, permute=False)]
    host = PagedKv(src, bs)
    ebb = 2 * host.block_bytes  # engine blocks of two KV blocks (chunk_size 32)
    engine = Engine(block_bytes=ebb, capacity_bytes=64 * ebb, block_size=2 * bs)
    tokens = list(range(1000, 1000 + 32 * bs + 5))  # 16 engine blocks and a partial one
    ids = list(range(n - 1, n - 33, -1))
    cap = 3 * ebb  # a part's device copy and one layer's temporaries: one engine block a part
    host.store(engine, tokens[: 12 * bs], ids[:12])  # 6 engine blocks cached already
    staged = StagedKv(src, bs, None, staging_bytes=cap)
    # The cached blocks are not copied at all: their ids are never read (out of range here).
    assert staged.store(engine, tokens, [10**6] * 12 + ids[12:]) == 10
    assert staged.staging.numel() <= cap
    whole = bytearray(16 * ebb)
    assert engine.load(tokens, whole) == 32 * bs
    assert bytes(whole) == host.pack(ids)
    # Back in parts into other blocks; the three vLLM holds already are left alone.
    dst = [torch.zeros_like(t) for t in src]
    back = StagedKv(dst, bs, None, staging_bytes=cap)
    assert back.load(engine, tokens, list(range(32)), first_block=3) == 32 * bs
    assert back.staging.numel() <= cap
    for s, d in zip(src, dst, strict=True):
        assert not d[:3].any()
        for x, y in zip(ids[3:], range(3, 32), strict=True):
            assert torch.equal(s[x], d[y])
    # A cache holding a shorter prefix loads that only: a short load, the rest left alone.
    short = Engine(block_bytes=ebb, capacity_bytes=64 * ebb, block_size=2 * bs)
    host.store(short, tokens[: 8 * bs], ids[:8])
    dst = [torch.zeros_like(t) for t in src]
    assert StagedKv(dst, bs, None, staging_bytes=cap).load(short, tokens, list(range(32))) == 8 * bs
    assert all(not d[8:].any() and d[:8].any() for d in dst)


@pytest.mark.torch
@pytest.mark.skipif(not HAS_TORCH, reason="runs in .venv-vllm, where scripts/test.sh has torch")
def test_the_staging_path_stores_on_top_of_a_prefix_held_only_below_memory(tmp_path: Path) -> None:
    import torch

    n, bs = 24, 16
    src = [torch.from_numpy(x) for x in random_layers("standard", n, bs, 2, 7, permute=False)]
    host = PagedKv(src, bs)
    bb = host.block_bytes
    engine = Engine(
        block_bytes=bb,
        capacity_bytes=6 * bb,
        block_size=bs,
        model="m",
        disk_path=str(tmp_path),
        disk_capacity_bytes=64 * bb,
    )
    tokens, ids = list(range(500, 500 + 8 * bs)), list(range(8))
    assert host.store(engine, tokens[: 4 * bs], ids[:4]) == 4 and engine.flush(30)
    # Another prompt takes memory: the first one's prefix is on disk only now.
    assert host.store(engine, list(range(9000, 9000 + 6 * bs)), list(range(8, 14))) == 6
    assert engine.flush(30) and engine.lookup(tokens) == 4 * bs
    # A part on top of that prefix cannot be stored without it in memory: copied whole instead.
    assert StagedKv(src, bs, None, staging_bytes=1 << 20).store(engine, tokens, ids) > 0
    assert engine.flush(30) and engine.lookup(tokens) == 8 * bs
    out = bytearray(8 * bb)
    assert engine.load(tokens, out) == 8 * bs
    assert bytes(out) == host.pack(ids)
