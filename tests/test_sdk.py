"""The SDK surface: lifecycle and misuse, factories, adapters' settings, handlers, fail-open on
errors inside, and the compatibility facade's routing with failure backoff."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from v0_worker import BLOCK, LAYERS, build_model_input, new_kv_caches

from xconnector import native
from xconnector._native import Router
from xconnector.adapters.lmcache import LMCacheAdapter
from xconnector.core.connector import XConnector
from xconnector.exceptions import CacheError, InvalidInputError
from xconnector.sdk import (
    ConfigError,
    KVCacheSDK,
    SDKConfig,
    StateError,
    XConnectorSDK,
    create_kv_cache_sdk,
    create_xconnector_sdk,
)


@pytest.fixture
def sdk() -> Iterator[XConnectorSDK]:
    with XConnectorSDK({"adapters": [{"name": "lmcache", "config": {"max_cache_size": 64}}]}) as s:
        yield s


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1, 50000, n).tolist()


def test_lifecycle_misuse_is_a_clear_state_error() -> None:
    s = XConnectorSDK()
    assert s.state == "created"
    with pytest.raises(StateError, match=r"handle_kv_receive\(\) called before initialize\(\)"):
        s.handle_kv_receive_sync(None, None, [])
    with pytest.raises(StateError, match="before initialize"):
        s.get_kv_handler()
    with pytest.raises(StateError, match="before initialize"):
        asyncio.run(s.handle_kv_send(None, None, []))
    assert s.initialize() is True and s.initialize() is True  # idempotent
    assert sorted(s.adapters) == ["lmcache", "vllm"]  # defaults for the missing types
    s.shutdown()
    s.shutdown()  # idempotent
    assert s.adapters == {} and s.router.order() == []
    with pytest.raises(StateError, match=r"after shutdown\(\); create a new XConnectorSDK"):
        s.handle_kv_receive_sync(None, None, [])
    with pytest.raises(StateError, match="after shutdown"):
        s.initialize()


def test_adapters_configured_twice_or_unknown_are_config_errors(sdk: XConnectorSDK) -> None:
    with pytest.raises(ConfigError, match="adapter 'lmcache' is configured twice"):
        sdk.load_adapters([{"name": "lmcache"}])
    with pytest.raises(
        ConfigError, match=r"unknown adapter \"redis\"; known adapters: lmcache, vllm, dynamo"
    ):
        sdk.load_adapters([{"name": "redis"}])
    with pytest.raises(ConfigError, match="configured twice"):
        XConnectorSDK({"adapters": [{"name": "vllm"}, {"name": "vllm"}]}).initialize()
    loaded = sdk.load_adapters([{"name": "dynamo", "config": {"worker_id": "w7"}}])
    assert [a.name for a in loaded] == ["dynamo"]
    assert sdk.get_distributed_handler().worker_id == "w7"
    assert sdk.get_adapter("nope") is None


def test_cache_adapter_settings(tmp_path: Path) -> None:
    def cache(settings: dict[str, object]) -> LMCacheAdapter:
        s = XConnectorSDK({"adapters": [{"name": "lmcache", "config": settings}]})
        s.initialize()
        adapter = s.get_adapter("lmcache")
        assert isinstance(adapter, LMCacheAdapter)
        return adapter

    def settings(config: dict[str, object]) -> dict[str, Any]:
        return cache(config).engine_settings

    assert settings({"max_cache_size": 2048})["memory_bytes"] == 2 << 30
    assert settings({"max_cache_size": "512MB"})["memory_bytes"] == 512_000_000
    five_gb = settings({"local_cpu": True, "max_local_cpu_size": 5.0})
    assert five_gb["memory_bytes"] == 5_000_000_000
    assert settings({"chunk_size": 256})["chunk_size"] == 256
    disk = cache({"local_disk": f"file://{tmp_path}", "max_local_disk_size": 2.5})
    assert disk.engine_settings["disk"]["capacity_bytes"] == 2_500_000_000
    assert disk.health()["disk_path"] == str(tmp_path)
    for bad, message in [
        ({"storage_backend": "disk"}, "storage_backend: disk needs local_disk"),
        ({"remote_url": "redis://localhost:6379"}, "remote_url: a shared Redis tier is hybrid"),
        ({"storage_backend": "redis"}, "storage_backend: redis needs remote_url"),
        ({"max_local_disk_size": 5}, "max_local_disk_size: set local_disk too"),
        ({"local_cpu": False}, "local_cpu: false leaves no tier"),
        ({"max_cache_size": 1, "max_local_cpu_size": 1}, "both set the memory budget"),
        ({"chunk_sise": 256}, "chunk_sise: unknown lmcache setting"),
    ]:
        with pytest.raises(ConfigError, match=message):
            cache(bad)
    with pytest.raises(ConfigError, match="mode: hybrid adds a shared Redis tier, but no enabled"):
        XConnectorSDK({"mode": "hybrid"}).initialize()


def test_factories() -> None:
    s = create_xconnector_sdk()
    assert s.initialized and s.config.enabled and s.config.mode == "embedded"
    s.shutdown()
    with pytest.raises(ConfigError, match="mode is 'embedded' in the call but 'hybrid' in config"):
        create_xconnector_sdk(config={"mode": "hybrid"})
    k = create_kv_cache_sdk(config=SDKConfig(enabled=True))
    assert isinstance(k, KVCacheSDK) and "lmcache" in k.adapters
    with pytest.raises(ConfigError, match="enable_distributed is false"):
        k.get_distributed_handler()
    k.shutdown()
    with pytest.raises(ConfigError, match="unknown cache_backend 'redis'; available: lmcache"):
        create_kv_cache_sdk("redis")
    with pytest.raises(ConfigError, match=r"XConnectorSDK\(config=...\): invalid"):
        XConnectorSDK({"adaptors": []})


def test_kv_handler_store_lookup_load_round_trip(sdk: XConnectorSDK) -> None:
    kv = sdk.get_kv_handler()
    src = new_kv_caches(32)
    for layer in src:
        layer[:] = np.random.default_rng(5).standard_normal(layer.shape).astype(np.float16)
    toks = tokens(3 * BLOCK + 4)
    assert kv.lookup(toks) == 0  # nothing bound yet
    assert kv.store(toks, src, [9, 2, 30, 4]) == 3
    assert kv.store(toks, src, [9, 2, 30, 4]) == 0  # already cached: nothing copied
    assert kv.lookup(toks) == 3 * BLOCK
    dst = new_kv_caches(32)
    assert kv.load(toks, dst, [0, 1, 5]) == 3 * BLOCK
    for s, d in zip(src, dst, strict=True):
        for a, b in [(9, 0), (2, 1), (30, 5)]:
            assert np.array_equal(s[:, a], d[:, b])
    assert kv.load(toks, dst, [7]) == BLOCK  # fewer block ids: a shorter prefix
    # Block ids as any sequence: a numpy array, a range, a generator.
    assert kv.load(toks, dst, np.array([0, 1, 5])) == 3 * BLOCK
    assert kv.load(toks, dst, range(3)) == 3 * BLOCK
    assert kv.store(toks, src, (i for i in [9, 2, 30, 4])) == 0
    with pytest.raises(InvalidInputError, match="block id 40 is out of range"):
        kv.load(toks, dst, [40, 1, 2])


def test_errors_inside_fall_back_and_back_off_then_recover(no_faults: None) -> None:
    router = Router(manual_clock=True, base_backoff=1.0)
    s = XConnectorSDK(router=router)
    s.initialize()
    caches = new_kv_caches(16)
    mi = build_model_input([tokens(2 * BLOCK + 1)], [[3, 4, 5]])
    native()._inject_fault("lookup", "panic")
    r = s.handle_kv_receive_sync(None, mi, caches)
    assert (r.cache_hit, r.fallback_reason, r.model_input is mi) == (False, "internal_error", True)
    assert r.data == (None, False, mi)
    # The cache target now backs off: calls skip it without touching the engine.
    assert s.handle_kv_receive_sync(None, mi, caches).fallback_reason == "cache_backoff"
    native()._inject_fault("lookup", "none")
    router.advance(1.0)
    assert s.handle_kv_receive_sync(None, mi, caches).fallback_reason is None
    # Bad input is the caller's data, not a failing target: no backoff.
    broken = build_model_input([tokens(BLOCK)], [[1]])
    object.__setattr__(broken.attn_metadata, "slot_mapping", np.zeros(3, np.int64))
    assert s.handle_kv_send_sync(None, broken, caches).fallback_reason == "invalid_input"
    assert s.router.order("cache") == ["lmcache"]
    assert s.get_monitoring_handler().fallbacks() == {
        "internal_error": 1,
        "cache_backoff": 1,
        "invalid_input": 1,
    }
    s.shutdown()


def test_caching_disabled_still_answers() -> None:
    with XConnectorSDK({"enable_caching": False}) as s:
        mi = build_model_input([tokens(40)], [[0, 1, 2]])
        r = s.handle_kv_receive_sync(None, mi, new_kv_caches(4))
        assert (r.cache_hit, r.fallback_reason) == (False, "caching_disabled")


def test_distributed_handler_scores_workers(sdk: XConnectorSDK) -> None:
    kv = sdk.get_kv_handler()
    sdk.load_adapters([{"name": "dynamo", "config": {"worker_id": "self"}}])
    dist = sdk.get_distributed_handler()
    system = tokens(4 * BLOCK, seed=1)
    kv.store(system, new_kv_caches(8), [0, 1, 2, 3])
    dist.record_stored("peer-a", system[: 2 * BLOCK])
    dist.record_stored("peer-b", system)
    dist.record_stored("peer-c", tokens(BLOCK, seed=2))
    request = system + tokens(10, seed=3)
    # Ties by name; this worker's own overlap comes from its engine.
    assert dist.score(request) == [
        ("peer-b", 4 * BLOCK),
        ("self", 4 * BLOCK),
        ("peer-a", 2 * BLOCK),
    ]
    assert dist.best_worker(request, candidates=["peer-a", "peer-c"]) == "peer-a"
    assert dist.best_worker(tokens(BLOCK, seed=9)) is None
    dist.record_removed("peer-b", system)
    dist.forget_worker("peer-a")
    assert dist.score(request) == [("self", 4 * BLOCK)]
    assert dict(dist.peers()) == {"peer-a": 0, "peer-b": 0, "peer-c": 1}


def test_monitoring_snapshot(sdk: XConnectorSDK) -> None:
    caches = new_kv_caches(16)
    p = tokens(2 * BLOCK + 1)
    mi = build_model_input([p], [[1, 2, 3]])
    sdk.handle_kv_receive_sync(None, mi, caches)
    sdk.handle_kv_send_sync(None, mi, caches, None)
    mi2 = build_model_input([p], [[4, 5, 6]])
    assert sdk.handle_kv_receive_sync(None, mi2, caches).hit_tokens == 2 * BLOCK
    snap = sdk.get_monitoring_handler().snapshot()
    assert snap["counters"]["receives"] == 2 and snap["counters"]["stored_blocks"] == 2
    assert snap["hit_rate"] == pytest.approx(2 * BLOCK / (2 * len(p)))
    assert snap["adapters"]["lmcache"]["engines"][0]["stored_blocks"] == 2
    assert [t["name"] for t in snap["router"]] == ["lmcache", "vllm"]
    assert len(caches) == LAYERS


def test_cache_adapter_keeps_one_engine_per_geometry_and_namespace() -> None:
    # A disabled cache adapter is replaced by the default one (default settings), not dropped.
    off = {"name": "lmcache", "enabled": False, "config": {"max_cache_size": 64}}
    with XConnectorSDK({"adapters": [off]}) as s:
        cache = s.get_adapter("lmcache")
        assert isinstance(cache, LMCacheAdapter) and cache.config.config == {}
        geometry = {"kv_block_size": BLOCK, "kv_block_bytes": 64, "dtype": "f16", "kv_layout": "x"}
        a, again = cache.engine_for(model="m", **geometry), cache.engine_for(model="m", **geometry)
        other = cache.engine_for(model="n", **geometry)
        toks = tokens(BLOCK)
        assert a.store(toks, bytes(64)) == 1
        assert again.lookup(toks) == BLOCK and other.lookup(toks) == 0  # the same engine, or not
        assert len(cache.pool.engines()) == 2
        cache.stop()
        assert cache.pool.engines() == []
        with pytest.raises(ConfigError, match="the lmcache adapter is stopped"):
            cache.engine_for(model="m", **geometry)


def test_facade_routes_by_name_and_type_with_backoff() -> None:
    router = Router(manual_clock=True, base_backoff=2.0)
    xc = XConnector(sdk=XConnectorSDK(router=router))
    xc.start()
    assert xc.get_adapter("lmcache") is not None and "vllm" in xc.list_adapters()
    assert xc.route("cache", "health")["name"] == "lmcache"
    assert xc.route("vllm", "health")["type"] == "inference"
    with pytest.raises(InvalidInputError, match="adapter 'lmcache' has no operation 'fly'"):
        xc.route("cache", "fly")
    cache = xc.get_adapter("lmcache")
    assert cache is not None
    cache.stop()  # now its operations fail
    with pytest.raises(CacheError, match=r"every 'cache' target failed; last error: .*is stopped"):
        xc.route(
            "cache",
            "engine_for",
            kv_block_size=16,
            kv_block_bytes=64,
            model="m",
            dtype="f",
            kv_layout="x",
        )
    with pytest.raises(CacheError, match="backing off after 1 consecutive failure"):
        xc.route("lmcache", "health")
    with pytest.raises(CacheError, match='every "cache" target is backing off'):
        xc.route("cache", "health")
    router.advance(2.0)
    assert xc.route("cache", "health")["name"] == "lmcache"
    with pytest.raises(ConfigError, match='nothing is registered as "storage"'):
        xc.route("storage", "health")
    dyn = xc.load_adapter({"name": "dynamo"})
    assert xc.route("distributed", "health")["worker_id"] == dyn.health()["worker_id"]
    xc.stop()
    assert xc.sdk.state == "shutdown"


def test_async_forms_and_context_managers() -> None:
    async def main() -> None:
        async with XConnectorSDK() as s:
            assert s.initialized
            caches = new_kv_caches(16)
            p = tokens(3 * BLOCK)
            mi = build_model_input([p], [[1, 2, 3]])
            r = await s.handle_kv_receive(None, mi, caches)
            await s.handle_kv_send(None, r.model_input, caches, None)
            r2 = await s.handle_kv_receive(None, build_model_input([p], [[4, 5, 6]]), caches)
            assert r2.hit_tokens == 2 * BLOCK  # the third block holds the last token
            loaded = await s.aload_adapters([{"name": "dynamo"}])
            assert loaded[0].name == "dynamo"
        assert s.state == "shutdown"
        await s.ashutdown()

    asyncio.run(main())
