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

import pytest
from conftest import BLOCK, block_payload
from services import RedisServer

from xconnector import Engine, sequence_hashes
from xconnector.sdk.exceptions import ConfigError

BLOCK_BYTES = 256


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


def test_a_wrong_password_is_a_clear_error_at_startup(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="s3cret")
    try:
        with pytest.raises(ConfigError) as info:
            engine(f"redis://:wrong@127.0.0.1:{server.port}")
        text = str(info.value)
        assert "Redis refused the credentials" in text and "check the password" in text
        assert "wrong" not in text.replace("wrong@", "")  # the password is not echoed
        assert "redis://***@127.0.0.1" in text
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
    redis.cli("SETRANGE", f"{key}:{hashes[1]:016x}", "30", "XX")
    reader = engine(redis.url)
    assert reader.load(toks, out) == BLOCK  # block 1's checksum fails: the hit ends there
    assert reader.stats()["redis_foreign_values"] == 1
    assert bytes(out[:BLOCK_BYTES]) == block_payload(toks)[:BLOCK_BYTES]
