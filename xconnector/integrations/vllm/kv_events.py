"""XConnector's blocks as vLLM KV events, so a KV-aware router (Dynamo's, through `dynamo.vllm`'s
relay of vLLM's event stream) knows which worker holds a prefix in host memory ("CPU") or on disk
("STORAGE"). Worker side: `events_for_vllm` turns the engine's block changes into `BlockStored` /
`BlockRemoved`, handed up in an `XConnectorKVEvents` container; scheduler side: `RankAgreement`
merges every rank's. What to report, under which names, is decided by the core
(`xconnector_core::vllm_events`), which makes vLLM's objects with the classes given here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent, KVConnectorKVEvents
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from xconnector import native

#: One engine change, as `Engine.take_block_events` returns it.
Change = tuple[str, str, "int | None", list[int], list[int], "str | None", "str | None"]


def vllm_names(request: Any, block_size: int) -> list[Any] | None:
    """vLLM's names of the request's full blocks, or None when vLLM hashes it at another
    granularity than its block size."""
    hashes = getattr(request, "block_hashes", None)
    if not hashes or len(hashes) != int(request.num_tokens) // block_size:
        return None
    return [maybe_convert_block_hash(h) for h in hashes]


def events_for_vllm(
    changes: Sequence[Change], block_size: int, engine_block: int, names: Any = None
) -> list[KVCacheEvent]:
    """vLLM events for the engine's changes; `block_size` is vLLM's, `engine_block` XConnector's
    (a multiple of it); `names`, a native `VllmBlockNames`, holds vLLM's names learnt so far."""
    names = native().VllmBlockNames() if names is None else names
    out: list[KVCacheEvent] = names.vllm_events(
        changes, block_size, engine_block, BlockStored, BlockRemoved
    )
    return out


class XConnectorKVEvents(KVConnectorKVEvents):  # type: ignore[misc]
    """One batch of events per worker, in rank order. vLLM's aggregator starts from the first
    worker's container and adds each other worker's events with `add_events`; the scheduler
    decides what they mean together (`RankAgreement`)."""

    def __init__(self, events: list[KVCacheEvent] | None = None) -> None:
        self._batches: list[list[KVCacheEvent]] = [list(events or [])]

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._batches.append(list(events))

    def increment_workers(self, count: int = 1) -> None:
        return None  # every add_events is one worker's batch

    def aggregate(self) -> XConnectorKVEvents:
        return self

    def get_all_events(self) -> list[KVCacheEvent]:
        return [e for batch in self._batches for e in batch]

    def get_number_of_workers(self) -> int:
        return len(self._batches)

    def clear_events(self) -> None:
        self._batches = [[]]

    def batches(self) -> list[list[KVCacheEvent]]:
        return self._batches


class RankAgreement:
    """What the router should be told, given what each rank says (the core's
    `VllmRankAgreement`): every tensor/pipeline rank holds its own part of a block, so a block is
    announced when the last rank reports it, removed when the first drops it, and once only."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.core = native().VllmRankAgreement(world)

    def merge(self, batches: list[list[KVCacheEvent]]) -> list[KVCacheEvent]:
        out: list[KVCacheEvent] = self.core.merge(batches, BlockStored, BlockRemoved)
        return out
