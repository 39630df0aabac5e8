"""Config discovery over Dynamo's real config files and channels: the fixtures, the JSON
`dynamo serve` hands each process (checked in a real subprocess), the prototype's files, and
every way a config file can be unreadable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from xconnector.config.discovery import (
    detect_config,
    load_config_file,
    load_config_from_dynamo,
    resolve_dynamo_config,
)
from xconnector.config.schema import SDKConfig
from xconnector.exceptions import ConfigError

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
DYNAMO_CONFIGS = sorted((FIXTURES / "dynamo-configs").rglob("*.yaml"))
PRIOR_CONFIGS = sorted((FIXTURES / "prior-xconnector-configs").glob("*.yaml"))
DESIGN_SECTION: dict[str, Any] = yaml.safe_load(
    """
enabled: true
mode: embedded
adapters:
  - name: lmcache
    type: cache
    config: {storage_backend: memory, max_cache_size: 2048}
  - name: vllm
    type: inference
    config: {enable_prefix_caching: true}
"""
)
# A service overlay that turns on the shared tier (hybrid needs the Redis URL; nothing connects).
HYBRID: dict[str, Any] = {
    "mode": "hybrid",
    "adapters": [
        {"name": "lmcache", "type": "cache", "config": {"remote_url": "redis://127.0.0.1:6379"}},
        {"name": "vllm", "type": "inference"},
    ],
}
CONFIG_VARS = ("XCONNECTOR_CONFIG", "DYNAMO_SERVICE_CONFIG", "DYN_DEPLOYMENT_CONFIG")

# What a worker process started by `dynamo serve` reports about its config.
PROBE = """
import json, sys
from xconnector.config.discovery import detect_config
found = detect_config()
print(json.dumps({"describe": found.describe(), "enabled": found.enabled, "source": found.source,
                  "section": found.section, "mode": found.config.mode,
                  "adapters": [[a.name, a.type] for a in found.config.adapters]}))
