"""Counters the SDK keeps about its own work (receives, hits, stores, fallbacks by reason) and a
snapshot that adds the engines' native statistics and the router's view of each target."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any


class MonitoringHandler:
    def __init__(
        self,
        sources: Callable[[], dict[str, Any]] | None = None,
        engines: Callable[[], list[Any]] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._fallbacks: Counter[str] = Counter()
        self._sources = sources
        self._engines = engines

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

    def _sdk_families(self) -> list[Any]:
        """The SDK's own counters as metric families (built directly, never parsed back)."""
        from prometheus_client.core import CounterMetricFamily

        c, f = self.counters(), self.fallbacks()
        fallbacks = CounterMetricFamily(
            "xconnector_fallbacks",
            "Calls that fell back to the worker's own path.",
            labels=["reason"],
        )
        for reason, n in sorted(f.items()):
            fallbacks.add_metric([reason], n)
        plain = [
            ("receives", "KV receive calls (vLLM v0 shaped).", "receives"),
            ("prompt_tokens", "Prompt tokens of fresh prefills on receive.", "prompt_tokens"),
            ("served_tokens", "Prompt tokens served from the cache on receive.", "hit_tokens"),
        ]
        return [fallbacks] + [
            CounterMetricFamily(f"xconnector_{name}", doc, value=c.get(key, 0))
            for name, doc, key in plain
        ]

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
    """The SDK's counters, and each engine's native exposition merged into the same families."""

    def __init__(self, monitoring: MonitoringHandler) -> None:
        self._m = monitoring

    def collect(self) -> Any:
        from prometheus_client.parser import text_string_to_metric_families

        merged: dict[str, Any] = {f.name: f for f in self._m._sdk_families()}
        engines = self._m._engines() if self._m._engines is not None else []
        for text in (engine.prometheus() for engine in engines):
            for family in text_string_to_metric_families(text):
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()

    def describe(self) -> Any:
        # Names known up front, so registering twice is refused as a duplicate.
        return list(self.collect())
