"""XConnector's peer events (its own NATS channel between XConnector workers, not Dynamo's event
plane) on a real nats-server on loopback: stored and removed block events with Dynamo's hash
definitions, stores that never wait on NATS (even when it is absent), and a distributed handler
scoring another worker from its events."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import BLOCK, block_payload
from services import NatsServer, free_port

from xconnector import Engine, local_block_hashes, native, sequence_hashes
from xconnector.sdk import XConnectorSDK

BLOCK_BYTES = 256
SUBJECT = "test.kv_events"


@pytest.fixture
def nats() -> Iterator[NatsServer]:
    server = NatsServer()
    yield server
    server.stop()


def engine(url: str, blocks: int = 64, worker: str = "w1") -> Engine:
    return Engine(
        block_bytes=BLOCK_BYTES,
        capacity_bytes=blocks * BLOCK_BYTES,
        block_size=BLOCK,
        model="m",
        events_url=url,
        events_subject=SUBJECT,
        worker_id=worker,
    )


def collect(sub: Any, want: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for _ in range(100):
        batch = sub.next(0.1)
        if batch is not None:
            assert batch["worker_id"] == "w1"
            events += batch["events"]
        if len(events) >= want:
            break
    return events


def test_stored_and_removed_events_carry_dynamos_hashes(nats: NatsServer) -> None:
    sub = native().EventSubscriber(nats.url, SUBJECT)
    e = engine(nats.url, blocks=4)
    toks = list(range(100, 100 + 3 * BLOCK + 5))
    e.store(toks, block_payload(toks)[: 3 * BLOCK_BYTES])
    assert e.flush(10)
    events = collect(sub, 1)
    stored = [ev for ev in events if ev["kind"] == "stored"]
    assert stored[0]["parent_hash"] is None
    assert stored[0]["block_hashes"] == sequence_hashes(toks)
    assert stored[0]["tokens_hashes"] == local_block_hashes(toks)
    # Extending the chain: the new block names its parent.
    longer = toks[: 3 * BLOCK] + list(range(5000, 5000 + BLOCK))
    e.store(longer, block_payload(longer))
    # A 4-block memory tier: storing another 2-block prompt evicts 2 leaves -> removed events.
    other = list(range(7000, 7000 + 2 * BLOCK))
    e.store(other, block_payload(other))
    assert e.flush(10)
    events = collect(sub, 3)
    kinds = [ev["kind"] for ev in events]
    assert "removed" in kinds, events
    ext = next(ev for ev in events if ev["kind"] == "stored" and ev["parent_hash"] is not None)
    assert ext["parent_hash"] == sequence_hashes(longer)[2]
    assert ext["block_hashes"] == sequence_hashes(longer)[3:]
    removed = [h for ev in events if ev["kind"] == "removed" for h in ev["block_hashes"]]
    assert len(removed) == 2 and set(removed) <= set(sequence_hashes(longer))
    ids = [ev["event_id"] for ev in events]
    assert ids == sorted(ids)
    stats = e.stats()
    assert stats["events_published"] >= 4 and stats["events_dropped"] == 0


def test_stores_succeed_when_nats_is_absent() -> None:
    e = engine(f"nats://127.0.0.1:{free_port()}")
    for i in range(20):
        toks = list(range(i * 1000, i * 1000 + 2 * BLOCK))
        assert e.store(toks, block_payload(toks)) == 2
        assert e.lookup(toks) == 2 * BLOCK
    e.flush(5)
    stats = e.stats()
    assert stats["events_published"] == 0 and stats["events_dropped"] > 0


def test_a_worker_scores_another_from_its_events(nats: NatsServer) -> None:
    config = {
        "adapters": [{"name": "dynamo", "config": {"worker_id": "me", "nats_url": nats.url}}],
    }
    with XConnectorSDK(config) as sdk:
        dist = sdk.get_distributed_handler()
        subject = sdk.get_adapter("dynamo").kv_events_subject  # type: ignore[union-attr]
        other = Engine(
            block_bytes=BLOCK_BYTES,
            capacity_bytes=64 * BLOCK_BYTES,
            block_size=16,
            model="m",
            events_url=nats.url,
            events_subject=subject,
            worker_id="peer-7",
        )
        toks = list(range(3000, 3000 + 4 * BLOCK))
        other.store(toks, block_payload(toks))
        assert other.flush(10)
        for _ in range(100):
            if dist.score([*toks, 1, 2, 3]):
                break
            time.sleep(0.05)
        assert dist.score([*toks, 1, 2, 3]) == [("peer-7", 4 * BLOCK)]
        assert dist.events_applied >= 1
