"""Metrics in Prometheus' format: the engine's exposition parses with prometheus_client's own
parser, counters move as expected after known operations, histograms count every call, and the
SDK's collector merges engines and its own counters, refusing to be registered twice. Beyond the
memory tier: miss tokens and bytes stored, each histogram's count and sum, promotions, damaged
disk and Redis blocks, Redis up and errors across a `kill -9`, full write-behind queues (disk and
Redis) dropping and counting every block, and peer events published (= received) or dropped, on a
real redis-server and nats-server on loopback."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BLOCK, block_payload
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from services import NatsServer, RedisServer, free_port

from xconnector import Engine, native, sequence_hashes
from xconnector.sdk import XConnectorSDK


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "namespace"))
            out[(s.name, labels)] = s.value
    return out


def test_engine_exposition_moves_with_known_operations() -> None:
    e = Engine(block_bytes=256, capacity_bytes=4 * 256, block_size=BLOCK, model="m")
    before = samples(e.prometheus())
    assert before[("xconnector_lookup_total", ())] == 0
    toks = list(range(3 * BLOCK))
    e.store(toks, block_payload(toks))
    e.lookup(toks)
    e.lookup(toks[:BLOCK] + [99] * BLOCK)
    out = bytearray(3 * 256)
    e.load(toks, out)
    other = list(range(5000, 5000 + 2 * BLOCK))
    e.store(other, block_payload(other))  # 4 slots: evicts one
    after = samples(e.prometheus({"worker": "w1"}))
    assert after[("xconnector_lookup_total", (("worker", "w1"),))] == 2
    assert after[("xconnector_hit_tokens_total", (("worker", "w1"),))] == 3 * BLOCK + BLOCK
    assert after[("xconnector_blocks_stored_total", (("worker", "w1"),))] == 5
    assert after[("xconnector_bytes_loaded_total", (("worker", "w1"),))] == 3 * 256
    assert after[("xconnector_evictions_total", (("tier", "memory"), ("worker", "w1")))] == 1
    assert after[("xconnector_tier_bytes", (("tier", "memory"), ("worker", "w1")))] == 4 * 256
    count = after[("xconnector_lookup_duration_seconds_count", (("worker", "w1"),))]
    inf = after[("xconnector_lookup_duration_seconds_bucket", (("le", "+Inf"), ("worker", "w1")))]
    assert count == inf == 2
    assert after[("xconnector_lookup_duration_seconds_sum", (("worker", "w1"),))] > 0


def test_the_sdk_collector_merges_engines_and_refuses_a_second_registration() -> None:
    with XConnectorSDK() as sdk:
        kv = sdk.get_kv_handler()
        from v0_worker import build_model_input, new_kv_caches

        caches = new_kv_caches(16)
        mi = build_model_input([list(range(1, 3 * BLOCK + 2))], [[1, 2, 3, 4]])
        sdk.handle_kv_receive_sync(None, mi, caches)
        sdk.handle_kv_send_sync(None, mi, caches, None)
        mi2 = build_model_input([list(range(1, 3 * BLOCK + 2))], [[5, 6, 7, 8]])
        assert sdk.handle_kv_receive_sync(None, mi2, caches).hit_tokens == 3 * BLOCK
        sdk.get_monitoring_handler().fallback("invalid_input")
        assert kv.engine is not None
        text = sdk.get_monitoring_handler().prometheus_text()
        got = samples(text)
        assert got[("xconnector_served_tokens_total", ())] == 3 * BLOCK
        assert got[("xconnector_fallbacks_total", (("reason", "invalid_input"),))] == 1
        assert got[("xconnector_blocks_stored_total", ())] == 3
        registry = CollectorRegistry()
        registry.register(sdk.get_monitoring_handler().collector())
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            registry.register(sdk.get_monitoring_handler().collector())


# Everything below compares metrics with what the test itself did: counts of calls, blocks and
# bytes it stored, blocks it damaged, events it caused and received.


def metric(e: Engine, name: str, **labels: str) -> float:
    return samples(e.prometheus())[(name, tuple(sorted(labels.items())))]


def histogram(e: Engine, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets by bound, count, sum) of one of the engine's histograms."""
    got = samples(e.prometheus())
    buckets = sorted(
        (float(dict(labels)["le"]), v) for (n, labels), v in got.items() if n == f"{name}_bucket"
    )
    return buckets, got[(f"{name}_count", ())], got[(f"{name}_sum", ())]


