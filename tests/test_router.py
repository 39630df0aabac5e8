"""The native router from Python: priority order, routing by name or kind, write plans, a
failing target skipped for a doubling backoff and then retried, recovery on success; and the
overlap index. A manual clock replaces sleeping."""

from __future__ import annotations

import pytest

from xconnector._native import OverlapIndex, Router
from xconnector.exceptions import CacheError, ConfigError, InvalidInputError


def test_priority_fallback_backoff_and_recovery() -> None:
    r = Router(manual_clock=True, base_backoff=0.5, max_backoff=4.0)
    r.add("disk", "tier", priority=1, policy="write_behind")
    r.add("memory", "tier", priority=0)
    r.add("peer", "tier", priority=5, policy="read_only")
    assert r.order("tier") == ["memory", "disk", "peer"]
    assert r.write_plan("tier") == [("memory", "write_through"), ("disk", "write_behind")]
    r.report_failure("memory")
    assert r.route("tier") == "disk"
    with pytest.raises(CacheError, match=r"retried in 0\.5 s"):
        r.route("memory")
    r.advance(0.5)
    assert r.route("tier") == "memory"  # retried after the backoff
    r.report_failure("memory")  # fails again: twice as long
    r.advance(0.5)
    assert r.order("tier")[0] == "disk"
    r.advance(0.5)
    assert r.order("tier")[0] == "memory"
    r.report_success("memory")
    status = {t["name"]: t for t in r.status()}
    assert status["memory"]["consecutive_failures"] == 0 and status["memory"]["total_failures"] == 2
    for name in ("memory", "disk", "peer"):
        r.report_failure(name)
    with pytest.raises(CacheError, match='every "tier" target is backing off'):
        r.route("tier")
    with pytest.raises(ConfigError, match="already registered"):
        r.add("disk", "tier")
    with pytest.raises(InvalidInputError, match="unknown write policy"):
        r.add("x", "tier", policy="sometimes")
    with pytest.raises(InvalidInputError, match="only a manual clock"):
        Router().advance(1.0)
    with pytest.raises(InvalidInputError, match="base_backoff must be a number of seconds"):
        Router(base_backoff=-1.0)


def test_overlap_index() -> None:
    idx = OverlapIndex()
    idx.stored("a", [1, 2, 3])
    idx.stored("b", [1, 2, 3, 4])
    assert idx.score([1, 2, 3, 4, 5]) == [("b", 4), ("a", 3)]
    idx.removed("b", [2])
    assert idx.score([1, 2, 3]) == [("a", 3), ("b", 1)]
