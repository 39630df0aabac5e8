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

    def _sdk_text(self) -> str:
        c, f = self.counters(), self.fallbacks()
        lines = [
            "# HELP xconnector_fallbacks_total Calls that fell back to the worker's own path.",
            "# TYPE xconnector_fallbacks_total counter",
            *(f'xconnector_fallbacks_total{{reason="{r}"}} {n}' for r, n in sorted(f.items())),
            "# HELP xconnector_receives_total KV receive calls (vLLM v0 shaped).",
            "# TYPE xconnector_receives_total counter",
            f"xconnector_receives_total {c.get('receives', 0)}",
            "# HELP xconnector_prompt_tokens_total Prompt tokens of fresh prefills on receive.",
            "# TYPE xconnector_prompt_tokens_total counter",
            f"xconnector_prompt_tokens_total {c.get('prompt_tokens', 0)}",
            "# HELP xconnector_served_tokens_total Prompt tokens served from the cache on receive.",
            "# TYPE xconnector_served_tokens_total counter",
            f"xconnector_served_tokens_total {c.get('hit_tokens', 0)}",
        ]
        return "\n".join(lines) + "\n"

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
    """Merges the SDK's counters and each engine's exposition into one set of families."""

    def __init__(self, monitoring: MonitoringHandler) -> None:
        self._m = monitoring

    def collect(self) -> Any:
        from prometheus_client.parser import text_string_to_metric_families

        texts = [self._m._sdk_text()]
        if self._m._engines is not None:
            texts += [engine.prometheus() for engine in self._m._engines()]
        merged: dict[str, Any] = {}
        for text in texts:
            for family in text_string_to_metric_families(text):
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()

    def describe(self) -> Any:
        # Names known up front, so registering twice is refused as a duplicate.
        return list(self.collect())
