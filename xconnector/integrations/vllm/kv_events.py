"""XConnector's blocks as vLLM KV events, so a KV-aware router (Dynamo's, through `dynamo.vllm`'s
relay of vLLM's event stream) knows which worker holds a prefix in host memory ("CPU") or on disk
("STORAGE"). Worker side: `events_for_vllm` turns the engine's block changes into `BlockStored` /
`BlockRemoved`, handed up in an `XConnectorKVEvents` container; scheduler side: `RankAgreement`
merges every rank's. What to report, under which names, is decided by the core
(`xconnector_core::vllm_events`); this module only builds vLLM's objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent, KVConnectorKVEvents
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from xconnector import native

#: One engine change, as `Engine.take_block_events` returns it.
Change = tuple[str, str, "int | None", list[int], list[int], "str | None", "str | None"]
#: `BlockStored`'s fields, in the order `_stored` takes them.
_STORED = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")


def _stored(*fields: Any, lora_name: str | None, extra_keys: Any) -> BlockStored:
    return BlockStored(
        **dict(zip(_STORED, fields, strict=True)), lora_name=lora_name, extra_keys=extra_keys
    )


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
    out: list[KVCacheEvent] = []
    for kind, medium, ids, parent, tokens, lora, keys in names.events(
        changes, block_size, engine_block
    ):
        if kind == "removed":
            out.append(BlockRemoved(block_hashes=ids, medium=medium))
        else:
            fields = (ids, parent, tokens, block_size, None, medium)
            out.append(_stored(*fields, lora_name=lora, extra_keys=keys))
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
        out: list[KVCacheEvent] = []
        for rank, batch in enumerate(batches):
            for e in batch:
                if isinstance(e, BlockStored):
                    out.extend(
                        _part(e, a, b) for a, b in self.core.stored(rank, e.medium, e.block_hashes)
                    )
                elif isinstance(e, BlockRemoved) and (
                    gone := self.core.removed(rank, e.medium, e.block_hashes)
                ):
                    out.append(BlockRemoved(block_hashes=gone, medium=e.medium))
        return out


def _part(e: BlockStored, a: int, b: int) -> BlockStored:
    """Blocks `a:b` of `e`, linked to the block before them."""
    bs, names, keys = e.block_size, e.block_hashes, e.extra_keys
    parent = e.parent_block_hash if a == 0 else names[a - 1]
    fields = (names[a:b], parent, e.token_ids[a * bs : b * bs], bs, e.lora_id, e.medium)
    return _stored(*fields, lora_name=e.lora_name, extra_keys=keys and keys[a:b])
