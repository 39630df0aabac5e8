"""The shared tier on a real Redis Cluster on loopback (3 primaries with a replica each, made by
`redis-cli --cluster create`), with TLS and a password as for one server: blocks spread over
every primary and are shared across processes; a primary killed mid-run costs misses (counted)
while a replica takes over, never an error in the worker or a wrong byte; a primary added and
slots moved (keys migrating, ASK and MOVED redirections) while a worker loads and stores changes
nothing it reads."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BLOCK, block_payload
from services import RedisCluster, RedisServer, make_tls_cert
from test_redis_tier import BLOCK_BYTES
from test_redis_tier import engine as redis_engine

from xconnector import Engine
from xconnector.exceptions import ConfigError

PROMPT_BLOCKS = 4


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path, masters=3, password="cluster-pw")
    yield c
    c.stop()


def engine(url: str, blocks: int = PROMPT_BLOCKS, ca_file: Path | None = None) -> Engine:
    """An engine whose memory holds one prompt: cycling through several, each load reads Redis."""
    return redis_engine(
        url,
        blocks,
        redis_queue_blocks=4096,
        redis_timeout=1.0,
        redis_ca_file=str(ca_file) if ca_file else None,
    )


def prompt(seed: int) -> list[int]:
    return list(range(seed * 10_000, seed * 10_000 + PROMPT_BLOCKS * BLOCK))


def store_all(e: Engine, seeds: range) -> None:
    for s in seeds:
        toks = prompt(s)
        e.store(toks, block_payload(toks, BLOCK_BYTES))
    assert e.flush(60)


def check_load(e: Engine, seed: int) -> int:
    """Loads prompt `seed`; whatever prefix is served must be its exact bytes. Blocks served."""
    toks = prompt(seed)
    out = bytearray(PROMPT_BLOCKS * BLOCK_BYTES)
    n = e.load(toks, out)
    assert n % BLOCK == 0
    served = n // BLOCK * BLOCK_BYTES
    assert bytes(out[:served]) == block_payload(toks, BLOCK_BYTES)[:served], f"wrong KV for {seed}"
    return n // BLOCK


def wait_for_breaker_closed(e: Engine) -> None:
    """Until the probe finds the cluster answering (a trip during a test's fault may be late)."""
    deadline = time.monotonic() + 60
    while e.stats()["redis_breaker_open"]:
        assert time.monotonic() < deadline, "the Redis tier's breaker never closed"
        time.sleep(0.05)


def test_blocks_spread_over_every_primary_and_are_shared_across_processes(
    cluster: RedisCluster,
) -> None:
    seeds = range(1, 33)
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); "
        "from test_redis_cluster import engine, store_all; "
        "e = engine(sys.argv[1]); store_all(e, range(1, 33)); "
        "assert e.stats()['redis_written_blocks'] == 32 * 4, e.stats()"
    )
    here = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", code, cluster.url, here], check=True)
    # Keys carry no hash tag: every primary holds some of the 128 blocks.
    counts = [int(m.cli("DBSIZE")) for m in cluster.masters()]
    assert len(counts) == 3 and all(c > 0 for c in counts) and sum(counts) == 32 * 4, counts
    e = engine(cluster.url)
    for s in seeds:
        assert e.lookup(prompt(s)) == PROMPT_BLOCKS * BLOCK
        assert check_load(e, s) == PROMPT_BLOCKS
    stats = e.stats()
    assert stats["redis_hit_blocks"] == 32 * 4 and stats["redis_errors"] == 0, stats
    # Another model's engine never sees them.
    other = Engine(
        block_bytes=BLOCK_BYTES,
        capacity_bytes=PROMPT_BLOCKS * BLOCK_BYTES,
        block_size=BLOCK,
        model="other",
        redis_url=cluster.url,
    )
    assert other.lookup(prompt(1)) == 0


def test_a_primary_killed_mid_run_costs_misses_never_errors_or_wrong_bytes(
    cluster: RedisCluster,
) -> None:
    seeds = range(1, 41)
    writer = engine(cluster.url)
    store_all(writer, seeds)
    cluster.wait_replicated()
    reader = engine(cluster.url)
    for s in seeds:  # the reader's connections reach every primary
        assert check_load(reader, s) == PROMPT_BLOCKS
    before = reader.stats()
    victim = cluster.masters()[0]
    victim.kill9()
    # Loads (and stores) go on through the failover; each pass must serve exact bytes only.
    passes, partial = 0, 0
    deadline = time.monotonic() + 120
    while True:
        served = [check_load(reader, s) for s in seeds]
        writer.store(prompt(1000 + passes), block_payload(prompt(1000 + passes), BLOCK_BYTES))
        passes += 1
        partial += sum(n < PROMPT_BLOCKS for n in served)
        if all(n == PROMPT_BLOCKS for n in served):
            break
        assert time.monotonic() < deadline, "the shared tier never recovered from the failover"
        time.sleep(0.05)
    after = reader.stats()
    # The reader met the dead primary: counted, as misses, not raised.
    assert after["redis_errors"] > before["redis_errors"], after
    assert partial > 0 and passes > 1
    # The replica that took over serves the dead primary's blocks: every block came from Redis.
    assert after["redis_hit_blocks"] - before["redis_hit_blocks"] >= len(seeds) * PROMPT_BLOCKS
    cluster.wait_ok()
    assert victim.port not in [m.port for m in cluster.masters()]


