"""The native pieces the SDK glues together, from Python: `SdkStats` (counts, first-occurrence
totals, hit rate, its Prometheus families), `PeerOverlap` (own announcements ignored, ranking in
tokens) and the router's call rules (`candidates`, `settle`, `add_adapter`)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xconnector._native import PeerOverlap, Router, SdkStats
from xconnector.exceptions import CacheError, ConfigError


def test_sdk_stats_counts_and_exposes_families() -> None:
    s = SdkStats()
    assert s.hit_rate() == 0.0
    assert [s.fallback("cache_backoff"), s.fallback("cache_backoff")] == [1, 2]
    assert s.count("prompt_tokens", 64) == 64 and s.count("hit_tokens", 16) == 16
    assert s.counters() == {"prompt_tokens": 64, "hit_tokens": 16}
    assert s.fallbacks() == {"cache_backoff": 2} and s.hit_rate() == 0.25
    families = {f.name: f for f in text_string_to_metric_families(s.prometheus())}
    assert set(families) == {
        "xconnector_fallbacks",
        "xconnector_receives",
        "xconnector_prompt_tokens",
        "xconnector_served_tokens",
        "xconnector_step_wait_seconds",
    }
    (sample,) = families["xconnector_fallbacks"].samples
    assert (sample.labels, sample.value) == ({"reason": "cache_backoff"}, 2)
    assert families["xconnector_served_tokens"].samples[0].value == 16
    # How long steps waited inside XConnector, by op: a histogram per op, read back as exported.
    s.step_wait("save", 0.004)
    s.step_wait("save", 0.002)
    assert s.step_waits() == {"load": (0, 0.0), "save": (2, pytest.approx(0.006))}
    waits = next(
        f
        for f in text_string_to_metric_families(s.prometheus())
        if f.name.endswith("step_wait_seconds")
    )
    counts = {x.labels["op"]: x.value for x in waits.samples if x.name.endswith("_count")}
    assert counts == {"load": 0, "save": 2}


def test_peer_overlap_ranks_in_tokens_and_ignores_itself() -> None:
    p = PeerOverlap("me")
    assert p.me == "me" and p.stored("me", [1, 2]) is False
    assert p.stored("a", [1, 2]) and p.stored("b", [1])
    assert p.score([1, 2, 3], 16, local_tokens=32) == [("a", 32), ("me", 32), ("b", 16)]
    assert p.best([1, 2, 3], 16, 32, candidates=["b"]) == "b"
    assert p.best([9], 16) is None
    p.forget("a")
    assert dict(p.peers()) == {"a": 0, "b": 1}


def test_router_call_rules() -> None:
    r = Router(manual_clock=True, base_backoff=1.0)
    r.add_adapter("lmcache", "cache")
    r.add_adapter("vllm", "inference")
    assert r.write_plan() == [("lmcache", "write_through")]
    with pytest.raises(ConfigError, match="unknown adapter type"):
        r.add_adapter("x", "storage")
    assert r.candidates("cache") == ["lmcache"] and r.candidates("vllm") == ["vllm"]
    assert r.settle("lmcache", "invalid_input") is False  # the caller's input: no backoff
    assert r.candidates("cache") == ["lmcache"]
    assert r.settle("lmcache", "cache_error") is True
    with pytest.raises(CacheError, match="backing off"):
        r.candidates("cache")
    r.advance(1.0)
    assert r.settle("lmcache") is False and r.candidates("lmcache") == ["lmcache"]
    with pytest.raises(ConfigError, match='nothing is registered as "storage"'):
        r.candidates("storage")
