"""Metrics in Prometheus' format: the engine's exposition parses with prometheus_client's own
parser, counters move as expected after known operations, histograms count every call, and the
SDK's collector merges engines and its own counters, refusing to be registered twice."""

from __future__ import annotations

import pytest
from conftest import BLOCK, block_payload
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from xconnector import Engine
from xconnector.sdk import XConnectorSDK


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "namespace"))
            out[(s.name, labels)] = s.value
    return out


def test_engine_exposition_moves_with_known_operations() -> None:
    e = Engine(block_bytes=256, capacity_bytes=4 * 256, block_size=BLOCK, model="m")
    before = samples(e.prometheus())
    assert before[("xconnector_lookup_total", ())] == 0
    toks = list(range(3 * BLOCK))
    e.store(toks, block_payload(toks))
    e.lookup(toks)
    e.lookup(toks[:BLOCK] + [99] * BLOCK)
    out = bytearray(3 * 256)
    e.load(toks, out)
    other = list(range(5000, 5000 + 2 * BLOCK))
    e.store(other, block_payload(other))  # 4 slots: evicts one
    after = samples(e.prometheus({"worker": "w1"}))
    assert after[("xconnector_lookup_total", (("worker", "w1"),))] == 2
    assert after[("xconnector_hit_tokens_total", (("worker", "w1"),))] == 3 * BLOCK + BLOCK
    assert after[("xconnector_blocks_stored_total", (("worker", "w1"),))] == 5
    assert after[("xconnector_bytes_loaded_total", (("worker", "w1"),))] == 3 * 256
    assert after[("xconnector_evictions_total", (("tier", "memory"), ("worker", "w1")))] == 1
    assert after[("xconnector_tier_bytes", (("tier", "memory"), ("worker", "w1")))] == 4 * 256
    count = after[("xconnector_lookup_duration_seconds_count", (("worker", "w1"),))]
    inf = after[("xconnector_lookup_duration_seconds_bucket", (("le", "+Inf"), ("worker", "w1")))]
    assert count == inf == 2
    assert after[("xconnector_lookup_duration_seconds_sum", (("worker", "w1"),))] > 0


def test_the_sdk_collector_merges_engines_and_refuses_a_second_registration() -> None:
    with XConnectorSDK() as sdk:
        kv = sdk.get_kv_handler()
        from v0_worker import build_model_input, new_kv_caches

        caches = new_kv_caches(16)
        mi = build_model_input([list(range(1, 3 * BLOCK + 2))], [[1, 2, 3, 4]])
        sdk.handle_kv_receive_sync(None, mi, caches)
        sdk.handle_kv_send_sync(None, mi, caches, None)
        mi2 = build_model_input([list(range(1, 3 * BLOCK + 2))], [[5, 6, 7, 8]])
        assert sdk.handle_kv_receive_sync(None, mi2, caches).hit_tokens == 3 * BLOCK
        sdk.get_monitoring_handler().fallback("invalid_input")
        assert kv.engine is not None
        text = sdk.get_monitoring_handler().prometheus_text()
        got = samples(text)
        assert got[("xconnector_served_tokens_total", ())] == 3 * BLOCK
        assert got[("xconnector_fallbacks_total", (("reason", "invalid_input"),))] == 1
        assert got[("xconnector_blocks_stored_total", ())] == 3
        registry = CollectorRegistry()
        registry.register(sdk.get_monitoring_handler().collector())
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            registry.register(sdk.get_monitoring_handler().collector())
