"""`xconnector check-config` and a worker's startup agree: a config check-config rejects never
reaches the first KV call. In a real worker process (tests/dynamo_app, autopatch on import) it
turns XConnector off once at install, or, with `integration.strict: true` written in the same
section, stops startup, even when that section has other errors. What only the worker's machine
can tell (here: a disk directory that cannot be created) is reported once at install and stops a
strict startup; check-config says the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_autopatch import BASELINE_COMPUTED, CACHED_COMPUTED, run

AUTOPATCH = "import xconnector.integrations.dynamo.autopatch"
# The worker of tests/dynamo_app runs KV blocks of 16 tokens (tests/v0_worker.py).
WORKER_BLOCK = 16


def lmcache(config: dict[str, Any], **section: Any) -> dict[str, Any]:
    return {"enabled": True, **section, "adapters": [{"name": "lmcache", "config": config}]}


# (what a new user wrote, the Dynamo document around it, the worker's own flags, what is wrong)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], list[str], str]] = {
    "hybrid redis without remote_url": (
        lmcache({"storage_backend": "redis"}, mode="hybrid"),
        {},
        [],
        "storage_backend: redis needs remote_url",
    ),
    "chunk_size 24 on a 16-token worker (Common.block-size)": (
        lmcache({"chunk_size": 24}),
        {"Common": {"block-size": WORKER_BLOCK}},
        [],
        "chunk_size: 24 is not a multiple of the worker's block size 16",
    ),
    "chunk_size 40 on a 16-token worker (--block-size)": (
        lmcache({"chunk_size": 40}),
        {},
        ["--block-size", str(WORKER_BLOCK)],
        "--block-size 16 on the worker's command line",
    ),
    "a 1 KB cache": (
        lmcache({"max_cache_size": "1KB"}),
        {},
        [],
        "below the smallest memory budget",
    ),
    "performance.block_size that does not fit the worker": (
        {"enabled": True, "performance": {"block_size": 32}},
        {"Common": {"block-size": WORKER_BLOCK}},
        [],
        "performance.block_size: 32 differs from the worker's block size 16",
    ),
}


def document(section: dict[str, Any], around: dict[str, Any]) -> dict[str, Any]:
    doc = {k: dict(v) for k, v in around.items()}
    doc.setdefault("Common", {})["xconnector"] = section
    doc["VllmWorker"] = {"common-configs": ["block-size"] if "block-size" in doc["Common"] else []}
    return doc


def stopped_startup(config: Path, flags: list[str]) -> str:
    """A worker process started with `config` exits 1 at import of the autopatch; its stderr."""
    out = subprocess.run(
        [sys.executable, "-c", AUTOPATCH, "--service-name", "VllmWorker", *flags],
        env={**os.environ, "XCONNECTOR_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1 and "ConfigError" in out.stderr, out.stderr
    return out.stderr


def check_config(path: Path, worker_flags: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "xconnector", "check-config", str(path), "--service"]
    cmd += ["VllmWorker", "--", "python", "-m", "dynamo.vllm", *worker_flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("strict", [False, True])
def test_what_check_config_rejects_never_reaches_a_kv_call(
    tmp_path: Path, case: str, strict: bool
) -> None:
    section, around, flags, wrong = CASES[case]
    if strict:
        section = {**section, "integration": {"strict": True}}
    path = tmp_path / "graph.yaml"
    path.write_text(yaml.safe_dump(document(section, around)))
    checked = check_config(path, flags)
    assert checked.returncode == 1 and wrong in checked.stderr, checked.stderr

    if strict:
        assert wrong in stopped_startup(path, flags)
        return
    out2 = run({"XCONNECTOR_CONFIG": str(path)}, "--service-name", "VllmWorker", *flags)
    assert out2["patched"] == {"recv_kv_caches": 0, "send_kv_caches": 0}
    assert out2["computed"] == BASELINE_COMPUTED
    said = out2["stderr"]
    assert said.count("XConnector is off, the worker runs without it") == 1, said
    assert said.count(wrong) == 1, said


def test_a_duplicate_key_is_rejected_and_strict_in_it_still_counts(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(
        "xconnector:\n  enabled: true\n"
        "xconnector:\n  enabled: true\n  integration: {strict: true}\n"
    )
    checked = check_config(path, [])
    wrong = "duplicate key `xconnector`: written at line 1 column 1 and again at line 3 column 1"
    assert checked.returncode == 1 and wrong in checked.stderr, checked.stderr
    assert wrong in stopped_startup(path, [])


@pytest.mark.parametrize("strict", [False, True])
def test_a_disk_directory_that_cannot_be_made_is_reported_once_at_install(
    tmp_path: Path, strict: bool
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    section = lmcache({"local_disk": str(blocker / "tier")})
    if strict:
        section["integration"] = {"strict": True}
    path = tmp_path / "graph.yaml"
    path.write_text(yaml.safe_dump(document(section, {})))
    checked = check_config(path, [])
    wrong = "is not a directory"
    assert wrong in checked.stdout, checked.stdout
    assert checked.returncode == (1 if strict else 0), checked.stdout + checked.stderr
    if strict:
        said = stopped_startup(path, [])
        assert "XConnector cannot start on this machine" in said and wrong in said
        return
    out2 = run({"XCONNECTOR_CONFIG": str(path)}, "--service-name", "VllmWorker")
    # Said once, before the first request; the worker keeps XConnector's memory tier.
    said = out2["stderr"]
    assert said.count("XConnector runs degraded") == 1, said
    assert out2["patched"] == {"recv_kv_caches": 1, "send_kv_caches": 1}
    assert out2["computed"] == CACHED_COMPUTED
    assert "fell back" not in said, said


def test_processes_that_are_not_workers_skip_the_machine_checks(tmp_path: Path) -> None:
    # `dynamo serve` and its frontend import the graph (and the autopatch) too: they must stay
    # cheap, and a strict config must not stop them for a worker's disk directory.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    section = lmcache({"local_disk": str(blocker / "tier")}, integration={"strict": True})
    path = tmp_path / "graph.yaml"
    path.write_text(yaml.safe_dump(document(section, {})))
    for argv in (["graphs.agg:Frontend", "-f", str(path)], ["--service-name", "Frontend"]):
        out = subprocess.run(
            [sys.executable, "-c", AUTOPATCH, *argv],
            env={**os.environ, "XCONNECTOR_CONFIG": str(path)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert "not a directory" not in out.stderr, out.stderr
    # The worker itself stops.
    assert "XConnector cannot start on this machine" in stopped_startup(path, [])


def test_check_config_without_a_file_reads_the_workers_command_line(tmp_path: Path) -> None:
    path = tmp_path / "xc.yaml"
    path.write_text(yaml.safe_dump({"xconnector": lmcache({"chunk_size": 40})}))
    cmd = [sys.executable, "-m", "xconnector", "check-config", "--", "python", "-m", "dynamo.vllm"]
    env = {**os.environ, "XCONNECTOR_CONFIG": str(path)}
    fits = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert fits.returncode == 0, fits.stderr
    odd = subprocess.run(
        [*cmd, "--block-size", "16"], env=env, capture_output=True, text=True, timeout=60
    )
    assert odd.returncode == 1 and "--block-size 16 on the worker's command line" in odd.stderr
