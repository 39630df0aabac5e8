"""Forking a worker whose SDK is live: its engine has a Redis writer and a NATS publisher running
on XConnector's I/O runtime, and its distributed handler follows the peer events subject. The
forked child gets its own SDK (the autopatch's `minimal_sdk` re-creates it), and with it a new
runtime; both processes keep working: the child reads what the parent wrote before the fork and
stores its own blocks, the parent reads those back from Redis, and both publish peer events (the
parent's handler scores the child from them). Real processes, real redis-server and nats-server
on loopback; a hang fails the test through the subprocess timeout."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from services import NatsServer, RedisServer

from xconnector import native, sequence_hashes

TESTS = Path(__file__).resolve().parent
SUBJECT = "test.fork.kv_events"

SCRIPT = r"""
import json, os, sys, time, traceback
sys.path.insert(0, sys.argv[4])
from v0_worker import BLOCK, new_kv_caches
from xconnector.sdk import process as minimal_sdk
from xconnector.config.schema import SDKConfig

redis_url, nats_url, subject = sys.argv[1], sys.argv[2], sys.argv[3]
minimal_sdk.configure(SDKConfig.from_dict({
    "enabled": True,
    "mode": "hybrid",
    "adapters": [
        {"name": "lmcache", "config": {"storage_backend": "redis", "remote_url": redis_url}},
        {"name": "dynamo", "config": {"nats_url": nats_url, "kv_events_subject": subject}},
    ],
}))
IDS = [1, 2, 3, 4]


def prompt(seed):
    return list(range(seed * 1000, seed * 1000 + len(IDS) * BLOCK))


def value(seed, layer, k):
    # Distinct per prompt, layer and block (small integers are exact in float16).
    return seed * 100 + layer * 10 + k


def store(seed):
    sdk = minimal_sdk.get_sdk()
    caches = new_kv_caches(16)
    for li, layer in enumerate(caches):
        for k, b in enumerate(IDS):
            layer[:, b] = value(seed, li, k)
    kv = sdk.get_kv_handler()
    n = kv.store(prompt(seed), caches, IDS)
    assert kv.engine.flush(30), "blocks or events still queued after 30 s"
    return n


def load(seed):
    # Into other cache blocks than the ones stored from, reversed: a swapped block shows.
    sdk = minimal_sdk.get_sdk()
    dst = new_kv_caches(16)
    kv = sdk.get_kv_handler()
    kv.bind(dst)
    ids = [12, 11, 10, 9]
    n = kv.load(prompt(seed), dst, ids)
    right = all(
        (layer[:, b] == value(seed, li, k)).all()
        for li, layer in enumerate(dst)
        for k, b in enumerate(ids[: n // BLOCK])
    )
    return n, right


def state(sdk):
    s = sdk.get_kv_handler().engine.stats()
    return {
        "worker": sdk.get_adapter("dynamo").worker_id,
        "pid": os.getpid(),
        "events_published": s["events_published"],
        "events_dropped": s["events_dropped"],
        "redis_written_blocks": s["redis_written_blocks"],
        "redis_hit_blocks": s["redis_hit_blocks"],
        "redis_errors": s["redis_errors"],
    }


parent = minimal_sdk.get_sdk()
out = {"stored_before_fork": store(1)}
out["before_fork"] = state(parent)
sys.stdout.flush()
pid = os.fork()
if pid == 0:
    try:
        sdk = minimal_sdk.get_sdk()
        child = {"own_sdk": sdk is not parent}
        child["loaded_parents"] = load(1)
        child["stored"] = store(2)
        child["state"] = state(sdk)
        print(json.dumps({"child": child}), flush=True)
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
_, status = os.waitpid(pid, 0)
out["child_exit"] = os.waitstatus_to_exitcode(status)
out["same_sdk"] = minimal_sdk.get_sdk() is parent
out["loaded_childs"] = load(2)
out["stored_after_fork"] = store(3)
dist = parent.get_distributed_handler()
for _ in range(200):
    scores = dict(dist.score(prompt(2) + [7]))
    if any(w != out["before_fork"]["worker"] for w in scores):
        break
    time.sleep(0.05)
out["scores_for_childs_prompt"] = sorted(scores.items())
out["after_fork"] = state(parent)
print(json.dumps({"parent": out}), flush=True)
"""


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[RedisServer, NatsServer]]:
    redis = RedisServer(tmp_path)
    try:
        nats = NatsServer()
    except BaseException:
        redis.stop()
        raise
    yield redis, nats
    nats.stop()
    redis.stop()


def test_a_forked_worker_and_its_parent_both_keep_redis_and_events(
    servers: tuple[RedisServer, NatsServer],
) -> None:
    redis, nats = servers
    sub = native().EventSubscriber(nats.url, SUBJECT)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, redis.url, nats.url, SUBJECT, str(TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    child: dict[str, Any] = next(x["child"] for x in lines if "child" in x)
    parent: dict[str, Any] = next(x["parent"] for x in lines if "parent" in x)
    before, after, mine = parent["before_fork"], parent["after_fork"], child["state"]

    # Before the fork the parent's tier and publisher were live: a writer and a runtime to inherit.
    assert parent["stored_before_fork"] == 4
    assert before["redis_written_blocks"] == 4 and before["events_published"] == 1

    # The child: a new SDK of its own (its own worker id), which reads the parent's blocks from
    # Redis, byte for byte, and writes and publishes its own.
    assert parent["child_exit"] == 0
    assert child["own_sdk"] is True and mine["pid"] != before["pid"]
    assert mine["worker"] != before["worker"]
    assert child["loaded_parents"] == [64, True]
    assert mine["redis_hit_blocks"] == 4  # from Redis: its memory tier started empty
    assert child["stored"] == 4
    assert mine["redis_written_blocks"] == 4
    assert mine["events_published"] == 1 and mine["events_dropped"] == 0
    assert mine["redis_errors"] == 0

    # The parent: the same SDK, reading the child's blocks from Redis and writing new ones.
    assert parent["same_sdk"] is True
    assert parent["loaded_childs"] == [64, True]
    assert parent["stored_after_fork"] == 4
    assert after["redis_hit_blocks"] == before["redis_hit_blocks"] + 4
    assert after["redis_written_blocks"] == before["redis_written_blocks"] + 4
    assert after["events_published"] == before["events_published"] + 1
    assert after["events_dropped"] == 0 and after["redis_errors"] == 0
    # Its distributed handler (subscribed before the fork) got the child's events.
    assert [mine["worker"], 64] in parent["scores_for_childs_prompt"]

    # Every stored event reached NATS, from both processes, with the prompts' hashes (loads
    # promote into memory without announcing anything).
    want = {
        (before["worker"], tuple(sequence_hashes(list(range(1000, 1064))))),
        (before["worker"], tuple(sequence_hashes(list(range(3000, 3064))))),
        (mine["worker"], tuple(sequence_hashes(list(range(2000, 2064))))),
    }
    seen: set[tuple[str, tuple[int, ...]]] = set()
    for _ in range(100):
        batch = sub.next(0.1)
        if batch is not None:
            for ev in batch["events"]:
                if ev["kind"] == "stored":
                    seen.add((batch["worker_id"], tuple(ev["block_hashes"])))
        if seen >= want:
            break
    assert seen == want
