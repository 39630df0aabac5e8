"""Never serve wrong KV, through the Python API: a Redis value copied under another key is a
miss, counted and deleted; an `out` buffer that aliases the cache is refused; a view's block
stays pinned while anything made from it lives, released or not (numpy and torch keep the view
object and give its buffer back at once); a block written through a torch tensor made from a
view is never served again."""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCK, BLOCK_BYTES, block_payload
from services import RedisServer

from xconnector import Engine, sequence_hashes
from xconnector.exceptions import InvalidInputError


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def redis_engine(url: str) -> Engine:
    return Engine(
        block_bytes=BLOCK_BYTES,
        capacity_bytes=64 * BLOCK_BYTES,
        block_size=BLOCK,
        model="m",
        redis_url=url,
    )


def test_a_redis_value_copied_under_another_key_is_a_miss_counted_and_deleted(
    redis: RedisServer,
) -> None:
    a = list(range(1000, 1000 + 3 * BLOCK))
    c = list(range(9000, 9000 + 3 * BLOCK))
    writer = redis_engine(redis.url)
    writer.store(a, block_payload(a))
    writer.store(c, block_payload(c))
    assert writer.flush(30)
    prefix = f"xconnector:{writer.namespace:016x}"
    ka, kc = sequence_hashes(a, BLOCK), sequence_hashes(c, BLOCK)
    # C's intact second block under A's second key: a valid XConnector value, the wrong KV.
    redis.cli("COPY", f"{prefix}:{kc[1]:016x}", f"{prefix}:{ka[1]:016x}", "REPLACE")
    reader = redis_engine(redis.url)
    out = bytearray(3 * BLOCK_BYTES)
    assert reader.load(a, out) == BLOCK  # A's first block only
    assert bytes(out[:BLOCK_BYTES]) == block_payload(a)[:BLOCK_BYTES]
    assert bytes(out[BLOCK_BYTES : 2 * BLOCK_BYTES]) != block_payload(c)[BLOCK_BYTES:]
    stats = reader.stats()
    assert stats["redis_mismatched_values"] == 1
    assert stats["redis_foreign_values"] == stats["redis_corrupt_values"] == 0
    assert redis.cli("EXISTS", f"{prefix}:{ka[1]:016x}").strip() == "0"
    assert "xconnector_mismatched_blocks_total" in reader.prometheus()
    # The next store of A writes A's block again, and A is whole.
    writer2 = redis_engine(redis.url)
    writer2.store(a, block_payload(a))
    assert writer2.flush(30)
    fresh = redis_engine(redis.url)
    assert fresh.load(a, out) == 3 * BLOCK
    assert bytes(out) == block_payload(a)


def test_a_redis_value_with_the_right_key_and_another_digest_is_a_miss(redis: RedisServer) -> None:
    # A value whose header names this key but another prefix's digest (what a 64-bit hash
    # collision would store): intact, correctly keyed, and still not this block's KV.
    a = list(range(3000, 3000 + 2 * BLOCK))
    writer = redis_engine(redis.url)
    writer.store(a, block_payload(a))
    assert writer.flush(30)
    key = f"xconnector:{writer.namespace:016x}:{sequence_hashes(a, BLOCK)[1]:016x}"
    raw = subprocess.run(
        ["redis-cli", "-p", str(redis.port), "--raw", "GET", key], capture_output=True, check=True
    ).stdout[:-1]  # --raw prints the bytes and a newline
    value = bytearray(raw)
    value[24:40] = bytes(b ^ 0xFF for b in value[24:40])  # the digest field, nothing else
    subprocess.run(
        ["redis-cli", "-p", str(redis.port), "-x", "SET", key],
        input=bytes(value),
        check=True,
        capture_output=True,
    )
    reader = redis_engine(redis.url)
    out = bytearray(2 * BLOCK_BYTES)
    assert reader.load(a, out) == BLOCK
    stats = reader.stats()
    assert stats["redis_mismatched_values"] == 1
    assert stats["redis_corrupt_values"] == stats["redis_foreign_values"] == 0


def test_a_load_into_memory_that_aliases_the_cache_is_refused(make_engine) -> None:  # type: ignore[no-untyped-def]
    e = make_engine()
    a = list(range(2 * BLOCK))
    b = list(range(500, 500 + 2 * BLOCK))
    e.store(a, block_payload(a))
    e.store(b, block_payload(b))
    view = e.views(a, max_blocks=1)[0]
    # What torch.frombuffer does with a read-only buffer: a writable array over the same memory.
    addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
    alias = np.ctypeslib.as_array((ctypes.c_uint8 * BLOCK_BYTES).from_address(addr))
    with pytest.raises(InvalidInputError, match="overlaps the engine's cache"):
        e.load(b, alias)
    assert bytes(view) == block_payload(a)[:BLOCK_BYTES]  # untouched
    out = bytearray(2 * BLOCK_BYTES)
    assert e.load(a, out) == 2 * BLOCK and bytes(out) == block_payload(a)


def test_a_released_view_stays_pinned_while_a_buffer_made_from_it_lives(make_engine) -> None:  # type: ignore[no-untyped-def]
    e = make_engine(blocks=2)
    a = list(range(2 * BLOCK))
    e.store(a, block_payload(a))
    view = e.views(a, max_blocks=1)[0]
    mv, arr = memoryview(view), np.frombuffer(view, dtype=np.uint8)
    view.release()
    del view
    gc.collect()
    other = list(range(700, 700 + 2 * BLOCK))
    for holder in ("memoryview", "array"):
        assert e.stats()["pinned_blocks"] == 1, holder
        e.store(other, block_payload(other))
        # Never evicted, never reused for the other prompt's blocks.
        seen = bytes(mv) if holder == "memoryview" else arr.tobytes()
        assert seen == block_payload(a)[:BLOCK_BYTES]
        if holder == "memoryview":
            mv.release()
            del mv
        else:
            del arr
        gc.collect()
    assert e.stats()["pinned_blocks"] == 0


@pytest.mark.torch
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="runs in .venv-vllm")
def test_a_tensor_from_a_released_view_keeps_its_block(make_engine) -> None:  # type: ignore[no-untyped-def]
    import warnings

    import torch

    e = make_engine(blocks=2)
    a = list(range(2 * BLOCK))
    e.store(a, block_payload(a))
    view = e.views(a, max_blocks=1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable"
        t = torch.frombuffer(view, dtype=torch.uint8)
    # torch gives the buffer back at once and keeps only the object: the pin must outlive both.
    view.release()
    del view
    gc.collect()
    assert e.stats()["pinned_blocks"] == 1
    other = list(range(700, 700 + 2 * BLOCK))
    e.store(other, block_payload(other))
    assert bytes(t.numpy()) == block_payload(a)[:BLOCK_BYTES]
    with pytest.raises(InvalidInputError, match="overlaps the engine's cache"):
        e.load(other, t)
    # torch ignores the read-only flag, so a write lands in the cache: the block is then never
    # served again (it was checksummed when it was first exported).
    t.add_(1)
    out = bytearray(2 * BLOCK_BYTES)
    assert e.load(a, out) == 0
    assert e.stats()["spoiled_blocks"] == 1
    assert e.views(a) == []
    del t
    gc.collect()
    assert e.stats()["pinned_blocks"] == 0
