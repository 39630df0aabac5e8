"""Counters the SDK keeps about its own work (receives, hits, stores, fallbacks by reason) and a
snapshot that adds the engines' native statistics and the router's view of each target. The
counting, the hit rate, the SDK's metric families and their merge with the engines' are native
(`SdkStats`, `merge_expositions`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xconnector._native import SdkStats, merge_expositions


class MonitoringHandler:
    """The native `SdkStats`' own methods: `count`, `fallback` (a call fell back to the worker's
    own behaviour; returns how many times so far for that reason, 1 the first, which a caller
    logs), `counters`, `fallbacks`, `hit_rate` (share of looked-up prompt tokens served from the
    cache), `step_wait(s)`; plus the snapshot and the Prometheus collector over them."""

    def __init__(
        self,
        sources: Callable[[], dict[str, Any]] | None = None,
        engines: Callable[[], list[Any]] | None = None,
    ) -> None:
        #: The native counters themselves (what native callers such as `V1Worker` count into).
        self.stats = stats = SdkStats()
        self.count, self.fallback, self.hit_rate = stats.count, stats.fallback, stats.hit_rate
        self.counters, self.fallbacks = stats.counters, stats.fallbacks
        self.step_wait, self.step_waits = stats.step_wait, stats.step_waits
        self._sources, self._engines = sources or dict, engines or list

    def snapshot(self) -> dict[str, Any]:
        stats = {"counters": self.counters(), "fallbacks": self.fallbacks()}
        return {**stats, "hit_rate": self.hit_rate(), **self._sources()}

    def prometheus_text(self) -> str:
        """Every metric in Prometheus' text format: the SDK's families and each engine's, each
        family once."""
        engines = self._engines()
        return merge_expositions([self.stats.prometheus(), *(e.prometheus() for e in engines)])

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
