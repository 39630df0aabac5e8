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
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

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
#: vLLM names learnt and remembered at most (least recently used forgotten first).
_MAX_NAMES = 1 << 17

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
    """vLLM's names for XConnector's blocks. Learnt from the transfers that store or load them
    (least recently used forgotten past a bound); a block reported stored keeps the names it
    was reported under until it is reported removed from that medium, so a removal always names
    exactly what the router was told."""

    def __init__(self, capacity: int = _MAX_NAMES) -> None:
        self._capacity = capacity
        self._learnt: OrderedDict[int, list[Any]] = OrderedDict()
        self._reported: dict[tuple[str, int], list[Any]] = {}

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
            self._learnt[h] = names[i * k : (i + 1) * k]
            self._learnt.move_to_end(h)
        while len(self._learnt) > self._capacity:
            self._learnt.popitem(last=False)

    def of(self, h: int, k: int, medium: str | None = None) -> list[Any]:
        """The names block `h` goes by (in `medium`, if it was reported stored there)."""
        if medium is not None and (medium, h) in self._reported:
            return self._reported[(medium, h)]
        learnt = self._learnt.get(h)
        return learnt if learnt is not None else [_sub_id(h, j, k) for j in range(k)]

    def stored(self, medium: str, h: int, k: int) -> list[Any]:
        names = self.of(h, k, medium)
        self._reported[(medium, h)] = names
        return names

    def removed(self, medium: str, h: int, k: int) -> list[Any]:
        return self._reported.pop((medium, h), None) or self.of(h, k)


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
        if kind == "removed":
            ids = [n for h in hashes for n in names.removed(medium, h, k)]
            out.append(BlockRemoved(block_hashes=ids, medium=MEDIUMS[medium]))
            continue
        ids = [n for h in hashes for n in names.stored(medium, h, k)]
        out.append(
            BlockStored(
                block_hashes=ids,
                parent_block_hash=None if parent is None else names.of(parent, k, medium)[-1],
                token_ids=list(tokens),
                block_size=block_size,
                lora_id=None,
                medium=MEDIUMS[medium],
                lora_name=lora_name,
                extra_keys=_extra_keys(len(ids), parent is None, lora_name, salt),
            )
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
    """What the router should be told, given what each rank says: each tensor/pipeline rank
    holds its own part of every block, so a block is a hit only while every rank holds it. A
    block is announced stored when the last rank reports it (whatever step each rank's copy
    landed in: disk writes finish on their own threads), and removed as soon as the first rank
    drops it. A rank reporting a block twice counts once, so the router (which counts stores)
    never needs two removals. Remembers the blocks some rank holds: bounded by the tiers."""

    def __init__(self, world: int) -> None:
        self.world = world
        self._holders: dict[tuple[Any, Any], set[int]] = {}
        self._announced: set[tuple[Any, Any]] = set()

    def merge(self, batches: list[list[KVCacheEvent]]) -> list[KVCacheEvent]:
        out: list[KVCacheEvent] = []
        for rank, batch in enumerate(batches):
            for event in batch:
                if isinstance(event, BlockStored):
                    self._stored(rank, event, out)
                elif isinstance(event, BlockRemoved):
                    gone = []
                    for name in event.block_hashes:
                        key = (event.medium, name)
                        holders = self._holders.get(key)
                        if holders is None:
                            continue
                        holders.discard(rank)
                        if key in self._announced:
                            self._announced.discard(key)
                            gone.append(name)
                        if not holders:
                            del self._holders[key]
                    if gone:
                        out.append(BlockRemoved(block_hashes=gone, medium=event.medium))
        return out

    def _stored(self, rank: int, event: BlockStored, out: list[KVCacheEvent]) -> None:
        """Announces the blocks of `event` all ranks now hold, one event per consecutive run."""
        bs = event.block_size
        run: list[int] = []

        def flush() -> None:
            if not run:
                return
            a, b = run[0], run[-1] + 1
            names = event.block_hashes
            keys = event.extra_keys
            out.append(
                BlockStored(
                    block_hashes=names[a:b],
                    parent_block_hash=event.parent_block_hash if a == 0 else names[a - 1],
                    token_ids=event.token_ids[a * bs : b * bs],
                    block_size=bs,
                    lora_id=event.lora_id,
                    medium=event.medium,
                    lora_name=event.lora_name,
                    extra_keys=keys[a:b] if keys is not None else None,
                )
            )
            run.clear()

        for i, name in enumerate(event.block_hashes):
            key = (event.medium, name)
            holders = self._holders.setdefault(key, set())
            holders.add(rank)
            if len(holders) >= self.world and key not in self._announced:
                self._announced.add(key)
                if run and run[-1] != i - 1:
                    flush()
                run.append(i)
        flush()
