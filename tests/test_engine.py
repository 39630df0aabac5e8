"""The native engine through its Python surface: round trips, views, eviction, errors, stats."""

from __future__ import annotations

import array
import ctypes
import gc
from collections.abc import Callable

import numpy as np
import pytest
from conftest import BLOCK, BLOCK_BYTES, block_payload

from xconnector import Engine, native
from xconnector.exceptions import (
    ConfigError,
    InternalError,
    InvalidInputError,
    XConnectorError,
)

MakeEngine = Callable[..., Engine]


def prompt(start: int, n_tokens: int) -> list[int]:
    return list(range(start, start + n_tokens))


@pytest.mark.parametrize(
    "wrap",
    [
        bytes,
        bytearray,
        memoryview,
        lambda b: np.frombuffer(b, dtype=np.uint8),
        lambda b: np.frombuffer(b, dtype=np.float16),
    ],
    ids=["bytes", "bytearray", "memoryview", "numpy-u8", "numpy-f16"],
)
def test_round_trip_is_byte_exact(make_engine: MakeEngine, wrap: Callable[[bytes], object]) -> None:
    e = make_engine()
    toks = prompt(1, 5 * BLOCK + 7)  # 5 full blocks + a partial one
    payload = block_payload(toks)
    assert e.store(toks, wrap(payload)) == 5
    assert e.lookup(toks) == 5 * BLOCK
    out = bytearray(len(payload))
    assert e.load(toks, out) == 5 * BLOCK
    assert bytes(out) == payload
    out_np = np.zeros(len(payload) // 2, dtype=np.float16)
    assert e.load(toks, out_np) == 5 * BLOCK
    assert out_np.tobytes() == payload
    e._check_invariants()


def test_prefix_hits_and_misses(make_engine: MakeEngine) -> None:
    e = make_engine()
    toks = prompt(1, 4 * BLOCK)
    e.store(toks, block_payload(toks))
    shared = toks[: 2 * BLOCK] + prompt(10_000, 2 * BLOCK)
    assert e.lookup(shared) == 2 * BLOCK
    assert e.lookup(prompt(50_000, 4 * BLOCK)) == 0
    assert e.lookup(toks[: 3 * BLOCK + 5]) == 3 * BLOCK
    # load caps at what fits in `out`
    out = bytearray(2 * BLOCK_BYTES + 10)
    assert e.load(toks, out) == 2 * BLOCK
    assert bytes(out[: 2 * BLOCK_BYTES]) == block_payload(toks)[: 2 * BLOCK_BYTES]


@pytest.mark.parametrize(
    "other",
    [
        {"model": "another-model"},
        {"dtype": "float16"},
        {"kv_layout": "HND"},
        {"tp_world_size": 2},
        {"tp_world_size": 2, "tp_rank": 1},
        {"extra": {"quant": "fp8"}},
    ],
)
def test_namespaces_isolate_engines(other: dict[str, object]) -> None:
    base: dict[str, object] = {"model": "m", "dtype": "bfloat16", "kv_layout": "NHD"}
    a = Engine(block_bytes=BLOCK_BYTES, capacity_bytes=BLOCK_BYTES * 8, **base)  # type: ignore[arg-type]
    b = Engine(block_bytes=BLOCK_BYTES, capacity_bytes=BLOCK_BYTES * 8, **{**base, **other})  # type: ignore[arg-type]
    assert a.namespace != b.namespace
    same = Engine(block_bytes=BLOCK_BYTES, capacity_bytes=BLOCK_BYTES * 8, **base)  # type: ignore[arg-type]
    assert a.namespace == same.namespace


def test_lora_and_salt_requests_do_not_share_kv(make_engine: MakeEngine) -> None:
    e = make_engine()
    toks = prompt(1, 2 * BLOCK)
    e.store(toks, block_payload(toks), lora_name="adapter-a")
    assert e.lookup(toks, lora_name="adapter-a") == 2 * BLOCK
    assert e.lookup(toks) == 0
    assert e.lookup(toks, lora_name="adapter-b") == 0
    assert e.lookup(toks, lora_name="adapter-a", cache_salt="s") == 0


def test_lru_evicts_the_least_recently_used_prompt(make_engine: MakeEngine) -> None:
    e = make_engine(blocks=4)
    a, b, c = prompt(100, 2 * BLOCK), prompt(200, 2 * BLOCK), prompt(300, 2 * BLOCK)
    e.store(a, block_payload(a))
    e.store(b, block_payload(b))
    e.load(a, bytearray(2 * BLOCK_BYTES))  # a becomes the most recently used
    e.lookup(b)  # lookups do not count as use
    e.store(c, block_payload(c))
    assert (e.lookup(a), e.lookup(b), e.lookup(c)) == (2 * BLOCK, 0, 2 * BLOCK)
    assert e.stats()["evicted_blocks"] == 2
    e._check_invariants()


def test_eviction_takes_leaves_first(make_engine: MakeEngine) -> None:
    e = make_engine(blocks=5)
    long = prompt(1, 4 * BLOCK)
    e.store(long, block_payload(long))
    for i, remaining in [(1, 4), (2, 3), (3, 2)]:
        other = prompt(1000 * i, BLOCK)
        e.store(other, block_payload(other))
        # Each eviction took the long prompt's deepest block: its prefix stays servable.
        assert e.lookup(long) == remaining * BLOCK
        e._check_invariants()


def test_budget_is_never_exceeded(make_engine: MakeEngine) -> None:
    e = make_engine(blocks=10)
    for i in range(50):
        toks = prompt(i * 1000, (1 + i % 7) * BLOCK)
        e.store(toks, block_payload(toks))
        s = e.stats()
        assert s["used_bytes"] <= s["capacity_bytes"] == 10 * BLOCK_BYTES
        assert s["allocated_bytes"] <= s["capacity_bytes"]
    assert e.stats()["evicted_blocks"] > 0
    e._check_invariants()


def test_capacity_rounds_down_to_whole_blocks() -> None:
    e = Engine(block_bytes=100, capacity_bytes=1050)
    assert e.capacity_bytes == 1000


def test_views_are_zero_copy_and_pin_their_blocks(make_engine: MakeEngine) -> None:
    e = make_engine(blocks=2)
    toks = prompt(1, 2 * BLOCK)
    payload = block_payload(toks)
    e.store(toks, payload)
    views = e.views(toks)
    assert [len(v) for v in views] == [BLOCK_BYTES, BLOCK_BYTES]
    arrays = [np.frombuffer(v, dtype=np.uint8) for v in views]
    assert b"".join(a.tobytes() for a in arrays) == payload
    assert not arrays[0].flags.writeable
    # Two views of the same block share memory: no copy was made.
    again = np.frombuffer(e.views(toks, max_blocks=1)[0], dtype=np.uint8)
    assert np.shares_memory(arrays[0], again)
    del again
    gc.collect()
    # Pinned blocks survive pressure; the store that needs their slots keeps nothing.
    other = prompt(500, 2 * BLOCK)
    assert e.store(other, block_payload(other)) == 0
    assert e.stats()["store_rejected_blocks"] == 2
    assert e.lookup(toks) == 2 * BLOCK
    # Released views leave their blocks pinned while arrays made from them live.
    for v in views:
        v.release()
        assert v.released
    with pytest.raises(BufferError, match="released"):
        memoryview(views[0])
    assert e.stats()["pinned_blocks"] == 2
    assert e.store(other, block_payload(other)) == 0
    del views, v  # numpy keeps the views themselves: the arrays still pin the blocks
    gc.collect()
    assert e.stats()["pinned_blocks"] == 2
    assert b"".join(a.tobytes() for a in arrays) == payload
    del arrays
    gc.collect()
    assert e.stats()["pinned_blocks"] == 0
    assert e.store(other, block_payload(other)) == 2
    e._check_invariants()


def test_view_context_manager_releases(make_engine: MakeEngine) -> None:
    e = make_engine()
    toks = prompt(1, BLOCK)
    e.store(toks, block_payload(toks))
    with e.views(toks)[0] as v:
        assert bytes(memoryview(v)) == block_payload(toks)
    assert v.released
    with pytest.raises(BufferError, match="released"):
        memoryview(v)
    del v  # the pin goes with the last reference
    assert e.stats()["pinned_blocks"] == 0


def test_writable_view_is_refused(make_engine: MakeEngine) -> None:
    e = make_engine()
    toks = prompt(1, BLOCK)
    e.store(toks, block_payload(toks))
    (v,) = e.views(toks)
    # The view exports read-only memory, and no consumer can make it writable.
    with pytest.raises(TypeError, match="not writable"):
        (ctypes.c_char * BLOCK_BYTES).from_buffer(v)
    with pytest.raises(ValueError, match="WRITEABLE"):
        np.frombuffer(v, dtype=np.uint8).setflags(write=True)
    with pytest.raises(TypeError, match="read-only"):
        memoryview(v)[0] = 1


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda e, t: e.store(t, b"short"), InvalidInputError, "payload is 5 bytes"),
        (lambda e, t: e.store(t, bytes(BLOCK_BYTES * 3)), InvalidInputError, "2 full block"),
        (lambda e, t: e.store([1.5] * BLOCK, bytes(BLOCK_BYTES)), InvalidInputError, "integers"),
        (
            lambda e, t: e.store(np.ones(BLOCK, dtype=np.float32), bytes(BLOCK_BYTES)),
            InvalidInputError,
            "format 'f'",
        ),
        (lambda e, t: e.lookup([-1] * BLOCK), InvalidInputError, "negative"),
        (lambda e, t: e.load(t, bytes(BLOCK_BYTES * 2)), InvalidInputError, "read-only"),
        (
            lambda e, t: e.load(t, memoryview(bytearray(BLOCK_BYTES * 2)).toreadonly()),
            InvalidInputError,
            "read-only",
        ),
        (
            lambda e, t: e.store(t, np.zeros((2 * BLOCK_BYTES, 2), dtype=np.uint8)[:, 0]),
            InvalidInputError,
            "C-contiguous",
        ),
        (lambda e, t: e.store(t, 12345), InvalidInputError, "buffer protocol"),
        (lambda e, t: e.load(t, "not a buffer"), InvalidInputError, "buffer protocol"),
    ],
    ids=[
        "short-payload",
        "long-payload",
        "float-tokens",
        "float32-array-tokens",
        "negative-id",
        "bytes-out",
        "readonly-memoryview-out",
        "strided-payload",
        "int-payload",
        "str-out",
    ],
)
def test_bad_input_is_a_clear_error_and_loses_nothing(
    make_engine: MakeEngine, call: Callable[[Engine, list[int]], object], exc: type, match: str
) -> None:
    e = make_engine()
    toks = prompt(1, 2 * BLOCK + 3)
    kept = prompt(9000, 2 * BLOCK)
    e.store(kept, block_payload(kept))
    with pytest.raises(exc, match=match):
        call(e, toks)
    # The engine is still usable and still holds what it held.
    assert e.lookup(kept) == 2 * BLOCK
    assert e.store(toks, block_payload(toks)) == 2
    out = bytearray(2 * BLOCK_BYTES)
    assert e.load(toks, out) == 2 * BLOCK and bytes(out) == block_payload(toks)
    e._check_invariants()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"block_bytes": 0, "capacity_bytes": 100}, "block_bytes must be"),
        ({"block_bytes": 100, "capacity_bytes": 10}, "smaller than one block"),
        ({"block_bytes": 100, "capacity_bytes": 1000, "block_size": 0}, "block_size"),
    ],
)
def test_bad_engine_config_raises_config_error(kw: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Engine(**kw)


@pytest.mark.parametrize("point", ["lookup", "store", "load"])
def test_a_panic_in_the_core_is_an_xconnector_error(
    make_engine: MakeEngine, point: str, no_faults: None
) -> None:
    e = make_engine()
    toks = prompt(1, 2 * BLOCK)
    e.store(toks, block_payload(toks))
    calls = {
        "lookup": lambda: e.lookup(toks),
        "store": lambda: e.store(toks, block_payload(toks)),
        "load": lambda: e.load(toks, bytearray(2 * BLOCK_BYTES)),
    }
    native()._inject_fault(point, "panic")
    with pytest.raises(InternalError, match="panic in the native core") as info:
        calls[point]()
    # An ordinary `except Exception` in a host catches it (pyo3's PanicException would escape).
    assert isinstance(info.value, XConnectorError) and isinstance(info.value, Exception)
    native()._inject_fault(point, "error")
    with pytest.raises(XConnectorError, match="injected fault"):
        calls[point]()
    native()._inject_fault(point, "none")
    assert e.lookup(toks) == 2 * BLOCK
    e._check_invariants()


def test_stats_count_operations(make_engine: MakeEngine) -> None:
    e = make_engine()
    toks = prompt(1, 3 * BLOCK + 4)
    e.lookup(toks)
    e.store(toks, block_payload(toks))
    e.store(toks, block_payload(toks))
    e.lookup(toks)
    e.load(toks, bytearray(3 * BLOCK_BYTES))
    s = e.stats()
    assert s["lookups"] == 2 and s["stores"] == 2 and s["loads"] == 1
    assert s["hit_tokens"] == 3 * BLOCK
    assert s["miss_tokens"] == (3 * BLOCK + 4) + 4
    assert s["stored_blocks"] == 3 and s["store_existing_blocks"] == 3
    assert s["stored_bytes"] == 3 * BLOCK_BYTES and s["loaded_bytes"] == 3 * BLOCK_BYTES
    assert s["entries"] == 3 and s["used_bytes"] == 3 * BLOCK_BYTES
    assert s["hit_rate"] == pytest.approx(3 * BLOCK / (2 * (3 * BLOCK + 4)))
    assert s["lookup_ns"] > 0 and s["store_ns"] > 0 and s["load_ns"] > 0


def test_array_and_numpy_tokens_address_the_same_blocks(make_engine: MakeEngine) -> None:
    e = make_engine()
    toks = prompt(7, 2 * BLOCK)
    e.store(array.array("I", toks), block_payload(toks))
    assert e.lookup(np.array(toks, dtype=np.int64)) == 2 * BLOCK
    assert e.lookup(tuple(toks)) == 2 * BLOCK


@pytest.mark.torch
def test_torch_cpu_tensors_round_trip(make_engine: MakeEngine) -> None:
    torch = pytest.importorskip("torch", reason="torch is installed by the vLLM test environment")
    e = make_engine()
    toks = torch.arange(1, 2 * BLOCK + 1, dtype=torch.int64)
    kv = torch.randn(2 * BLOCK_BYTES // 2, dtype=torch.bfloat16)
    assert e.store(toks, kv) == 2
    out = torch.zeros_like(kv)
    assert e.load(toks, out) == 2 * BLOCK
    assert torch.equal(out, kv)
    with pytest.raises(InvalidInputError, match="contiguous"):
        e.load(toks, torch.zeros(2, 2 * BLOCK_BYTES // 2, dtype=torch.bfloat16).t())
