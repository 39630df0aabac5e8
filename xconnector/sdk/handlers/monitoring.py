"""Counters the SDK keeps about its own work (receives, hits, stores, fallbacks by reason) and a
snapshot that adds the engines' native statistics and the router's view of each target. The
counting, the hit rate, the SDK's metric families and their merge with the engines' are native
(`SdkStats`, `merge_expositions`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xconnector._native import SdkStats, merge_expositions


class MonitoringHandler:
    def __init__(
        self,
        sources: Callable[[], dict[str, Any]] | None = None,
        engines: Callable[[], list[Any]] | None = None,
    ) -> None:
        self._stats = SdkStats()
        self._sources = sources
        self._engines = engines

    def count(self, name: str, n: int = 1) -> None:
        self._stats.count(name, n)

    def fallback(self, reason: str) -> int:
        """A call fell back to the worker's own behaviour, for `reason`; how many times so far
        (1: the first, which a caller logs)."""
        return self._stats.fallback(reason)

    def counters(self) -> dict[str, int]:
        return self._stats.counters()

    def fallbacks(self) -> dict[str, int]:
        return self._stats.fallbacks()

    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens served from the cache."""
        return self._stats.hit_rate()

    def snapshot(self) -> dict[str, Any]:
        sources = self._sources() if self._sources is not None else {}
        return {
            "counters": self.counters(),
            "fallbacks": self.fallbacks(),
            "hit_rate": self.hit_rate(),
            **sources,
        }

    def prometheus_text(self) -> str:
        """Every metric in Prometheus' text format: the SDK's families and each engine's, each
        family once."""
        engines = self._engines() if self._engines is not None else []
        return merge_expositions([self._stats.prometheus(), *(e.prometheus() for e in engines)])

    def collector(self) -> MonitoringHandler:
        """A `prometheus_client` collector of every XConnector metric (this handler), for the
        worker's own registry (`REGISTRY.register(...)`), so they appear on its `/metrics`."""
        return self

    def collect(self) -> Any:
        from prometheus_client.parser import text_string_to_metric_families

        yield from text_string_to_metric_families(self.prometheus_text())

    def describe(self) -> Any:
        # Names known up front, so registering twice is refused as a duplicate.
        return list(self.collect())