def test_miss_tokens_bytes_stored_and_every_histogram_follow_the_calls() -> None:
    e = Engine(block_bytes=256, capacity_bytes=64 * 256, block_size=BLOCK, model="m")
    calls = {"lookup": 0, "store": 0, "load": 0}
    stored_blocks = looked_up = hit = 0
    for i in range(1, 6):
        toks = list(range(i * 1000, i * 1000 + i * BLOCK + 3))  # i full blocks and 3 tokens
        stored_blocks += e.store(toks, block_payload(toks))
        calls["store"] += 1
        e.store(toks, block_payload(toks))  # nothing new: no blocks, no bytes
        calls["store"] += 1
        probe = toks[: (i - 1) * BLOCK] + [7] * (BLOCK + 5)  # shares i - 1 blocks
        hit += e.lookup(probe)
        looked_up += len(probe)
        calls["lookup"] += 1
        out = bytearray(i * 256)
        assert e.load(toks, out) == i * BLOCK and bytes(out) == block_payload(toks)
        calls["load"] += 1
    assert stored_blocks == 1 + 2 + 3 + 4 + 5
    assert hit == (0 + 1 + 2 + 3 + 4) * BLOCK
    assert metric(e, "xconnector_blocks_stored_total") == stored_blocks
    assert metric(e, "xconnector_bytes_stored_total") == stored_blocks * 256
    assert metric(e, "xconnector_hit_tokens_total") == hit
    assert metric(e, "xconnector_miss_tokens_total") == looked_up - hit
    assert metric(e, "xconnector_blocks_loaded_total") == stored_blocks
    stats = e.stats()
    for what, n in calls.items():
        buckets, count, total = histogram(e, f"xconnector_{what}_duration_seconds")
        assert count == n, what
        counts = [c for _, c in buckets]
        assert counts == sorted(counts) and buckets[-1] == (math.inf, n), (what, buckets)
        # The sum is the time the engine counted for these calls (`xconnector stats` divides
        # bytes by it), in seconds.
        assert total > 0 and round(total * 1e9) == stats[f"{what}_ns"], what


def disk_engine(disk: Path, blocks: int = 64, **kw: object) -> Engine:
    return Engine(
        block_bytes=256,
        capacity_bytes=blocks * 256,
        block_size=BLOCK,
        model="m",
        disk_path=str(disk),
        disk_capacity_bytes=10_000_000,
        **kw,  # type: ignore[arg-type]
    )


def test_promotions_and_damaged_disk_blocks_are_counted(tmp_path: Path) -> None:
    toks = list(range(100, 100 + 6 * BLOCK))
    writer = disk_engine(tmp_path)
    writer.store(toks, block_payload(toks))
    assert writer.flush(30)
    # Damage the payload of block 4 of 6 on disk.
    (path,) = tmp_path.rglob(f"*{sequence_hashes(toks)[3]:016x}*")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    reader = disk_engine(tmp_path)
    assert metric(reader, "xconnector_promoted_blocks_total") == 0
    out = bytearray(6 * 256)
    assert reader.load(toks, out) == 3 * BLOCK  # the run ends at the damaged block
    assert bytes(out[: 3 * 256]) == block_payload(toks)[: 3 * 256]
    assert metric(reader, "xconnector_promoted_blocks_total") == 3
    assert metric(reader, "xconnector_damaged_blocks_total", tier="disk") == 1
    # Loading again is served from memory: nothing more promoted, nothing more damaged.
    assert reader.load(toks, out) == 3 * BLOCK
    assert metric(reader, "xconnector_promoted_blocks_total") == 3
    assert metric(reader, "xconnector_damaged_blocks_total", tier="disk") == 1
    assert metric(reader, "xconnector_blocks_loaded_total") == 3 + 3


def test_a_full_disk_queue_drops_blocks_and_counts_every_one(tmp_path: Path) -> None:
    # A queue of one block: a store of many blocks outruns the writer thread. Every new block is
    # either written or dropped and counted, never lost silently.
    e = disk_engine(tmp_path, blocks=4096, disk_queue_blocks=1)
    stored = 0
    for i in range(50):
        toks = list(range(i * 10**5, i * 10**5 + 64 * BLOCK))
        stored += e.store(toks, block_payload(toks))
        if metric(e, "xconnector_write_behind_dropped_total") > 0:
            break
    assert e.flush(30)
    dropped = metric(e, "xconnector_write_behind_dropped_total")
    on_disk = metric(e, "xconnector_tier_entries", tier="disk")
    assert dropped > 0 and on_disk > 0
    assert dropped + on_disk == stored == metric(e, "xconnector_blocks_stored_total")
    assert disk_engine(tmp_path).stats()["disk_entries"] == on_disk  # a restart finds them all


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def redis_engine(url: str, **kw: object) -> Engine:
    return Engine(
        block_bytes=256,
        capacity_bytes=64 * 256,
        block_size=BLOCK,
        model="m",
        redis_url=url,
        **kw,  # type: ignore[arg-type]
    )


