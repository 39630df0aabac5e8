"""Where KV lives among workers: prefix-overlap scoring, the quantity Dynamo's KV router routes
by. This worker's own overlap is exact (a lookup in its engine); other workers' comes from the
blocks they announced (`record_stored`/`record_removed`, or their peer events once
`follow_events` connects). The ranking (own announcements ignored, in tokens, ties by name) is
native: `PeerOverlap`."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from xconnector._loader import load_native
from xconnector._native import PeerOverlap
from xconnector.sdk.handlers.kv_cache import KVCacheHandler

log = logging.getLogger("xconnector.distributed")


class DistributedHandler:
    def __init__(self, worker_id: str, kv: KVCacheHandler | None, block_size: int) -> None:
        self.worker_id = worker_id
        self._kv = kv
        self._block_size = block_size
        self._index = index = PeerOverlap(worker_id)
        #: `peers()`: other workers seen, with the number of blocks each announced.
        self.peers, self.forget_worker = index.peers, index.forget
        self.stop_following = index.stop_following

    @property
    def events_applied(self) -> int:
        """Other workers' peer events applied so far."""
        return self._index.events_applied

    def follow_events(self, url: str, subject: str) -> bool:
        """Feeds the overlap index from other workers' peer events on NATS (XConnector's own
        channel), in a native thread. False (logged) when NATS cannot be reached now."""
        try:
            self._index.follow(url, subject)
        except Exception as e:
            redact = load_native().config_redact
            log.warning("not following peer events at %s: %s", redact(url), redact(str(e)))
            return False
        return True

    def _request(self, tokens: Any, local: bool = True) -> tuple[list[int], int, int]:
        """(block hashes, block size, tokens this worker's engine holds) for `tokens`; the block
        size is the engine's once it exists, else the config's."""
        engine = None if self._kv is None else self._kv.engine
        bs = engine.block_size if engine is not None else self._block_size
        held = engine.lookup(tokens) if local and engine is not None else 0
        return load_native().sequence_hashes(tokens, bs), bs, held

    def record_stored(self, worker: str, tokens: Any) -> None:
        """`worker` announced it holds the full blocks of `tokens`."""
        self._index.stored(worker, self._request(tokens, local=False)[0])

    def record_removed(self, worker: str, tokens: Any) -> None:
        self._index.removed(worker, self._request(tokens, local=False)[0])

    def score(self, tokens: Any) -> list[tuple[str, int]]:
        """`[(worker, leading tokens it holds)]`, best first; this worker included when it holds
        any."""
        return self._index.score(*self._request(tokens))

    def best_worker(self, tokens: Any, candidates: Iterable[str] | None = None) -> str | None:
        """The candidate holding the longest prefix of `tokens` (None when none holds any)."""
        allowed = None if candidates is None else list(candidates)
        return self._index.best(*self._request(tokens), allowed)
