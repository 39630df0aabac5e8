"""Where KV lives among workers: prefix-overlap scoring, the quantity Dynamo's KV router routes
by. This worker's own overlap is exact (a lookup in its engine); other workers' comes from the
blocks they announced (`record_stored`/`record_removed`, fed by peer events once the event plane is
connected)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from xconnector._loader import load_native
from xconnector._native import Engine, OverlapIndex
from xconnector.sdk.handlers.kv_cache import KVCacheHandler

log = logging.getLogger("xconnector.distributed")


class DistributedHandler:
    def __init__(self, worker_id: str, kv: KVCacheHandler | None, block_size: int) -> None:
        self.worker_id = worker_id
        self._kv = kv
        self._block_size = block_size
        self._index = OverlapIndex()
        self._follow: threading.Event | None = None
        self.events_applied = 0

    def follow_events(self, url: str, subject: str) -> bool:
        """Feeds the overlap index from other workers' peer events on NATS (XConnector's own
        channel), in a daemon thread.
        False (logged) when NATS cannot be reached now."""
        if self._follow is not None:
            return True
        try:
            subscriber = load_native().EventSubscriber(url, subject)
        except Exception as e:
            native = load_native()
            log.warning(
                "not following peer events at %s: %s",
                native.config_redact(url),
                native.config_redact(str(e)),
            )
            return False
        stop = threading.Event()
        self._follow = stop

        def run() -> None:
            while not stop.is_set():
                batch = subscriber.next(0.2)
                if batch is not None:
                    self.apply_events(batch)

        threading.Thread(target=run, name="xconnector-kv-events", daemon=True).start()
        return True

    def stop_following(self) -> None:
        if self._follow is not None:
            self._follow.set()
            self._follow = None

    def apply_events(self, batch: dict[str, Any]) -> None:
        """One batch as published by an engine: stored/removed blocks of its worker."""
        worker = batch["worker_id"]
        if worker == self.worker_id:
            return  # this worker's own overlap comes from its engine
        for event in batch["events"]:
            if event["kind"] == "stored":
                self._index.stored(worker, event["block_hashes"])
            else:
                self._index.removed(worker, event["block_hashes"])
            self.events_applied += 1

    def _engine(self) -> Engine | None:
        return None if self._kv is None else self._kv.engine

    def _hashes(self, tokens: Any) -> list[int]:
        engine = self._engine()
        bs = engine.block_size if engine is not None else self._block_size
        hashes: list[int] = load_native().sequence_hashes(tokens, bs)
        return hashes

    def record_stored(self, worker: str, tokens: Any) -> None:
        """`worker` announced it holds the full blocks of `tokens`."""
        self._index.stored(worker, self._hashes(tokens))

    def record_removed(self, worker: str, tokens: Any) -> None:
        self._index.removed(worker, self._hashes(tokens))

    def record_stored_hashes(self, worker: str, hashes: Iterable[int]) -> None:
        self._index.stored(worker, list(hashes))

    def record_removed_hashes(self, worker: str, hashes: Iterable[int]) -> None:
        self._index.removed(worker, list(hashes))

    def forget_worker(self, worker: str) -> None:
        self._index.clear_worker(worker)

    def peers(self) -> list[tuple[str, int]]:
        """Other workers seen, with the number of blocks each announced."""
        return [(w, n) for w, n in self._index.workers() if w != self.worker_id]

    def score(self, tokens: Any) -> list[tuple[str, int]]:
        """`[(worker, leading tokens it holds)]`, best first; this worker included when it holds
        any."""
        hashes = self._hashes(tokens)
        engine = self._engine()
        bs = engine.block_size if engine is not None else self._block_size
        scores = {w: n * bs for w, n in self._index.score(hashes) if w != self.worker_id}
        local = 0 if engine is None else engine.lookup(tokens)
        if local:
            scores[self.worker_id] = local
        return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))

    def best_worker(self, tokens: Any, candidates: Iterable[str] | None = None) -> str | None:
        """The candidate holding the longest prefix of `tokens` (None when none holds any)."""
        allowed = None if candidates is None else set(candidates)
        for worker, _ in self.score(tokens):
            if allowed is None or worker in allowed:
                return worker
        return None
