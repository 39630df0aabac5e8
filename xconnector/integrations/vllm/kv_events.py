"""XConnector's blocks as vLLM KV events, so a KV-aware router (Dynamo's, through `dynamo.vllm`'s
relay of vLLM's event stream) knows which worker holds a prefix in host memory or on disk.

Worker side: the engine records what its memory and disk tiers gain and lose
(`Engine.enable_block_events` / `take_block_events`); each step `events_for_vllm` turns that into
`BlockStored` / `BlockRemoved` in vLLM's terms (vLLM's block size, the blocks' token ids, parent
linkage, LoRA name) and the connector hands them up in an `XConnectorKVEvents` container.
Scheduler side: `common_events` keeps what every worker reported (each tensor/pipeline rank holds
its own part of a block: a block only some ranks hold is no hit), and `take_events` gives it to
vLLM's publisher with its own events of the step.

Names: the receiver hashes the token ids itself; a block's name links it to its parent and to its
removal, and Dynamo's router continues a worker's GPU match into its host and disk tiers by name.
So blocks are named as vLLM names them (its block hashes, `maybe_convert_block_hash`), learnt
from the requests that store or load them (`BlockNames`); a block whose vLLM name is unknown
(vLLM hashes at another granularity) is named by XConnector's sequence hash, or when XConnector's
block is several vLLM blocks (LMCache's `chunk_size`), by a name derived from it and the
position, the same at store and at removal.

Mediums are vLLM's own: host memory is "CPU", the disk tier "STORAGE" (Dynamo 1.6.1 files them
under its host-pinned and disk tiers). The shared Redis tier is not reported: every worker reads
it alike, so it is no reason to prefer one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
from vllm.distributed.kv_events import (
    MEDIUM_CPU,
    MEDIUM_STORAGE,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
)
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from xconnector import native

#: vLLM's `medium` for each of XConnector's tiers.
MEDIUMS = {"memory": MEDIUM_CPU, "disk": MEDIUM_STORAGE}
#: Names remembered at most (blocks held in memory and on disk, with room for churn).
_MAX_NAMES = 1 << 20

#: One engine change, as `Engine.take_block_events` returns it.
Change = tuple[str, str, "int | None", list[int], list[int], "str | None", "str | None"]


def _sub_id(chunk_hash: int, j: int, k: int) -> int:
    """The name of vLLM block `j` of the `k` in an XConnector block."""
    if k == 1:
        return chunk_hash
    raw = chunk_hash.to_bytes(8, "little") + j.to_bytes(4, "little")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def vllm_names(request: Any, block_size: int) -> list[Any] | None:
    """vLLM's names of the request's full blocks, or None when vLLM hashes it at another
    granularity than its block size."""
    hashes = getattr(request, "block_hashes", None)
    if not hashes or len(hashes) != int(request.num_tokens) // block_size:
        return None
    return [maybe_convert_block_hash(h) for h in hashes]


class BlockNames:
    """vLLM's names of the blocks XConnector holds, by XConnector's hash, while a tier holds
    them (learnt before a transfer, forgotten once no tier reports holding the block)."""

    def __init__(self) -> None:
        self._names: dict[int, list[Any]] = {}
        self._holders: dict[int, int] = {}

    def learn(
        self,
        engine_block: int,
        block_size: int,
        tokens: list[int],
        names: list[Any],
        extras: dict[str, str | None],
    ) -> None:
        k = engine_block // block_size
        ours = native().sequence_hashes(
            tokens, engine_block, lora_name=extras["lora_name"], cache_salt=extras["cache_salt"]
        )
        for i, h in enumerate(ours):
            if (i + 1) * k > len(names):
                break
            if h not in self._names and len(self._names) >= _MAX_NAMES:
                del self._names[next(iter(self._names))]  # the oldest: a leak's bound
            self._names[h] = names[i * k : (i + 1) * k]

    def of(self, h: int, k: int) -> list[Any]:
        return self._names.get(h) or [_sub_id(h, j, k) for j in range(k)]

    def held(self, h: int, delta: int) -> None:
        n = self._holders.get(h, 0) + delta
        if n > 0:
            self._holders[h] = n
        else:
            self._holders.pop(h, None)
            self._names.pop(h, None)


def _extra_keys(n: int, first: bool, lora_name: str | None, salt: str | None) -> Any:
    """vLLM's per-block extra keys for a LoRA name and a cache salt (the salt is in the first
    block of a request only), as its own events carry them; None when neither applies."""
    lora = (lora_name,) if lora_name else ()
    keys: list[tuple[Any, ...] | None] = [lora or None] * n
    if salt and first and n:
        keys[0] = (*lora, salt)
    return keys if any(keys) else None


def events_for_vllm(
    changes: Sequence[Change], block_size: int, engine_block: int, names: BlockNames | None = None
) -> list[KVCacheEvent]:
    """vLLM events for the engine's changes; `block_size` is vLLM's, `engine_block` XConnector's
    (a multiple of it)."""
    k = engine_block // block_size
    names = names if names is not None else BlockNames()
    out: list[KVCacheEvent] = []
    for kind, medium, parent, hashes, tokens, lora_name, salt in changes:
        ids = [n for h in hashes for n in names.of(h, k)]
        if kind == "removed":
            out.append(BlockRemoved(block_hashes=ids, medium=MEDIUMS[medium]))
            for h in hashes:
                names.held(h, -1)
            continue
        out.append(
            BlockStored(
                block_hashes=ids,
                parent_block_hash=None if parent is None else names.of(parent, k)[-1],
                token_ids=list(tokens),
                block_size=block_size,
                lora_id=None,
                medium=MEDIUMS[medium],
                lora_name=lora_name,
                extra_keys=_extra_keys(len(ids), parent is None, lora_name, salt),
            )
        )
        for h in hashes:
            names.held(h, 1)
    return out


class XConnectorKVEvents(KVConnectorKVEvents):  # type: ignore[misc]
    """One batch of events per worker. vLLM's aggregator starts from the first worker's container
    and adds each other worker's events with `add_events` + `increment_workers`; the scheduler
    then keeps the events every worker reported, in order, once each (vLLM's own counting
    aggregator would drop an event a worker reports twice in one step)."""

    def __init__(self, events: list[KVCacheEvent] | None = None) -> None:
        self._batches: list[list[KVCacheEvent]] = [list(events or [])]

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._batches.append(list(events))

    def increment_workers(self, count: int = 1) -> None:
        return None  # every add_events is one worker's batch

    def aggregate(self) -> XConnectorKVEvents:
        self._batches = [self.common_events()]
        return self

    def get_all_events(self) -> list[KVCacheEvent]:
        return [e for batch in self._batches for e in batch]

    def get_number_of_workers(self) -> int:
        return len(self._batches)

    def clear_events(self) -> None:
        self._batches = [[]]

    def common_events(self) -> list[KVCacheEvent]:
        """The first worker's events that every other worker reported too."""
        first, *others = self._batches
        if not others:
            return list(first)
        remaining = [_multiset(b) for b in others]
        kept = []
        for event in first:
            key = _key(event)
            if all(r.get(key, 0) > 0 for r in remaining):
                for r in remaining:
                    r[key] -= 1
                kept.append(event)
        return kept


def _key(event: KVCacheEvent) -> bytes:
    return bytes(msgspec.msgpack.encode(event))  # tagged: equal bytes, equal events


def _multiset(events: Iterable[KVCacheEvent]) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for e in events:
        out[_key(e)] = out.get(_key(e), 0) + 1
    return out
