"""The Redis tier against a real redis-server on loopback: engines in two processes share
blocks; `kill -9` of the server mid-workload never reaches the caller and hits resume after a
restart; a wrong password is a clear error at startup; foreign or garbage values under our keys
are misses, counted."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCK, block_payload
from services import RedisServer, make_tls_cert

from xconnector import Engine, sequence_hashes
from xconnector.exceptions import ConfigError

BLOCK_BYTES = 256
VALUE_HEADER = 56  # bytes before the payload in every value (redis_tier.rs)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def engine(url: str, blocks: int = 64, **kw: object) -> Engine:
    return Engine(
        block_bytes=BLOCK_BYTES,
        capacity_bytes=blocks * BLOCK_BYTES,
        block_size=BLOCK,
        model="m",
        redis_url=url,
        **kw,  # type: ignore[arg-type]
    )


def prompt(seed: int, blocks: int = 4) -> list[int]:
    return list(range(seed * 10_000, seed * 10_000 + blocks * BLOCK))


def test_two_processes_share_blocks_through_redis(redis: RedisServer) -> None:
    toks = prompt(1, 5)
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); from conftest import block_payload; "
        "from xconnector import Engine; "
        "e = Engine(block_bytes=256, capacity_bytes=64*256, block_size=16, model='m', "
        "redis_url=sys.argv[1]); "
        f"t = {toks!r}; assert e.store(t, block_payload(t)) == 5; assert e.flush(30); "
        "assert e.stats()['redis_written_blocks'] == 5"
    )
    subprocess.run([sys.executable, "-c", code, redis.url, str(Path(__file__).parent)], check=True)
    e = engine(redis.url)
    assert e.lookup(toks) == 5 * BLOCK
    out = bytearray(5 * BLOCK_BYTES)
    assert e.load(toks, out) == 5 * BLOCK
    assert bytes(out) == block_payload(toks)
    stats = e.stats()
    assert (stats["promoted_blocks"], stats["redis_hit_blocks"]) == (5, 5)
    assert [(t["name"], t["policy"]) for t in e.tiers()] == [
        ("memory", "write_through"),
        ("redis", "write_behind"),
    ]
    # Another model's engine never sees them.
    other = Engine(
        block_bytes=256, capacity_bytes=64 * 256, block_size=16, model="other", redis_url=redis.url
    )
    assert other.lookup(toks) == 0


def test_a_prompt_longer_than_memory_reaches_redis_whole(redis: RedisServer) -> None:
    # Memory holds 8 blocks, the prompt has 20: the 12 memory has no room for go straight to
    # Redis, so another worker (a fresh engine, empty memory) loads the whole prompt from it.
    toks = prompt(7, 20)
    writer = engine(redis.url, blocks=8)
    assert writer.store(toks, block_payload(toks)) == 20
    assert writer.flush(30)
    stats = writer.stats()
    assert (stats["store_spilled_blocks"], stats["redis_written_blocks"]) == (12, 20)
    # Stored again: what Redis holds is neither copied nor sent again.
    assert writer.store(toks, block_payload(toks)) == 0
    assert writer.stats()["store_spilled_blocks"] == 12
    reader = engine(redis.url, blocks=8)
    assert reader.lookup(toks) == 20 * BLOCK
    out = bytearray(20 * BLOCK_BYTES)
    assert reader.load(toks, out) == 20 * BLOCK
    assert bytes(out) == block_payload(toks)


def test_a_prompt_longer_than_the_disk_still_reaches_redis_whole(
    redis: RedisServer, tmp_path: Path
) -> None:
    # Memory 8 blocks, a disk of 10, Redis: the disk takes what its budget holds, Redis the rest.
    toks = prompt(8, 20)
    block_file = BLOCK_BYTES + 64  # a disk block file: its payload and a 64-byte header
    writer = engine(
        redis.url, blocks=8, disk_path=str(tmp_path / "disk"), disk_capacity_bytes=10 * block_file
    )
    assert writer.store(toks, block_payload(toks)) == 20
    assert writer.flush(30)
    stats = writer.stats()
    assert (stats["disk_entries"], stats["redis_written_blocks"]) == (10, 20), stats
    reader = engine(redis.url, blocks=8)
    out = bytearray(20 * BLOCK_BYTES)
    assert reader.load(toks, out) == 20 * BLOCK and bytes(out) == block_payload(toks)


def test_kill_9_mid_workload_then_restart(redis: RedisServer) -> None:
    e = engine(redis.url, blocks=8, redis_timeout=0.3)
    before = prompt(2)
    e.store(before, block_payload(before))
    assert e.flush(30)
    redis.kill9()
    # Redis is gone: every call still answers, from memory, without raising.
    for i in range(20):
        t = prompt(100 + i)
        e.store(t, block_payload(t))
        out = bytearray(4 * BLOCK_BYTES)
        n = e.load(t, out)
        assert (
            bytes(out[: n // BLOCK * BLOCK_BYTES]) == block_payload(t)[: n // BLOCK * BLOCK_BYTES]
        )
        e.lookup(before)
    stats = e.stats()
    assert stats["redis_errors"] >= 1 and stats["redis_connected"] is False
    redis.start()  # same port, empty (no persistence)
    # After the backoff the tier is used again: new blocks go in (each try stores a new prompt:
    # blocks already in memory are not written again).
    for i in range(200):
        fresh = prompt(500 + i)
        e.store(fresh, block_payload(fresh))
        e.flush(5)
        key = f"xconnector:{e.namespace:016x}:{sequence_hashes(fresh)[0]:016x}"
        if redis.cli("EXISTS", key).strip() == "1":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the Redis tier did not resume writing after the restart")
    reader = engine(redis.url)
    out = bytearray(4 * BLOCK_BYTES)
    assert reader.load(fresh, out) == 4 * BLOCK and bytes(out) == block_payload(fresh)


def test_loads_reusing_the_last_loads_buffer_serve_their_own_blocks(redis: RedisServer) -> None:
    # Memory holds 24 blocks: each load below is read from Redis (the prompt before it evicted
    # it) and memory takes all of it, so the next load reuses the buffer its Redis reads went
    # into, the last load's bytes still in it. The 30-block prompt is longer than memory: part
    # of it is served from that buffer itself.
    writer = engine(redis.url, blocks=64)
    prompts = [prompt(s, blocks) for s, blocks in ((21, 24), (22, 9), (23, 17), (24, 30))]
    for toks in prompts:
        assert writer.store(toks, block_payload(toks)) > 0
    assert writer.flush(30)
    reader = engine(redis.url, blocks=24)
    for toks in [*prompts, prompts[0], prompts[1], prompts[3], prompts[2]]:
        out = bytearray(len(toks) // BLOCK * BLOCK_BYTES)
        assert reader.load(toks, out) == len(toks)
        assert bytes(out) == block_payload(toks)
    assert reader.stats()["redis_hit_blocks"] >= 24 + 9 + 17 + 30
    # A prefix of a prompt read before, then a miss past it.
    toks = prompts[0][: 12 * BLOCK] + list(range(900_000, 900_000 + 4 * BLOCK))
    out = bytearray(16 * BLOCK_BYTES)
    assert reader.load(toks, out) == 12 * BLOCK
    assert bytes(out[: 12 * BLOCK_BYTES]) == block_payload(prompts[0])[: 12 * BLOCK_BYTES]


def test_loads_of_many_chunks_go_into_memory_as_they_come(redis: RedisServer) -> None:
    # 1 MiB blocks: a chunk of Redis reads holds 3, and memory takes each chunk while the next
    # is read.
    mib = 1 << 20
    toks = prompt(41, 24)
    payload = np.random.default_rng(41).integers(0, 256, 24 * mib, dtype=np.uint8).tobytes()

    def big(blocks: int) -> Engine:
        return Engine(
            block_bytes=mib,
            capacity_bytes=blocks * mib,
            block_size=BLOCK,
            model="m",
            redis_url=redis.url,
            redis_timeout=5.0,
        )

    def load(e: Engine, blocks: int) -> None:
        out = bytearray(blocks * mib)
        assert e.load(toks[: blocks * BLOCK], out) == blocks * BLOCK
        assert bytes(out) == payload[: blocks * mib]
        assert e.stats()["pinned_blocks"] == 0, "the chain's tail is unpinned after the load"

    writer = big(32)
    assert writer.store(toks, payload) == 24
    assert writer.flush(60)
    # Memory holds 8 of the 24: it fills partway through, and the rest is served from what was
    # read; the next load reads the 16 past memory's 8 again.
    small = big(8)
    load(small, 24)
    assert (small.stats()["promoted_blocks"], small.stats()["redis_hit_blocks"]) == (8, 24)
    load(small, 24)
    assert (small.stats()["promoted_blocks"], small.stats()["redis_hit_blocks"]) == (8, 40)
    # Memory already holds the first 5 when the other 19 come: each goes to its own slot, so
    # a load from memory alone afterwards serves the prompt's own bytes.
    roomy = big(32)
    load(roomy, 5)
    load(roomy, 24)
    assert (roomy.stats()["promoted_blocks"], roomy.stats()["redis_hit_blocks"]) == (24, 24)
    load(roomy, 24)
    assert roomy.stats()["redis_hit_blocks"] == 24, "served from memory"


def test_an_acl_user_and_a_database_number_reach_the_server(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="admin-pass")
    try:
        server.cli("ACL", "SETUSER", "kv", "on", ">kv-pass", "~*", "+@all")
        url = f"redis://kv:kv-pass@127.0.0.1:{server.port}/3"
        toks = prompt(31, 6)
        writer = engine(url)
        writer.store(toks, block_payload(toks))
        assert writer.flush(30) and writer.stats()["redis_written_blocks"] == 6
        assert server.cli("-n", "3", "DBSIZE").strip() == "6"
        assert server.cli("-n", "0", "DBSIZE").strip() == "0"
        out = bytearray(6 * BLOCK_BYTES)
        assert engine(url).load(toks, out) == len(toks) and bytes(out) == block_payload(toks)
        with pytest.raises(ConfigError, match="Redis refused the credentials"):
            engine(f"redis://kv:wrong@127.0.0.1:{server.port}/3")
    finally:
        server.stop()


def test_a_password_for_a_server_without_one_is_a_clear_error_at_startup(
    redis: RedisServer,
) -> None:
    # Redis answers "ERR AUTH <password> called without any password configured": refused
    # credentials all the same, not a tier that opens and then fails every call.
    with pytest.raises(ConfigError, match="Redis refused the credentials"):
        engine(f"redis://:unneeded@127.0.0.1:{redis.port}")


def test_a_wrong_password_is_a_clear_error_at_startup(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="s3cret")
    try:
        with pytest.raises(ConfigError) as info:
            engine(f"redis://:wrong@127.0.0.1:{server.port}")
        text = str(info.value)
        assert "Redis refused the credentials" in text and "check the password" in text
        assert "wrong" not in text.replace("wrong@", "")  # the password is not echoed
        assert "redis://:***@127.0.0.1" in text
        good = engine(server.url)
        t = prompt(3)
        good.store(t, block_payload(t))
        assert good.flush(30) and good.stats()["redis_written_blocks"] == 4
    finally:
        server.stop()
    with pytest.raises(ConfigError, match="expected redis://"):
        engine("http://127.0.0.1:1")


def test_foreign_and_garbage_values_are_counted_misses(redis: RedisServer) -> None:
    e = engine(redis.url)
    toks = prompt(4)
    hashes = sequence_hashes(toks)
    key = f"xconnector:{e.namespace:016x}"
    redis.cli("SET", f"{key}:{hashes[0]:016x}", "not a block")
    out = bytearray(4 * BLOCK_BYTES)
    assert e.load(toks, out) == 0
    assert e.stats()["redis_foreign_values"] == 1
    # Real blocks (overwriting the garbage), then a damaged payload under a valid header.
    writer = engine(redis.url)
    writer.store(toks, block_payload(toks))
    assert writer.flush(30)
    redis.cli("SETRANGE", f"{key}:{hashes[1]:016x}", str(VALUE_HEADER + 30), "XX")
    reader = engine(redis.url)
    assert reader.load(toks, out) == BLOCK  # block 1's checksum fails: the hit ends there
    assert reader.stats()["redis_corrupt_values"] == 1
    assert redis.cli("EXISTS", f"{key}:{hashes[1]:016x}").strip() == "0"  # deleted
    assert bytes(out[:BLOCK_BYTES]) == block_payload(toks)[:BLOCK_BYTES]


def test_hybrid_mode_through_the_sdk(redis: RedisServer, tmp_path: Path) -> None:
    from v0_worker import new_kv_caches

    from xconnector.sdk import XConnectorSDK

    config = {
        "mode": "hybrid",
        "adapters": [
            {
                "name": "lmcache",
                "config": {
                    "storage_backend": "hybrid",
                    "remote_url": redis.url,
                    "local_disk": str(tmp_path / "kv"),
                    "max_local_disk_size": "64MiB",
                    "remote_ttl_s": 3600,
                },
            }
        ],
    }
    toks = prompt(9, 3)
    with XConnectorSDK(config) as a:
        # Different values in every block, layer and position: a swapped, reordered or
        # misplaced block shows.
        src = new_kv_caches(16)
        rng = np.random.default_rng(9)
        for layer in src:
            layer[:] = rng.standard_normal(layer.shape).astype(layer.dtype)
        assert a.get_kv_handler().store(toks, src, [1, 2, 3]) == 3
        engine = a.get_kv_handler().engine
        assert engine is not None and engine.flush(30)
        assert [t["name"] for t in engine.tiers()] == ["memory", "disk", "redis"]
        assert engine.stats()["redis_written_blocks"] == 3
        key = f"xconnector:{engine.namespace:016x}:{sequence_hashes(toks, BLOCK)[0]:016x}"
        assert 0 < int(redis.cli("TTL", key)) <= 3600  # remote_ttl_s
    # Another worker (no shared disk) finds the blocks in Redis.
    config["adapters"][0]["config"]["local_disk"] = str(tmp_path / "kv2")  # type: ignore[index]
    with XConnectorSDK(config) as b:
        dst = new_kv_caches(16)
        kv = b.get_kv_handler()
        kv.bind(dst)
        assert kv.lookup(toks) == 3 * BLOCK
        assert kv.load(toks, dst, [5, 6, 7]) == 3 * BLOCK
        for s, d in zip(src, dst, strict=True):
            assert np.array_equal(d[:, 5:8], s[:, 1:4])
            assert not d[:, :5].any() and not d[:, 8:].any()  # nothing else written


def test_rediss_with_a_password_and_a_private_ca(tmp_path: Path) -> None:
    ca, cert, key = make_tls_cert(tmp_path)
    server = RedisServer(tmp_path, password="tls-pass", tls_cert=(cert, key))
    try:
        e = engine(server.url, redis_ca_file=str(ca))
        t = prompt(11)
        e.store(t, block_payload(t))
        assert e.flush(30) and e.stats()["redis_written_blocks"] == 4
        reader = engine(server.url, redis_ca_file=str(ca))
        out = bytearray(4 * BLOCK_BYTES)
        assert reader.load(t, out) == 4 * BLOCK and bytes(out) == block_payload(t)
        # Without the CA the server's certificate is not trusted: a miss, never an exception.
        untrusting = engine(server.url, redis_timeout=0.5)
        assert untrusting.lookup(t) == 0 and untrusting.stats()["redis_errors"] >= 1
    finally:
        server.stop()


def test_a_server_that_never_answers_is_a_miss_not_a_hang(redis: RedisServer) -> None:
    # A TLS client against a plain server: the handshake gets no answer. The configured timeout
    # bounds every call (pytest-timeout would fail this test if one hung).
    e = engine(redis.url.replace("redis://", "rediss://"), redis_timeout=0.3)
    t = prompt(12)
    assert e.store(t, block_payload(t)) == 4
    assert e.lookup(t) == 4 * BLOCK  # memory still serves
    other = engine(redis.url.replace("redis://", "rediss://"), redis_timeout=0.3)
    assert other.lookup(t) == 0 and other.stats()["redis_errors"] >= 1


def test_values_live_remote_ttl_s_seconds_and_without_it_until_evicted(
    redis: RedisServer,
) -> None:
    keys = {}
    for ttl in (None, 120):
        toks = prompt(900 + (ttl or 0), 2)
        e = engine(redis.url, redis_ttl_s=ttl)
        assert e.store(toks, block_payload(toks)) == 2 and e.flush(30)
        keys[ttl] = [f"xconnector:{e.namespace:016x}:{h:016x}" for h in sequence_hashes(toks)]
    assert [redis.cli("TTL", k).strip() for k in keys[None]] == ["-1", "-1"]
    for k in keys[120]:
        assert 0 < int(redis.cli("TTL", k)) <= 120, k
    with pytest.raises(ConfigError, match=r"redis_ttl_s must be in 1\.\.=31536000"):
        engine(redis.url, redis_ttl_s=0)


@pytest.mark.parametrize(
    ("maxmemory", "policy", "ttl", "warned"),
    [
        ("0", "noeviction", None, "has no memory limit (maxmemory 0)"),  # redis-server's defaults
        ("64mb", "noeviction", None, "refuses writes once full (maxmemory-policy noeviction)"),
        ("64mb", "volatile-lru", None, "evicts only keys with a TTL (maxmemory-policy volatile-"),
        ("64mb", "volatile-lru", 60, None),
        ("64mb", "allkeys-lru", None, None),
    ],
)
def test_a_redis_that_will_not_make_room_is_warned_about_at_connect(
    tmp_path: Path,
    logs: pytest.LogCaptureFixture,
    maxmemory: str,
    policy: str,
    ttl: int | None,
    warned: str | None,
) -> None:
    server = RedisServer(tmp_path)
    try:
        server.cli("CONFIG", "SET", "maxmemory", maxmemory)
        server.cli("CONFIG", "SET", "maxmemory-policy", policy)
        engine(server.url, redis_ttl_s=ttl)
        records = [r for r in logs.records if f"Redis at {server.url}" in r.getMessage()]
        assert len(records) == (0 if warned is None else 1), [r.getMessage() for r in records]
        if warned is not None:
            assert warned in records[0].getMessage() and "allkeys-lru" in records[0].getMessage()
            assert records[0].levelname == "WARNING"
    finally:
        server.stop()


def test_a_server_that_refuses_info_is_used_without_advice(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    # INFO is @dangerous in Redis' ACLs: a user without it still gets a working tier.
    server = RedisServer(tmp_path)
    try:
        server.cli("ACL", "SETUSER", "kv", "on", ">pw", "~*", "+@all", "-@dangerous")
        url = f"redis://kv:pw@127.0.0.1:{server.port}"
        e = engine(url, redis_ttl_s=60)  # SET .. PX needs only SET
        toks = prompt(950, 2)
        assert e.store(toks, block_payload(toks)) == 2 and e.flush(30)
        stats = e.stats()
        assert (stats["redis_written_blocks"], stats["redis_errors"]) == (2, 0), stats
        assert [r.getMessage() for r in logs.records if r.levelname == "WARNING"] == []
        assert engine(url).lookup(toks) == 2 * BLOCK
    finally:
        server.stop()
