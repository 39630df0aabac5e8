"""Counters the SDK keeps about its own work (receives, hits, stores, fallbacks by reason) and a
snapshot that adds the engines' native statistics and the router's view of each target. The
counting, the hit rate and the SDK's metric families are native (`SdkStats`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xconnector._native import SdkStats


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
        out: dict[str, Any] = {
            "counters": self.counters(),
            "fallbacks": self.fallbacks(),
            "hit_rate": self.hit_rate(),
        }
        if self._sources is not None:
            out.update(self._sources())
        return out

    def collector(self) -> Any:
        """A `prometheus_client` collector of every XConnector metric, for the worker's own
        registry (`REGISTRY.register(...)`), so they appear on its existing `/metrics`."""
        return _Collector(self)

    def prometheus_text(self) -> str:
        """Every metric in Prometheus' text format."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=True)
        registry.register(self.collector())
        return generate_latest(registry).decode()


class _Collector:
    """The SDK's families and each engine's native exposition, merged family by family."""

    def __init__(self, monitoring: MonitoringHandler) -> None:
        self._m = monitoring

    def collect(self) -> Any:
        from prometheus_client.parser import text_string_to_metric_families

        engines = self._m._engines() if self._m._engines is not None else []
        merged: dict[str, Any] = {}
        for text in [self._m._stats.prometheus(), *(engine.prometheus() for engine in engines)]:
            for family in text_string_to_metric_families(text):
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()

    def describe(self) -> Any:
        # Names known up front, so registering twice is refused as a duplicate.
        return list(self.collect())
