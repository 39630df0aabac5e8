"""`xconnector.sdk.config`: the dataclasses mirror the native schema, validate on every way in,
round-trip through `to_dict`, and report every problem with its source and key path."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xconnector.config.schema import AdapterConfig, IntegrationConfig, PerformanceConfig, SDKConfig
from xconnector.exceptions import ConfigError

DESIGN_SECTION: dict[str, Any] = {
    "enabled": True,
    "mode": "embedded",
    "adapters": [
        {
            "name": "lmcache",
            "type": "cache",
            "config": {"storage_backend": "memory", "max_cache_size": 2048},
        },
        {"name": "vllm", "type": "inference", "config": {"enable_prefix_caching": True}},
    ],
}


def test_the_design_section_loads_with_defaults_filled_in() -> None:
    cfg = SDKConfig.from_dict(DESIGN_SECTION)
    assert cfg.enabled and cfg.mode == "embedded"
    assert [(a.name, a.type) for a in cfg.adapters] == [("lmcache", "cache"), ("vllm", "inference")]
    assert cfg.adapter("lmcache") == AdapterConfig(
        name="lmcache", config={"storage_backend": "memory", "max_cache_size": 2048}
    )
    assert cfg.adapter("dynamo") is None
    assert cfg.performance == PerformanceConfig(block_size=16, batch_size=64)
    assert cfg.integration.targets == [
        "components.worker:VllmWorker",
        "components.prefill_worker:PrefillWorker",
    ]
    assert SDKConfig.from_dict(cfg.to_dict()) == cfg


def test_adapters_as_a_mapping_keyed_by_name_keep_the_order_written() -> None:
    cfg = SDKConfig.from_dict(
        {
            "enabled": True,
            "adapters": {
                "vllm": None,
                "lmcache": {"config": {"max_cache_size": "2GiB"}},
                "dynamo": {"priority": -1},
            },
        }
    )
    # Sorted by priority; equal priorities keep the order they were written in.
    assert [a.name for a in cfg.adapters] == ["dynamo", "vllm", "lmcache"]
    assert cfg.adapters[0].type == "distributed"
    assert cfg.to_dict()["adapters"][2] == {
        "name": "lmcache",
        "type": "cache",
        "config": {"max_cache_size": "2GiB"},
        "enabled": True,
        "priority": 0,
    }


def test_constructing_dataclasses_validates_and_normalizes() -> None:
    cfg = SDKConfig(
        enabled=True,
        adapters=[AdapterConfig(name="lmcache"), {"name": "vllm"}],  # type: ignore[list-item]
        performance={"block_size": 32},  # type: ignore[arg-type]
    )
    assert [a.type for a in cfg.adapters] == ["cache", "inference"]
    assert isinstance(cfg.adapters[1], AdapterConfig)
    assert cfg.performance == PerformanceConfig(block_size=32)
    assert AdapterConfig(name="vllm").type == "inference"
    assert IntegrationConfig(strict=True).services == ["VllmWorker", "PrefillWorker"]
    with pytest.raises(ConfigError, match=r"(?s)AdapterConfig\(name='redis'\).*unknown adapter"):
        AdapterConfig(name="redis")
    with pytest.raises(
        ConfigError, match=r"adapter \"vllm\" is of type \"inference\", not \"cache\""
    ):
        AdapterConfig(name="vllm", type="cache")
    with pytest.raises(ConfigError, match=r"performance\.block_size: expected an integer in 1\.\."):
        PerformanceConfig(block_size=0)
    with pytest.raises(ConfigError, match=r"mode: expected \"embedded\" or \"hybrid\""):
        SDKConfig(enabled=True, mode="distributed")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"integration\.targets\[0\]: \"nocolon\" is not"):
        IntegrationConfig(targets=["nocolon"])


def test_one_report_lists_every_problem_with_source_and_path() -> None:
    with pytest.raises(ConfigError) as info:
        SDKConfig.from_dict(
            {
                "enabeld": True,
                "mode": "fast",
                "adapters": [
                    {"name": "lmcache", "config": {"max_cache_size": -1}},
                    {"name": "nixl", "type": "transfer"},
                ],
                "performance": {"pin_memory": "yes"},
            },
            source="configs/agg.yaml",
            path="Common.xconnector",
        )
    text = str(info.value)
    assert text.startswith("configs/agg.yaml: invalid XConnector configuration (6 problem(s)):")
    for line in [
        'Common.xconnector.enabeld: unknown key; did you mean "enabled"?',
        "Common.xconnector.enabled: missing; set `enabled: true`",
        'Common.xconnector.mode: expected "embedded" or "hybrid", got "fast"',
        "Common.xconnector.adapters[0].config.max_cache_size: -1 is negative",
        'Common.xconnector.adapters[1].name: unknown adapter "nixl"; known adapters: lmcache, vllm',
        'Common.xconnector.performance.pin_memory: expected true or false, got the string "yes"',
    ]:
        assert f"  - {line}" in text, (line, text)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({1: True}, "key 1 is not a string"),
        ({"enabled": {1, 2}}, 'enabled: a value of type "set" cannot be part of a config'),
        ({"enabled": True, "performance": {"block_size": math.nan}}, "NaN is not a finite number"),
        ({"enabled": True, "performance": {"block_size": 2**70}}, "out of the 64-bit range"),
        ({"enabled": True, "performance": {"block_size": 16.0}}, "expected an integer"),
        ([1, 2], "expected a mapping of keys, got a list"),
        ("enabled: true", "expected a mapping of keys, got a string"),
    ],
)
def test_values_no_document_can_hold_are_config_errors(value: Any, problem: str) -> None:
    with pytest.raises(ConfigError, match="<dict>: invalid XConnector configuration") as info:
        SDKConfig.from_dict(value)
    assert problem in str(info.value)


def test_a_container_inside_itself_is_an_error_not_a_crash() -> None:
    loop: dict[str, Any] = {"enabled": True}
    loop["performance"] = loop
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        SDKConfig.from_dict(loop)


def test_from_yaml_reads_dynamo_files_sections_and_bare_sections(tmp_path: Path) -> None:
    dynamo = tmp_path / "agg.yaml"
    dynamo.write_text(
        "Common:\n  model: m\n  xconnector:\n    enabled: true\n"
        "VllmWorker:\n  common-configs: [model]\n  xconnector: {mode: hybrid, adapters: "
        "{lmcache: {config: {remote_url: 'redis://127.0.0.1:6379'}}}}\n"
    )
    assert SDKConfig.from_yaml(dynamo).mode == "embedded"
    assert SDKConfig.from_yaml(dynamo, service="VllmWorker").mode == "hybrid"
    keyed = tmp_path / "xc.yaml"
    keyed.write_text("xconnector:\n  enabled: true\n  adapters: {lmcache: }\n")
    assert [a.name for a in SDKConfig.from_yaml(str(keyed)).adapters] == ["lmcache"]
    bare = tmp_path / "bare.json"
    bare.write_text(
        '{"enabled": true, "mode": "hybrid", "adapters": '
        '[{"name": "lmcache", "config": {"remote_url": "redis://127.0.0.1:6379"}}]}'
    )
    assert SDKConfig.from_yaml(bare).mode == "hybrid"
    without = tmp_path / "plain.yaml"
    without.write_text("Common:\n  model: m\nVllmWorker:\n  common-configs: [model]\n")
    assert SDKConfig.from_yaml(without) == SDKConfig()


# Hypothesis: arbitrary documents built from the schema's own keys and nearby junk.
_keys = st.sampled_from(
    [
        "enabled",
        "mode",
        "adapters",
        "name",
        "type",
        "config",
        "performance",
        "integration",
        "block_size",
        "max_cache_size",
        "lmcache",
        "vllm",
        "priority",
        "targets",
    ]
) | st.text(max_size=8)
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.sampled_from(["embedded", "hybrid", "cache", "inference", "lmcache", "2GiB", "x:Y"])
    | st.text(max_size=10)
)
_documents = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=30,
)

_TOP_KEYS = {
    "enabled",
    "mode",
    "enable_distributed",
    "enable_caching",
    "adapters",
    "integration",
    "performance",
}


def _mostly(valid: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` four times in five, so that accepted documents are common too."""
    return st.sampled_from((valid, valid, valid, valid, junk)).flatmap(lambda s: s)