def test_redis_up_errors_hits_and_damaged_values(redis: RedisServer) -> None:
    e = redis_engine(redis.url, redis_timeout=0.5)
    toks = list(range(200, 200 + 4 * BLOCK))
    e.store(toks, block_payload(toks))
    assert e.flush(30)
    assert metric(e, "xconnector_redis_up") == 1
    assert metric(e, "xconnector_redis_errors_total") == 0
    assert metric(e, "xconnector_redis_written_blocks_total") == 4
    # Another engine reads them from Redis: hits and promotions.
    reader = redis_engine(redis.url)
    out = bytearray(4 * 256)
    assert reader.load(toks, out) == 4 * BLOCK and bytes(out) == block_payload(toks)
    assert metric(reader, "xconnector_redis_hit_blocks_total") == 4
    assert metric(reader, "xconnector_promoted_blocks_total") == 4
    assert metric(reader, "xconnector_damaged_blocks_total", tier="redis") == 0
    # Garbage under the key of block 3 of another prompt: one damaged value, the hit stops there.
    other = list(range(900, 900 + 4 * BLOCK))
    e.store(other, block_payload(other))
    assert e.flush(30)
    key = f"xconnector:{e.namespace:016x}:{sequence_hashes(other)[2]:016x}"
    redis.cli("SET", key, "not a block")
    third = redis_engine(redis.url)
    assert third.load(other, out) == 2 * BLOCK
    assert metric(third, "xconnector_damaged_blocks_total", tier="redis") == 1
    assert metric(third, "xconnector_redis_hit_blocks_total") == 2
    # The server dies: the first call that needs it fails once, and the tier is down.
    redis.kill9()
    assert e.lookup(list(range(5000, 5000 + 2 * BLOCK))) == 0
    assert metric(e, "xconnector_redis_up") == 0
    assert metric(e, "xconnector_redis_errors_total") == 1
    # Back (same port, empty): after the backoff it answers again and is up.
    redis.start()
    for _ in range(200):
        e.lookup(list(range(5000, 5000 + 2 * BLOCK)))
        if metric(e, "xconnector_redis_up") == 1:
            break
        time.sleep(0.05)
    assert metric(e, "xconnector_redis_up") == 1
    assert metric(e, "xconnector_redis_errors_total") >= 1


def test_a_full_redis_queue_drops_blocks_and_counts_every_one(redis: RedisServer) -> None:
    # One queued block, one per batch, and Redis paused for writes: the two writer threads hold
    # at most one batch each, so at most three of the store's 20 new blocks are accepted.
    e = redis_engine(redis.url, redis_queue_blocks=1, redis_batch_blocks=1, redis_timeout=60)
    toks = list(range(0, 20 * BLOCK))
    redis.cli("CLIENT", "PAUSE", "60000", "WRITE")
    try:
        assert e.store(toks, block_payload(toks)) == 20
    finally:
        redis.cli("CLIENT", "UNPAUSE")
    assert e.flush(30)
    stats = e.stats()
    dropped, written = stats["redis_dropped_blocks"], stats["redis_written_blocks"]
    assert dropped >= 20 - 3 and dropped + written == 20
    assert metric(e, "xconnector_redis_written_blocks_total") == written
    assert metric(e, "xconnector_redis_dropped_blocks_total") == dropped
    assert int(redis.cli("DBSIZE")) == written
    assert metric(e, "xconnector_redis_errors_total") == 0


def events_engine(url: str, **kw: object) -> Engine:
    return Engine(
        block_bytes=256,
        capacity_bytes=4 * 256,
        block_size=BLOCK,
        model="m",
        events_url=url,
        events_subject="test.metrics.kv_events",
        worker_id="w1",
        **kw,  # type: ignore[arg-type]
    )


def test_peer_events_published_are_the_events_received() -> None:
    nats = NatsServer()
    try:
        sub = native().EventSubscriber(nats.url, "test.metrics.kv_events")
        e = events_engine(nats.url)
        a, b = list(range(3 * BLOCK)), list(range(500, 500 + 2 * BLOCK))
        e.store(a, block_payload(a))  # stored
        e.store(a, block_payload(a))  # nothing new: no event
        e.store(b, block_payload(b))  # 4 slots: removed (one block of a), then stored
        assert e.flush(30)
        assert metric(e, "xconnector_peer_events_published_total") == 3
        assert metric(e, "xconnector_peer_events_dropped_total") == 0
        received: list[str] = []
        for _ in range(100):
            batch = sub.next(0.1)
            if batch is not None:
                received += [ev["kind"] for ev in batch["events"]]
            if len(received) >= 3:
                break
        assert received == ["stored", "removed", "stored"]
    finally:
        nats.stop()


def test_kv_events_nats_cannot_take_are_dropped_and_counted() -> None:
    # No NATS, and a queue of two events: some are dropped at once (queue full), the rest when
    # the publisher cannot send them. Every event is counted once.
    e = events_engine(f"nats://127.0.0.1:{free_port()}", events_queue=2)
    for i in range(10):
        toks = list(range(i * 1000, i * 1000 + BLOCK))
        assert e.store(toks, block_payload(toks)) == 1  # one stored event each (no evictions)
    # The first 4 fit in memory; each later store also evicts a block: a removed event more.
    assert e.flush(30)
    assert metric(e, "xconnector_peer_events_published_total") == 0
    assert metric(e, "xconnector_peer_events_dropped_total") == 10 + 6
