"""Counters the SDK keeps about its own work (receives, hits, stores, fallbacks by reason) and a
snapshot that adds the engines' native statistics and the router's view of each target."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any


class MonitoringHandler:
    def __init__(self, sources: Callable[[], dict[str, Any]] | None = None) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._fallbacks: Counter[str] = Counter()
        self._sources = sources

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def fallback(self, reason: str) -> None:
        """A call fell back to the worker's own behaviour, for `reason`."""
        with self._lock:
            self._fallbacks[reason] += 1

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def fallbacks(self) -> dict[str, int]:
        with self._lock:
            return dict(self._fallbacks)

    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens served from the cache."""
        c = self.counters()
        total = c.get("prompt_tokens", 0)
        return c.get("hit_tokens", 0) / total if total else 0.0

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "counters": self.counters(),
            "fallbacks": self.fallbacks(),
            "hit_rate": self.hit_rate(),
        }
        if self._sources is not None:
            out.update(self._sources())
        return out