_names = _mostly(st.sampled_from(["lmcache", "vllm", "dynamo"]), st.just("redis"))
_sizes = st.integers(-2, 10**6) | st.sampled_from(["2GiB", "512MB", "1.5 GiB", "lots", "-1GB"])
_adapter_body = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["cache", "inference", "distributed", "storage"]),
        "config": st.dictionaries(st.sampled_from(["max_cache_size", "chunk_size"]), _sizes),
        "enabled": _mostly(st.booleans(), _leaves),
        "priority": _mostly(st.integers(-3, 3), _leaves),
    },
)
_adapters = st.lists(
    st.builds(lambda name, body: {"name": name, **body}, _names, _adapter_body), max_size=3
) | st.dictionaries(_names, st.none() | _adapter_body, max_size=3)
# Near-valid sections: the schema's shape, with wrong values and unknown keys mixed in.
_sections = st.fixed_dictionaries(
    {"enabled": _mostly(st.booleans(), _leaves)},
    optional={
        "mode": _mostly(st.sampled_from(["embedded", "hybrid"]), _leaves),
        "adapters": _mostly(_adapters, _leaves),
        "performance": st.fixed_dictionaries(
            {},
            optional={
                "block_size": _mostly(st.integers(1, 64), st.integers(-1, 0) | _leaves),
                "metrics_port": st.none() | st.integers(0, 70000),
                "pin_memory": _mostly(st.booleans(), _leaves),
            },
        ),
        "integration": st.fixed_dictionaries(
            {},
            optional={"targets": st.lists(_mostly(st.just("a:B"), st.sampled_from(["x", ":X"])))},
        ),
        "enable_caching": st.booleans(),
    },
)


