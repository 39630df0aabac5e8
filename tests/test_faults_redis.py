"""Fault matrix, shared Redis tier: a hung Redis (a listener that goes silent, a SIGSTOPped
redis-server) costs one request the budget and opens the breaker, later requests skip Redis, the
breaker closes when Redis answers; an endpoint that is not Redis (HTTP, NATS, garbage) is named
as such; planted or forged values are refused when values are authenticated, and the secret is
never shown. Real processes and sockets on 127.0.0.1 only; hangs are caught by a watchdog, costs
are printed (`pytest -s`), never asserted."""

from __future__ import annotations

import http.server
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import BLOCK, block_payload
from services import NatsServer, RedisServer
from watchdog import returns

from xconnector import Engine, sequence_hashes
from xconnector.exceptions import ConfigError, XConnectorError
from xconnector.sdk import XConnectorSDK

BLOCK_BYTES = 256
T = TypeVar("T")


def timed(call: Callable[[], T]) -> tuple[T, float]:
    """`call()` under the watchdog, and its wall time in ms (measured in its thread)."""

    def run() -> tuple[T, float]:
        t0 = time.perf_counter()
        out = call()
        return out, (time.perf_counter() - t0) * 1000

    return returns(run)


def engine(url: str, blocks: int = 64, block_bytes: int = BLOCK_BYTES, **kw: Any) -> Engine:
    """An engine on `url`. Unless a test is about the budget, it gets a generous one (1 s): a
    busy test machine must not trip the breaker where no fault is injected."""
    kw.setdefault("redis_timeout", 1.0)
    return returns(
        lambda: Engine(
            block_bytes=block_bytes,
            capacity_bytes=blocks * block_bytes,
            block_size=BLOCK,
            model="m",
            redis_url=url,
            **kw,
        )
    )


def prompt(seed: int, blocks: int = 4) -> list[int]:
    return list(range(seed * 10_000, seed * 10_000 + blocks * BLOCK))


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def metric_values(e: Engine) -> dict[str, float]:
    """Each sample of `e.prometheus()` by metric name (the labels dropped)."""
    out = {}
    for line in e.prometheus().splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            out[name_labels.split("{")[0]] = float(value)
    return out


def redis_records(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("xconnector") and r.levelno == level and text in r.getMessage()
    ]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