"""


def test_the_fixtures_are_there() -> None:
    assert len(DYNAMO_CONFIGS) >= 20 and len(PRIOR_CONFIGS) >= 7


def with_design_section(doc: dict[str, Any]) -> dict[str, Any]:
    doc = dict(doc)
    doc["Common"] = {**(doc.get("Common") or {}), "xconnector": DESIGN_SECTION}
    return doc


@pytest.mark.parametrize("path", DYNAMO_CONFIGS, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_dynamo_configs_without_a_section_leave_xconnector_off(path: Path) -> None:
    found = load_config_file(path, service="VllmWorker")
    assert (found.enabled, found.section, found.source) == (False, None, str(path))
    assert found.describe() == f"not enabled, source: {path} (no xconnector section)"
    assert found.config == SDKConfig() and found.warnings == []
    doc = yaml.safe_load(path.read_text())
    assert load_config_from_dynamo(doc, service="VllmWorker") == SDKConfig()


@pytest.mark.parametrize("path", DYNAMO_CONFIGS, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_dynamo_configs_with_the_design_section_under_common_are_enabled(path: Path) -> None:
    doc = with_design_section(yaml.safe_load(path.read_text()))
    for service in (None, "VllmWorker", "PrefillWorker", "Frontend"):
        cfg = load_config_from_dynamo(doc, service=service)
        assert cfg.enabled
        assert [(a.name, a.type) for a in cfg.adapters] == [
            ("lmcache", "cache"),
            ("vllm", "inference"),
        ]
        assert cfg.adapter("lmcache").config["max_cache_size"] == 2048  # type: ignore[union-attr]
    found = resolve_dynamo_config(doc, service="VllmWorker", source=path.name)
    assert found.describe() == f"enabled, source: {path.name} (Common.xconnector)"
    assert found.origins["mode"] == f"{path.name}: Common.xconnector.mode"
    # Unwritten, performance.block_size is the worker's where the file says it.
    worker = doc.get("VllmWorker") or {}
    listed = "block-size" in worker.get("common-configs", [])
    size = worker.get("block-size", doc["Common"].get("block-size") if listed else None)
    if size is None:
        assert found.origins["performance.block_size"] == "default"
    else:
        assert found.config.performance.block_size == int(size)
        assert "block-size" in found.origins["performance.block_size"]
    assert found.warnings == []


def run_probe(env_extra: dict[str, str], *argv: str, cwd: Path | None = None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env.update(env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "path",
    [p for p in DYNAMO_CONFIGS if "v0.3.2" in str(p)],
    ids=lambda p: str(p.relative_to(FIXTURES)),
)
def test_detection_from_dynamo_service_config_in_a_worker_process(path: Path) -> None:
    # `dynamo serve` loads the YAML and hands the whole of it, as one JSON object, to every
    # process it starts; each is started with `--service-name <Service>`.
    doc = yaml.safe_load(path.read_text())
    argv = ("graphs.agg:Frontend", "--service-name", "VllmWorker")
    plain = run_probe({"DYNAMO_SERVICE_CONFIG": json.dumps(doc)}, *argv)
    assert plain["describe"] == "not enabled, source: DYNAMO_SERVICE_CONFIG (no xconnector section)"

    doc = with_design_section(doc)
    doc["VllmWorker"] = {**doc["VllmWorker"], "xconnector": HYBRID}
    found = run_probe({"DYNAMO_SERVICE_CONFIG": json.dumps(doc)}, *argv)
    assert found["describe"] == (
        "enabled, source: DYNAMO_SERVICE_CONFIG (Common.xconnector + VllmWorker.xconnector)"
    )
    assert found["mode"] == "hybrid"
    assert found["adapters"] == [["lmcache", "cache"], ["vllm", "inference"]]
    # Another service reads Common alone.
    other = run_probe({"DYNAMO_SERVICE_CONFIG": json.dumps(doc)}, "--service-name=PrefillWorker")
    assert (other["section"], other["mode"]) == ("Common.xconnector", "embedded")


def test_channel_order_in_a_real_process(tmp_path: Path) -> None:
    own = tmp_path / "xconnector.yaml"
    own.write_text(yaml.safe_dump({"xconnector": {"enabled": True, **HYBRID}}))
    dynamo = json.dumps({"Common": {"xconnector": {"enabled": True}}})
    deployment = "Common:\n  xconnector:\n    enabled: false\n"
    graph = tmp_path / "agg.yaml"
    graph.write_text("Common:\n  xconnector: {enabled: true, adapters: [{name: vllm}]}\n")

    everything = {
        "XCONNECTOR_CONFIG": str(own),
        "DYNAMO_SERVICE_CONFIG": dynamo,
        "DYN_DEPLOYMENT_CONFIG": deployment,
    }
    r = run_probe(everything, "-f", str(graph))
    assert (r["source"], r["mode"]) == (f"XCONNECTOR_CONFIG={own}", "hybrid")
    del everything["XCONNECTOR_CONFIG"]
    assert run_probe(everything, "-f", str(graph))["source"] == "DYNAMO_SERVICE_CONFIG"
    del everything["DYNAMO_SERVICE_CONFIG"]
    r = run_probe(everything, "-f", str(graph))
    assert (r["source"], r["enabled"]) == ("DYN_DEPLOYMENT_CONFIG", False)
    r = run_probe({}, "serve", "graphs.agg:Frontend", "-f", "agg.yaml", cwd=tmp_path)
    assert (r["source"], r["adapters"]) == ("-f agg.yaml", [["vllm", "inference"]])
    r = run_probe({"XCONNECTOR_CONFIG": '{"enabled": true}'})
    assert r["describe"] == "enabled, source: XCONNECTOR_CONFIG (inline) ((whole document))"
    assert run_probe({})["describe"] == "not enabled, source: none"


def test_detect_config_takes_an_explicit_environment() -> None:
    env = {"DYN_DEPLOYMENT_CONFIG": '{"Common": {"xconnector": {"enabled": true}}}', "HOME": "/x"}
    assert detect_config(env, ["worker"]).enabled
    assert detect_config({}, ["worker"]).source == "none"


@pytest.mark.parametrize("path", PRIOR_CONFIGS, ids=lambda p: p.name)
def test_prototype_configs_are_accepted_or_rejected_with_a_config_error(path: Path) -> None:
    for service in (None, "VllmWorker"):
        try:
            found = load_config_file(path, service=service)
        except ConfigError as e:
            text = str(e)
            assert text.startswith(f"{path}: "), text
            # Each problem names a key path and says what would be accepted or what to do.
            problems = text.splitlines()[1:] or [text]
            assert all(("accepted" in p or "; " in p or "expected" in p) for p in problems), text
        else:
            assert found.source == str(path)
            if found.found:
                assert found.config.enabled in (True, False)


def test_prototype_configs_get_these_verdicts() -> None:
    verdicts = {}
    for path in PRIOR_CONFIGS:
        try:
            verdicts[path.name] = load_config_file(path, service="VllmWorker").describe()
        except ConfigError as e:
            verdicts[path.name] = str(e).splitlines()[0]
    assert verdicts["agg_with_xconnector.yaml"].startswith("not enabled")
    assert (
        "invalid XConnector configuration (5 problem(s))"
        in verdicts["agg_router_with_xconnector.yaml"]
    )
    # Its section sits under VllmWorker.extensions, which is not where XConnector looks: off,
    # with a warning saying so.
    assert verdicts["disagg_xconnector@1b99752.yaml"].startswith("not enabled")
    stray = load_config_file(PRIOR_CONFIGS[0].parent / "disagg_xconnector@1b99752.yaml")
    assert stray.warnings == [
        "VllmWorker.extensions.xconnector is not read by XConnector, so these settings do "
        "nothing; move them to Common.xconnector"
    ]
    # A separate `XConnectorService:` (the prototype ran one) holds no section for workers.
    assert verdicts["xconnector_config.yaml"].startswith("not enabled")
    assert "invalid XConnector configuration (7 problem(s))" in verdicts["dynamo-xconnector.yaml"]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("bad.yaml", b"xconnector:\n  enabled: [true\n", "not valid YAML/JSON"),
        ("tabs.yaml", b"xconnector:\n\tenabled: true\n", "not valid YAML/JSON"),
        ("empty.yaml", b"", "is empty; expected YAML"),
        ("blank.yaml", b"\n   \n", "is empty; expected YAML"),
        ("big.yaml", b"#" * 10_000_000, "is 10.0 MB, more than the 1 MiB a config may be"),
        ("latin1.yaml", b"xconnector:\n  enabled: true  # \xe9t\xe9\n", "is not UTF-8 text"),
        ("binary.yaml", bytes(range(256)), "is not UTF-8 text"),
        ("list.yaml", b"- enabled: true\n", "expected a mapping of keys, got a list"),
    ],
)
def test_unreadable_and_malformed_files_are_clear_config_errors(
    tmp_path: Path, name: str, data: bytes, message: str
) -> None:
    path = write(tmp_path, name, data)
    with pytest.raises(ConfigError) as info:
        SDKConfig.from_yaml(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_missing_paths_and_directories_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory; point it at a YAML file"):
        load_config_file(tmp_path)
    with pytest.raises(ConfigError, match="no such file; check the path"):
        load_config_file(tmp_path / "nope.yaml")
    env = {"XCONNECTOR_CONFIG": str(tmp_path)}
    with pytest.raises(ConfigError, match=f"^XCONNECTOR_CONFIG={tmp_path}: is a directory"):
        detect_config(env, [])


@pytest.mark.parametrize("var", ["DYNAMO_SERVICE_CONFIG", "DYN_DEPLOYMENT_CONFIG"])
def test_malformed_json_in_the_environment_names_the_variable(var: str) -> None:
    with pytest.raises(ConfigError, match=f"^{var}: not valid YAML/JSON"):
        detect_config({var: '{"Common": {"xconnector": {"enabled": true}'}, [])
    with pytest.raises(ConfigError, match=f"^{var}: invalid XConnector configuration"):
        detect_config({var: '{"Common": {"xconnector": {"enabled": 1}}}'}, [])