# The properties below hold vacuously if every input is rejected, so each counts its outcomes and
# requires both to be common: about 30% of documents and 18% of adapter entries are accepted
# (140-160 of 500, 29-48 of 200 in trial runs); the bounds, 50 and 10, are far below that.


def test_arbitrary_documents_are_accepted_only_within_the_schema() -> None:
    seen = Counter[str]()

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_sections | _documents)
    def check(doc: Any) -> None:
        try:
            cfg = SDKConfig.from_dict(doc)
        except ConfigError as e:
            assert str(e).startswith("<dict>: invalid XConnector configuration")
            seen["rejected"] += 1
            return
        assert isinstance(doc, dict) and set(doc) <= _TOP_KEYS
        assert doc["enabled"] is cfg.enabled
        assert cfg.mode in ("embedded", "hybrid")
        assert all(a.name in ("lmcache", "vllm", "dynamo") for a in cfg.adapters)
        assert all(isinstance(a, AdapterConfig) for a in cfg.adapters)
        assert cfg.performance.block_size >= 1
        assert SDKConfig.from_dict(cfg.to_dict()) == cfg
        seen["accepted"] += 1

    check()
    assert seen["accepted"] >= 50 and seen["rejected"] >= 50, seen


def test_arbitrary_adapter_entries_are_accepted_only_when_valid() -> None:
    seen = Counter[str]()

    @settings(max_examples=200, deadline=None)
    @given(
        st.builds(lambda name, body: {"name": name, **body}, _names, _adapter_body)
        | st.dictionaries(_keys, _documents, max_size=4)
    )
    def check(entry: dict[str, Any]) -> None:
        try:
            a = AdapterConfig.from_dict(entry)
        except ConfigError:
            seen["rejected"] += 1
            return
        assert a.name in ("lmcache", "vllm", "dynamo") and entry["name"] == a.name
        assert set(entry) <= {"name", "type", "config", "enabled", "priority"}
        assert AdapterConfig.from_dict(a.to_dict()) == a
        seen["accepted"] += 1

    check()
    assert seen["accepted"] >= 10 and seen["rejected"] >= 20, seen
