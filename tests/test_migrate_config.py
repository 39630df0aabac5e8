"""`xconnector migrate-config` as a user runs it (`python -m xconnector`, real subprocesses) on
every config file of the earlier prototype: the output passes `check-config`, carries the old
values (read from each fixture here, never written into the test), names what it dropped, and
refuses to overwrite or to guess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

PRIOR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "prior-xconnector-configs"
FIXTURES = sorted(PRIOR.glob("*.yaml"))
CONFIG_VARS = ("XCONNECTOR_CONFIG", "DYNAMO_SERVICE_CONFIG", "DYN_DEPLOYMENT_CONFIG")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    return subprocess.run(
        [sys.executable, "-m", "xconnector", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def migrate(name: str, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """The fixture, its migration (read back from -o NEW), and the notes by key path."""
    new = tmp_path / "new.yaml"
    r = run("migrate-config", str(PRIOR / name), "-o", str(new))
    assert r.returncode == 0, r.stderr
    notes = dict(
        line.strip().split(": ", 1) for line in r.stderr.splitlines() if line.startswith("  ")
    )
    return yaml.safe_load((PRIOR / name).read_text()), yaml.safe_load(new.read_text()), notes


def adapter(section: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in section["adapters"] if a["name"] == name)


def test_all_prototype_files_are_here() -> None:
    assert len(FIXTURES) >= 7


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_every_prototype_file_migrates_to_a_config_check_config_accepts(
    path: Path, tmp_path: Path
) -> None:
    new = tmp_path / "new.yaml"
    r = run("migrate-config", str(path), "-o", str(new))
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"{path}: migrated to "), r.stderr
    assert f"check-config {new}" in r.stderr
    # Valid, and nothing Dynamo would choke on: --strict fails on any warning.
    check = run("check-config", str(new), "--strict")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "XConnector is enabled" in check.stdout
    doc = yaml.safe_load(new.read_text())
    for name, service in doc.items():
        if name != "Common" and isinstance(service, dict):
            assert "xconnector" not in service and "xconnector" not in service.get("extensions", {})
            assert "xconnector" not in service.get("common-configs", [])
    # The same YAML on stdout without -o, and with -o -.
    for args in ([], ["-o", "-"]):
        out = run("migrate-config", str(path), *args)
        assert out.returncode == 0 and out.stdout == new.read_text(), out.stderr


def test_the_service_config_becomes_an_xconnector_section(tmp_path: Path) -> None:
    old, new, notes = migrate("xconnector_config.yaml", tmp_path)
    svc = old["XConnectorService"]
    assert list(new) == ["xconnector"]
    section = new["xconnector"]
    lmcache = svc["adapters"]["lmcache"]["config"]
    assert adapter(section, "lmcache")["config"] == {
        "storage_backend": lmcache["storage_backend"],
        "max_cache_size": lmcache["max_cache_size"],
        "chunk_size": lmcache["engine_config"]["chunk_size"],
    }
    vllm = adapter(section, "vllm")["config"]
    assert vllm == {
        "enable_prefix_caching": svc["adapters"]["vllm"]["config"]["enable_prefix_caching"]
    }
    dynamo = adapter(section, "dynamo")["config"]
    assert dynamo["namespace"] == svc["adapters"]["dynamo"]["config"]["namespace"]
    assert dynamo["component"] == svc["adapters"]["dynamo"]["config"]["component_name"]
    assert section["performance"]["metrics_port"] == svc["monitoring"]["metrics_port"]
    # What has no equivalent is named by its key path, with the reason.
    for key in svc["server"]:
        assert "HTTP service" in notes[f"XConnectorService.server.{key}"]
    for name in svc["adapters"]:
        assert "built in" in notes[f"XConnectorService.adapters.{name}.class_path"]
    assert "dropped" in notes["XConnectorService.adapters.lmcache.config.enable_compression"]
    assert "dropped" in notes["XConnectorService.routing.rules"]
    assert "set to true" in notes["xconnector.enabled"]


def test_a_top_level_section_moves_under_common_and_the_services_stay(tmp_path: Path) -> None:
    old, new, notes = migrate("agg_router_with_xconnector.yaml", tmp_path)
    assert "xconnector" not in new
    assert list(new)[1:] == [k for k in old if k not in ("Common", "xconnector")]
    for name in old:
        if name not in ("Common", "xconnector"):
            assert new[name] == old[name], name
    assert {k: v for k, v in new["Common"].items() if k != "xconnector"} == old["Common"]
    section, before = new["Common"]["xconnector"], old["xconnector"]
    assert (section["enabled"], section["mode"]) == (before["enabled"], before["mode"])
    lmcache = adapter(section, "lmcache")["config"]
    for key in ("storage_backend", "max_cache_size"):
        assert lmcache[key] == before["adapters"]["lmcache"][key]
        assert notes[f"xconnector.adapters.lmcache.{key}"].startswith("-> Common.xconnector")
    assert "Common.xconnector" in notes["xconnector"]
    assert "XCONNECTOR_CONFIG" in notes["xconnector.config_file"]
    assert "dropped" in notes["xconnector.adapters.vllm.model_name"]


def test_a_section_under_a_service_moves_to_common(tmp_path: Path) -> None:
    old, new, notes = migrate("disagg_xconnector@1b99752.yaml", tmp_path)
    worker = dict(old["VllmWorker"])
    before = worker.pop("extensions")["xconnector"]
    assert new["VllmWorker"] == worker
    section = new["Common"]["xconnector"]
    assert section["integration"]["strict"] == before["fail_on_error"]
    assert adapter(section, "dynamo")["config"] == before["adapters"]["dynamo"]["config"]
    assert before["adapters"]["lmcache"]["config"]["storage_backend"] == "local"
    assert adapter(section, "lmcache")["config"]["storage_backend"] == "memory"
    assert "dropped" in notes["VllmWorker.extensions.xconnector.xconnector_path"]
    assert "removed" in notes["VllmWorker.extensions"]


def test_the_sdk_and_xconnector_sections_merge(tmp_path: Path) -> None:
    old, new, notes = migrate("dynamo-xconnector.yaml", tmp_path)
    section, sdk = new["xconnector"], old["sdk"]
    assert section["enable_caching"] == sdk["enable_kv_cache"]
    own = sdk["adapters"][0]
    lmcache = adapter(section, own["name"])
    assert lmcache["priority"] == own["priority"]
    assert lmcache["config"]["max_cache_size"] == own["config"]["max_cache_size"]
    assert "sdk.adapters[0].config.max_cache_size" in notes["xconnector.cache.max_size"]
    for key in old["xconnector"]["etcd"]:
        assert "etcd" in notes[f"xconnector.etcd.{key}"]
    assert "dropped" in notes["sdk.adapters[0].config.enable_compression"]
    assert "dropped" in notes["xconnector.kv_transfer.compression"]


def test_a_dynamo_config_without_a_section_gets_one_turned_on(tmp_path: Path) -> None:
    old, new, notes = migrate("agg_with_xconnector.yaml", tmp_path)
    assert new["Common"]["xconnector"] == {"enabled": True}
    assert {k: v for k, v in new["Common"].items() if k != "xconnector"} == old["Common"]
    assert "no XConnector section" in notes["Common.xconnector"]


def test_an_existing_output_is_kept_unless_forced(tmp_path: Path) -> None:
    path = PRIOR / "dynamo-xconnector.yaml"
    new = tmp_path / "new.yaml"
    new.write_text("keep me\n")
    r = run("migrate-config", str(path), "-o", str(new))
    assert r.returncode == 2
    assert f"{new} exists" in r.stderr and "--force" in r.stderr
    assert new.read_text() == "keep me\n"
    r = run("migrate-config", str(path), "-o", str(new), "--force")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(new.read_text())["xconnector"]["enabled"] is True


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("xconnector: {enabled: [true\n", "not valid YAML/JSON"),
        ("model: m\nport: 8000\n", "no XConnector settings found"),
        ("- enabled: true\n", "expected a mapping at the top level"),
        ("", "is empty"),
        (None, "no such file"),
    ],
    ids=["not-yaml", "no-settings", "a-list", "empty", "missing"],
)
def test_bad_input_is_a_clear_error_naming_the_file(
    tmp_path: Path, content: str | None, message: str
) -> None:
    old = tmp_path / "old.yaml"
    if content is not None:
        old.write_text(content)
    new = tmp_path / "new.yaml"
    r = run("migrate-config", str(old), "-o", str(new))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: {old}: "), r.stderr
    assert message in r.stderr
    assert not new.exists() and r.stdout == ""