def test_a_primary_added_and_slots_moved_while_a_worker_runs(cluster: RedisCluster) -> None:
    seeds = range(1, 41)
    worker = engine(cluster.url)
    store_all(worker, seeds)
    stop = threading.Event()
    failures: list[BaseException] = []
    rounds = [0]

    def work() -> None:
        try:
            i = 0
            while not stop.is_set():
                for s in seeds:
                    check_load(worker, s)
                toks = prompt(2000 + i)
                worker.store(toks, block_payload(toks, BLOCK_BYTES))
                i += 1
                rounds[0] += 1
        except BaseException as exc:  # reported by the test below
            failures.append(exc)

    t = threading.Thread(target=work)
    t.start()
    try:
        new = cluster.add_master(slots=4096)
    finally:
        stop.set()
        t.join(timeout=120)
    assert not t.is_alive() and not failures, failures
    assert rounds[0] > 0
    # Keys moved with their slots; the same long-lived engine follows them (MOVED), and a fresh
    # one in another process's place finds everything too, each block read from Redis (memory
    # holds one prompt).
    assert int(new.cli("DBSIZE")) > 0
    wait_for_breaker_closed(worker)
    for e in (worker, engine(cluster.url)):
        hits = e.stats()["redis_hit_blocks"]
        for s in seeds:
            assert check_load(e, s) == PROMPT_BLOCKS
        assert e.stats()["redis_hit_blocks"] - hits >= (len(seeds) - 1) * PROMPT_BLOCKS
    assert worker.flush(60)


def test_tls_and_a_password_as_for_one_server(tmp_path: Path) -> None:
    ca, cert, key = make_tls_cert(tmp_path)
    c = RedisCluster(tmp_path, masters=3, password="tls-pw", tls=(ca, cert, key))
    try:
        assert c.url.startswith("rediss-cluster://:tls-pw@")
        e = engine(c.url, ca_file=ca)
        store_all(e, range(1, 9))
        assert e.stats()["redis_written_blocks"] == 8 * PROMPT_BLOCKS
        reader = engine(c.url, ca_file=ca)
        for s in range(1, 9):
            assert check_load(reader, s) == PROMPT_BLOCKS
        # Without the CA no node is trusted; with a wrong password none lets us in: misses and a
        # clear error, never an exception from a request.
        untrusting = engine(c.url)
        assert untrusting.lookup(prompt(1)) == 0 and untrusting.stats()["redis_errors"] >= 1
        with pytest.raises(ConfigError, match="refused the credentials"):
            engine(c.url.replace("tls-pw", "wrong"), ca_file=ca)
    finally:
        c.stop()


def test_check_config_reaches_the_cluster_without_showing_its_password(
    cluster: RedisCluster, tmp_path: Path
) -> None:
    def check(url: str) -> subprocess.CompletedProcess[str]:
        f = tmp_path / "cfg.yaml"
        f.write_text(
            "xconnector:\n  enabled: true\n  mode: hybrid\n  adapters:\n"
            "    - name: lmcache\n      type: cache\n"
            f"      config:\n        storage_backend: redis\n        remote_url: {url!r}\n"
        )
        cmd = [sys.executable, "-m", "xconnector", "check-config", str(f)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    ok = check(cluster.url)
    assert ok.returncode == 0 and "did not answer" not in ok.stdout + ok.stderr, ok
    assert "cluster-pw" not in ok.stdout + ok.stderr and "redis-cluster://" in ok.stdout
    wrong = check(cluster.url.replace("cluster-pw", "wrong-pw"))
    assert wrong.returncode == 1 and "refused the connection" in wrong.stdout, wrong
    assert "wrong-pw" not in wrong.stdout + wrong.stderr


def test_a_url_that_does_not_match_the_servers_is_a_clear_error(
    cluster: RedisCluster, tmp_path: Path
) -> None:
    # One node of a cluster named as one server: most blocks would be MOVED elsewhere.
    node = cluster.masters()[0]
    with pytest.raises(
        ConfigError, match="is a node of a Redis Cluster of several primaries; name the cluster as"
    ):
        engine(f"redis://:cluster-pw@127.0.0.1:{node.port}")
    # A server without cluster support named as a cluster.
    (tmp_path / "one").mkdir()
    single = RedisServer(tmp_path / "one")
    try:
        with pytest.raises(ConfigError, match="have cluster support disabled; use redis://"):
            engine(f"redis-cluster://127.0.0.1:{single.port}")
    finally:
        single.stop()