class FakeRedis:
    """A TCP listener on 127.0.0.1 that speaks just enough RESP to pass for Redis (PING, CLIENT,
    EXISTS, GET, SET, DEL) until told to `hang` (read, never answer), to answer as an HTTP
    server would (`garbage`), or to answer everything but reads (`stall_reads`: EXISTS says
    every key is there, GET never answers). Counts the commands it received, by name."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.mode = "redis"
        self.commands: dict[str, int] = {}
        self.closed = 0  # connections the client closed
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def count(self, name: str) -> int:
        with self.lock:
            return self.commands.get(name, 0)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            # Replies go out one by one: without this, Nagle's algorithm and the client's delayed
            # ACK hold the second reply of a pipeline for 40 ms.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""

        def line() -> bytes:
            nonlocal buf
            while b"\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    raise EOFError
                buf += chunk
            head, _, buf = buf.partition(b"\r\n")
            return head

        def exactly(n: int) -> bytes:
            nonlocal buf
            while len(buf) < n + 2:
                chunk = conn.recv(65536)
                if not chunk:
                    raise EOFError
                buf += chunk
            data, buf = buf[:n], buf[n + 2 :]
            return data

        try:
            while True:
                n = int(line()[1:])
                args = [exactly(int(line()[1:])) for _ in range(n)]
                name = args[0].decode().upper()
                with self.lock:
                    self.commands[name] = self.commands.get(name, 0) + 1
                if self.mode == "hang" or (self.mode == "stall_reads" and name == "GET"):
                    continue
                if self.mode == "garbage":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    continue
                reply = {
                    "PING": b"+PONG\r\n",
                    "EXISTS": b":1\r\n" if self.mode == "stall_reads" else b":0\r\n",
                    "DEL": b":0\r\n",
                    "GET": b"$-1\r\n",
                }.get(name, b"+OK\r\n")
                conn.sendall(reply)
        except (EOFError, OSError, ValueError):
            conn.close()
            with self.lock:
                self.closed += 1

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def fake() -> Iterator[FakeRedis]:
    server = FakeRedis()
    yield server
    server.close()


def test_a_redis_that_goes_silent_costs_one_request_the_budget(
    fake: FakeRedis, logs: pytest.LogCaptureFixture
) -> None:
    e = engine(fake.url, redis_timeout=0.02)  # the default budget: 20 ms
    toks = prompt(1)
    assert timed(lambda: e.lookup(toks))[0] == 0  # answered: a miss
    before = e.stats()
    assert before["redis_breaker_open"] is False and before["redis_timeouts"] == 0
    fake.mode = "hang"
    exists_before = fake.count("EXISTS")
    hit, first_ms = timed(lambda: e.lookup(toks))
    assert hit == 0
    s = e.stats()
    assert (s["redis_timeouts"], s["redis_breaker_trips"], s["redis_breaker_open"]) == (1, 1, True)
    assert s["redis_connected"] is False
    # Later requests do not touch Redis: no command reaches it, nothing more is counted but skips.
    later = []
    out = bytearray(4 * BLOCK_BYTES)
    for i in range(50):
        later.append(timed(lambda: e.lookup(toks))[1])
        t = prompt(100 + i)
        assert e.store(t, block_payload(t)) == 4
        n, ms = timed(lambda t=t: e.load(t, out))  # type: ignore[misc]
        assert n == 4 * BLOCK and bytes(out) == block_payload(t)  # memory still serves
        later.append(ms)
    assert returns(lambda: e.flush(10))
    s = e.stats()
    # One lookup's pipeline (an EXISTS per block), the one that timed out.
    assert fake.count("EXISTS") == exists_before + 4 and fake.count("GET") == 0
    assert fake.count("SET") == 0
    assert (s["redis_timeouts"], s["redis_breaker_trips"]) == (1, 1)
    assert s["redis_skipped_calls"] >= 50 and s["redis_dropped_blocks"] == 200
    metrics = metric_values(e)
    assert metrics["xconnector_redis_breaker_open"] == 1
    assert metrics["xconnector_redis_breaker_trips_total"] == 1
    assert metrics["xconnector_redis_timeouts_total"] == 1
    assert metrics["xconnector_redis_skipped_calls_total"] == s["redis_skipped_calls"]
    warnings = redis_records(logs, logging.WARNING, "timed out after 20 ms")
    assert len(warnings) == 1 and "lookup timed out after 20 ms" in warnings[0], logs.text
    print(
        f"\nhung Redis (silent listener), budget 20 ms: first lookup {first_ms:.1f} ms, "
        f"later lookups/loads median {sorted(later)[len(later) // 2]:.3f} ms, "
        f"max {max(later):.3f} ms"
    )
    # Redis answers again: the prober closes the breaker, with one INFO line.
    fake.mode = "redis"
    wait_for(lambda: not e.stats()["redis_breaker_open"], "the breaker to close")
    assert returns(lambda: e.lookup(toks)) == 0 and fake.count("EXISTS") == exists_before + 8
    assert len(redis_records(logs, logging.INFO, "answers again")) == 1
    assert len(redis_records(logs, logging.WARNING, "timed out")) == 1
    assert e.stats()["redis_breaker_trips"] == 1


def test_a_sigstopped_redis_mid_flight(redis: RedisServer, logs: pytest.LogCaptureFixture) -> None:
    assert redis.proc is not None
    writer, reader = engine(redis.url), engine(redis.url, redis_timeout=0.05)
    toks, other = prompt(2), prompt(3)
    for t in (toks, other):
        assert writer.store(t, block_payload(t)) == 4
    assert returns(lambda: writer.flush(30))
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        out = bytearray(4 * BLOCK_BYTES)
        n, first_ms = timed(lambda: reader.load(toks, out))
        assert n == 0 and not any(out)  # a miss, no bytes
        s = reader.stats()
        assert (s["redis_timeouts"], s["redis_breaker_trips"], s["redis_breaker_open"]) == (
            1,
            1,
            True,
        )
        later = [timed(lambda: reader.lookup(other))[1] for _ in range(20)]
        later += [timed(lambda: reader.load(other, out))[1] for _ in range(20)]
        t = prompt(4)
        reader.store(t, block_payload(t))
        assert returns(lambda: reader.flush(10))
        s = reader.stats()
        assert (s["redis_timeouts"], s["redis_errors"], s["redis_breaker_trips"]) == (1, 1, 1)
        assert s["redis_skipped_calls"] == 40 and s["redis_reads"] == 0
        assert s["redis_dropped_blocks"] == 4 and s["redis_written_blocks"] == 0
        warnings = redis_records(logs, logging.WARNING, "timed out")
        assert len(warnings) == 1 and "read timed out after 50 ms" in warnings[0], warnings
        print(
            f"\nSIGSTOPped redis-server, budget 50 ms: first load {first_ms:.1f} ms, later "
            f"lookups/loads median {sorted(later)[len(later) // 2]:.3f} ms, max {max(later):.3f} ms"
        )
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    wait_for(lambda: not reader.stats()["redis_breaker_open"], "the breaker to close")
    out = bytearray(4 * BLOCK_BYTES)
    assert returns(lambda: reader.load(toks, out)) == 4 * BLOCK
    assert bytes(out) == block_payload(toks)
    assert len(redis_records(logs, logging.INFO, "answers again")) == 1
    assert len(redis_records(logs, logging.WARNING, "timed out")) == 1


def test_a_large_legitimate_read_is_not_a_timeout(redis: RedisServer) -> None:
    mib = 1 << 20
    writer = engine(redis.url, blocks=64, block_bytes=mib)
    reader = engine(redis.url, blocks=64, block_bytes=mib, redis_timeout=0.02)  # the default budget
    toks = list(range(64 * BLOCK))
    payload = secrets.token_bytes(1024) * (64 * mib // 1024)
    assert writer.store(toks, payload) == 64
    assert returns(lambda: writer.flush(60))
    out = bytearray(64 * mib)
    n, ms = timed(lambda: reader.load(toks, out))
    s = reader.stats()
    assert (s["redis_timeouts"], s["redis_breaker_trips"]) == (0, 0), s
    assert n == 64 * BLOCK and out == payload
    print(f"\n64 x 1 MiB blocks from Redis (loopback) in one load: {ms:.1f} ms, budget 20 ms")


def http_listener() -> tuple[http.server.ThreadingHTTPServer, int]:
    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


def garbage_listener() -> tuple[socket.socket, int]:
    sock = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.sendall(b"\x00\x17\xfe not a protocol at all\r\n")
            conn.close()

    threading.Thread(target=run, daemon=True).start()
    return sock, sock.getsockname()[1]


def test_an_endpoint_that_is_not_redis_is_named_at_open() -> None:
    nats = NatsServer()
    http_srv, http_port = http_listener()
    raw, raw_port = garbage_listener()
    try:
        for port in (http_port, nats.port, raw_port):
            url = f"redis://:pw-not-shown@127.0.0.1:{port}"
            with pytest.raises(ConfigError) as info:
                engine(url)
            text = str(info.value)
            assert f"redis://:***@127.0.0.1:{port} is not a Redis server (" in text, text
            assert "pw-not-shown" not in text
    finally:
        http_srv.shutdown()
        http_srv.server_close()
        raw.close()
        nats.stop()


def test_a_redis_replaced_by_something_else_is_one_log_line(
    fake: FakeRedis, logs: pytest.LogCaptureFixture
) -> None:
    e = engine(fake.url)
    fake.mode = "garbage"
    toks = prompt(5)
    assert returns(lambda: e.lookup(toks)) == 0
    for _ in range(20):
        assert returns(lambda: e.lookup(toks)) == 0
    s = e.stats()
    assert (s["redis_breaker_trips"], s["redis_errors"], s["redis_skipped_calls"]) == (1, 1, 20)
    lines = redis_records(logs, logging.WARNING, "is not a Redis server")
    assert len(lines) == 1 and f"redis://127.0.0.1:{fake.port} is not a Redis server" in lines[0]


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, 1e9, 0.0000001])
def test_a_budget_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(XConnectorError, match=r"redis_timeout must be seconds from 0\.001 to 60"):
        Engine(
            block_bytes=64, capacity_bytes=640, redis_url="redis://127.0.0.1:1", redis_timeout=bad
        )


def lmcache_sdk(settings: dict[str, Any]) -> XConnectorSDK:
    sdk = XConnectorSDK({"mode": "hybrid", "adapters": [{"name": "lmcache", "config": settings}]})
    sdk.initialize()
    return sdk


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"remote_timeout_ms": 0},
            r"remote_timeout_ms: expected an integer from 1 to 60000, got 0",
        ),
        ({"remote_timeout_ms": 600000}, r"remote_timeout_ms: expected an integer from 1 to 60000"),
        ({"remote_timeout_ms": "20"}, r"remote_timeout_ms: expected an integer from 1 to 60000"),
        ({"remote_ttl_s": 0}, r"remote_ttl_s: expected an integer from 1 to 31536000, got 0"),
        ({"remote_auth_key": ""}, r"remote_auth_key: the secret is empty"),
        (
            {"remote_auth_key": 123456789},
            r"remote_auth_key: expected a string \(the secret\), got a number",
        ),
        (
            {"remote_auth_key_env": ""},
            r"remote_auth_key_env: expected the name of an environment variable",
        ),
        (
            {"remote_auth_key": "k", "remote_auth_key_env": "K"},
            "remote_auth_key and remote_auth_key_env both give the Redis auth key",
        ),
        (
            {"remote_auth_key_env": "XC_TEST_UNSET_REDIS_KEY"},
            "remote_auth_key_env: the environment variable XC_TEST_UNSET_REDIS_KEY is not set",
        ),
    ],
)
def test_redis_settings_are_checked(settings: dict[str, Any], message: str) -> None:
    os.environ.pop("XC_TEST_UNSET_REDIS_KEY", None)
    with pytest.raises(ConfigError, match=message) as info:
        lmcache_sdk({"remote_url": "redis://127.0.0.1:1", **settings})
    assert "123456789" not in str(info.value)


def test_the_yaml_budget_reaches_the_engine(
    fake: FakeRedis, logs: pytest.LogCaptureFixture
) -> None:
    sdk = lmcache_sdk({"remote_url": fake.url, "remote_timeout_ms": 75})
    try:
        adapter = sdk.get_adapter("lmcache")
        e = adapter.engine_for(  # type: ignore[union-attr]
            kv_block_size=BLOCK, kv_block_bytes=BLOCK_BYTES, model="m", dtype="", kv_layout=""
        )
        fake.mode = "hang"
        assert returns(lambda: e.lookup(prompt(6))) == 0
        assert e.stats()["redis_timeouts"] == 1
        assert len(redis_records(logs, logging.WARNING, "lookup timed out after 75 ms")) == 1
    finally:
        sdk.shutdown()


# Authenticated values.

SECRET = "xc-test-" + secrets.token_hex(16)


def key_of(e: Engine, toks: list[int], block: int) -> str:
    return f"xconnector:{e.namespace:016x}:{sequence_hashes(toks)[block]:016x}"


def test_authentic_values_are_served_and_planted_ones_refused(
    redis: RedisServer, logs: pytest.LogCaptureFixture
) -> None:
    writer = engine(redis.url, redis_auth_key=SECRET)
    toks = prompt(7)
    real = block_payload(toks)
    assert writer.store(toks, real) == 4 and returns(lambda: writer.flush(30))
    reader = engine(redis.url, redis_auth_key=SECRET)
    out = bytearray(4 * BLOCK_BYTES)
    assert returns(lambda: reader.load(toks, out)) == 4 * BLOCK and out == real
    assert reader.stats()["redis_unauthenticated_values"] == 0
    evil = bytes(b ^ 0xFF for b in real)

    def plant(**kw: Any) -> None:
        # A fresh engine writes all of the prompt's blocks, over the authentic ones.
        attacker = engine(redis.url, **kw)
        assert attacker.store(toks, evil) == 4 and returns(lambda: attacker.flush(30))

    def victim_reads() -> tuple[int, bytes, dict[str, Any]]:
        victim = engine(redis.url, redis_auth_key=SECRET)
        got = bytearray(4 * BLOCK_BYTES)
        n = returns(lambda: victim.load(toks, got))
        unauthenticated = metric_values(victim)["xconnector_unauthenticated_blocks_total"]
        assert unauthenticated == victim.stats()["redis_unauthenticated_values"]
        return n, bytes(got), victim.stats()

    # 1. A valid value of the unkeyed format (anyone with write access can make one).
    plant()
    n, got, s = victim_reads()
    assert (n, s["redis_unauthenticated_values"], s["redis_hit_blocks"]) == (0, 1, 0)
    assert s["redis_foreign_values"] == s["redis_corrupt_values"] == 0
    assert got == bytes(4 * BLOCK_BYTES)  # nothing copied out
    # Not deleted: keyed and unkeyed workers (a key being rolled out) must not wipe each other's
    # values; the next authentic store overwrites it.
    assert redis.cli("EXISTS", key_of(writer, toks, 0)).strip() == "1"
    # 2. Keyed with another secret.
    plant(redis_auth_key="another-secret")
    n, got, s = victim_reads()
    assert (n, s["redis_unauthenticated_values"]) == (0, 1) and got == bytes(4 * BLOCK_BYTES)
    # 3. An authentic value moved under another block's key (a raw client: COPY).
    writer2 = engine(redis.url, redis_auth_key=SECRET)
    other = prompt(8)
    assert writer2.store(other, block_payload(other)) == 4 and returns(lambda: writer2.flush(30))
    writer3 = engine(redis.url, redis_auth_key=SECRET)
    assert writer3.store(toks, real) == 4 and returns(lambda: writer3.flush(30))
    redis.cli("COPY", key_of(writer, other, 2), key_of(writer, toks, 2), "REPLACE")
    n, got, s = victim_reads()
    assert (n, s["redis_unauthenticated_values"]) == (2 * BLOCK, 1)
    assert got[: 2 * BLOCK_BYTES] == real[: 2 * BLOCK_BYTES] and not any(got[2 * BLOCK_BYTES :])
    # An unkeyed engine sees keyed values as foreign, never as KV.
    plain = engine(redis.url)
    got = bytearray(4 * BLOCK_BYTES)
    assert returns(lambda: plain.load(other, got)) == 0 and not any(got)
    assert plain.stats()["redis_foreign_values"] == 1
    # Logged once per engine, never with the secret.
    assert redis_records(logs, logging.WARNING, "no valid MAC")
    assert SECRET not in logs.text


def test_the_secret_is_never_shown(
    redis: RedisServer, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XC_TEST_REDIS_KEY", SECRET)
    sdk = lmcache_sdk({"remote_url": redis.url, "remote_auth_key_env": "XC_TEST_REDIS_KEY"})
    try:
        adapter = sdk.get_adapter("lmcache")
        assert adapter is not None
        e = adapter.engine_for(  # type: ignore[attr-defined]
            kv_block_size=BLOCK, kv_block_bytes=BLOCK_BYTES, model="m", dtype="", kv_layout=""
        )
        toks = prompt(9)
        assert e.store(toks, block_payload(toks)) == 4 and returns(lambda: e.flush(30))
        # The YAML's key reaches the engine: an engine with the same secret reads the values.
        reader = engine(redis.url, redis_auth_key=SECRET)
        out = bytearray(4 * BLOCK_BYTES)
        assert returns(lambda: reader.load(toks, out)) == 4 * BLOCK
        shown = [
            repr(e),
            str(e.stats()),
            e.prometheus(),
            repr(adapter),
            str(adapter.health()),  # type: ignore[attr-defined]
            repr(sdk),
            logs.text,
        ]
        for text in shown:
            assert SECRET not in text
    finally:
        sdk.shutdown()
    with pytest.raises(ConfigError, match="redis_auth_key is empty") as info:
        engine(redis.url, redis_auth_key="")
    # Debug logging of a keyed engine's whole life, on stderr.
    code = (
        "import sys; from xconnector import Engine; "
        "e = Engine(block_bytes=256, capacity_bytes=64*256, block_size=16, model='m', "
        "redis_url=sys.argv[1], redis_auth_key=sys.argv[2]); "
        "t = list(range(64)); e.store(t, bytes(4*256)); e.flush(30); e.load(t, bytearray(4*256)); "
        "print(e.stats(), repr(e))"
    )
    env = {**os.environ, "XCONNECTOR_LOG": "debug"}
    r = subprocess.run(
        [sys.executable, "-c", code, redis.url, SECRET],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "DEBUG" in r.stderr and SECRET not in r.stderr and SECRET not in r.stdout
    assert SECRET not in str(info.value)


def test_a_redis_that_answers_ping_but_stalls_reads(
    fake: FakeRedis, logs: pytest.LogCaptureFixture
) -> None:
    """The probe succeeds, every read stalls: a load waits one 4 MiB chunk's allowance, not the
    whole request's; and the re-trips after each successful probe are one episode, not a line
    each."""
    mib = 1 << 20
    e = engine(fake.url, blocks=64, block_bytes=mib, redis_timeout=0.02)
    fake.mode = "stall_reads"
    toks = prompt(5, blocks=64)
    out = bytearray(64 * mib)
    assert returns(lambda: e.load(toks, out)) == 0 and not any(out[:mib])
    # One chunk (4 MiB: 3 values of 1 MiB and their headers) was asked, and nothing after it:
    # the next chunk is read ahead only once a chunk's values have all come.
    wait_for(lambda: fake.count("GET") >= 3, "the chunk's GETs to arrive")
    assert fake.count("GET") == 3, "no chunk after the one that stalled"
    said = redis_records(logs, logging.WARNING, "timed out after")
    # The deadline it logs: 20 ms plus at most one 4 MiB chunk at 32 MiB/s (145 ms), where the
    # whole request's 64 MiB used to get 2 s.
    assert len(said) == 1, said
    limit_ms = int(said[0].split("timed out after ")[1].split(" ms")[0])
    assert 20 < limit_ms <= 20 + 125, said
    for trip in (2, 3):
        wait_for(lambda: not e.stats()["redis_breaker_open"], "the probe to close the breaker")
        assert returns(lambda: e.load(toks, out)) == 0
        assert e.stats()["redis_breaker_trips"] == trip
    assert len(redis_records(logs, logging.WARNING, "timed out after")) == 1, logs.text
    # The first close is logged; the trips and closes of the flapping after it are not.
    assert len(redis_records(logs, logging.INFO, "answers again")) == 1, logs.text


def test_a_stalled_pipeline_frees_its_connection_at_the_deadline(fake: FakeRedis) -> None:
    """A load's chunk of 64 KiB blocks is a pipeline of 63 GETs. When Redis stalls it, the
    connection is given up (closed) once the call's deadline passes, not after a socket timeout
    per reply (63 x 145 ms, about 9 s, during which a helper thread stayed blocked)."""
    e = engine(fake.url, blocks=64, block_bytes=64 << 10, redis_timeout=0.02)
    fake.mode = "stall_reads"
    with fake.lock:
        closed = fake.closed
    out = bytearray(64 * (64 << 10))
    assert returns(lambda: e.load(prompt(6, blocks=64), out)) == 0
    wait_for(lambda: fake.count("GET") >= 63, "the chunk's GETs to arrive")
    # Well under the 9 s the old reader held it: a bound on waiting, not a measurement.
    wait_for(lambda: fake.closed > closed, "the stalled connection to be closed", timeout=3.0)
