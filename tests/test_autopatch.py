"""The autopatch in real, fresh subprocesses: every import order, forked children,
`xconnector-run`, the toggle, the kill switch and no config; Dynamo's own channel with
`--service-name`; a fault matrix where the worker's results must equal the unpatched ones; and
correctness (same outputs, the cached prefix not recomputed).

The worker classes (tests/dynamo_app/components) are Dynamo-style: `@service`-wrapped, with the
v0 connector signatures, over the numpy model of tests/v0_worker.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

TESTS = Path(__file__).resolve().parent
APP = TESTS / "dynamo_app"
FIXTURE = TESTS.parents[1] / "shared" / "fixtures" / "dynamo-configs" / "v0.3.2-main-bump" / "llm"
VENV_BIN = Path(sys.executable).parent

ENABLED = {"Common": {"xconnector": {"enabled": True}}}
BASELINE_COMPUTED = [61, 61, 69]  # every token of every request, without XConnector
CACHED_COMPUTED = [61, 13, 21]  # the repeat skips 3 blocks; the third shares 48 tokens


def run(
    env: dict[str, str] | None = None,
    *args: str,
    runner: list[str] | None = None,
    expect_rc: int = 0,
) -> dict[str, Any]:
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("XCONNECTOR_", "DYNAMO_", "DYN_"))
        and k not in ("ORDER", "WORKER", "FAULT")
    }
    full["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(APP)])
    full.update(env or {})
    cmd = [*(runner or []), sys.executable, str(APP / "run_worker.py"), *args]
    proc = subprocess.run(
        cmd, env=full, cwd=APP, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == expect_rc, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["stderr"] = proc.stderr
    return out


def service_config(doc: dict[str, Any]) -> dict[str, str]:
    return {"DYNAMO_SERVICE_CONFIG": json.dumps(doc)}


@pytest.fixture(scope="module")
def baseline() -> dict[str, Any]:
    out = run({"ORDER": "none"}, "--service-name", "VllmWorker")
    assert out["computed"] == BASELINE_COMPUTED and out["patched"] == {
        "recv_kv_caches": 0,
        "send_kv_caches": 0,
    }
    return out


@pytest.mark.parametrize("order", ["before", "after", "twice"])
@pytest.mark.parametrize("worker", ["worker", "prefill"])
def test_every_import_order_patches_once_and_unpatch_restores_the_originals(
    order: str, worker: str, baseline: dict[str, Any]
) -> None:
    service = "VllmWorker" if worker == "worker" else "PrefillWorker"
    out = run(
        {**service_config(ENABLED), "ORDER": order, "WORKER": worker, "UNPATCH": "1"},
        "--service-name",
        service,
    )
    assert out["patched"] == {"recv_kv_caches": 1, "send_kv_caches": 1}  # never double-wrapped
    assert out["restored"] == {"recv_kv_caches": True, "send_kv_caches": True}
    assert out["computed"] == CACHED_COMPUTED
    assert out["outputs"] == baseline["outputs"]
    # The worker's own methods ran exactly once per call.
    assert out["recv_calls"] == 3 and out["send_calls"] == 3


def test_the_import_line_as_the_worker_modules_own_first_line(baseline: dict[str, Any]) -> None:
    doc = {
        "Common": {
            "xconnector": {
                "enabled": True,
                "integration": {"targets": ["components.self_worker:VllmWorker"]},
            }
        }
    }
    out = run(
        {**service_config(doc), "ORDER": "none", "WORKER": "self", "UNPATCH": "1"},
        "--service-name",
        "VllmWorker",
    )
    assert out["patched"] == {"recv_kv_caches": 1, "send_kv_caches": 1}
    assert out["computed"] == CACHED_COMPUTED and out["outputs"] == baseline["outputs"]
    assert out["restored"] == {"recv_kv_caches": True, "send_kv_caches": True}


def test_a_forked_child_gets_its_own_sdk_and_no_second_wrapper(baseline: dict[str, Any]) -> None:
    out = run({**service_config(ENABLED), "FORK": "1"}, "--service-name", "VllmWorker")
    assert out["child"] is True
    assert out["patched"] == {"recv_kv_caches": 1, "send_kv_caches": 1}
    assert out["computed"] == CACHED_COMPUTED  # the child starts cold and caches on its own
    assert out["outputs"] == baseline["outputs"]


def test_xconnector_run_preloads_the_autopatch(baseline: dict[str, Any]) -> None:
    out = run(
        {**service_config(ENABLED), "ORDER": "none"},
        "--service-name",
        "VllmWorker",
        runner=[str(VENV_BIN / "xconnector-run")],
    )
    assert out["patched"] == {"recv_kv_caches": 1, "send_kv_caches": 1}
    assert out["computed"] == CACHED_COMPUTED and out["outputs"] == baseline["outputs"]


def test_xconnector_run_usage_and_a_missing_command() -> None:
    runner = str(VENV_BIN / "xconnector-run")
    for args, rc, where in [
        ([], 2, "stderr"),
        (["--help"], 0, "stdout"),
        (["--", "-h"], 0, "stdout"),
    ]:
        proc = subprocess.run([runner, *args], capture_output=True, text=True, check=False)
        assert proc.returncode == rc and "usage: xconnector-run" in getattr(proc, where), args
    proc = subprocess.run(
        [runner, "no-such-command-xc"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 127 and "cannot run 'no-such-command-xc'" in proc.stderr


@pytest.mark.parametrize(
    "env",
    [
        {**service_config({"Common": {"xconnector": {"enabled": False}}})},
        {**service_config(ENABLED), "XCONNECTOR_DISABLE": "1"},
        {**service_config(ENABLED), "XCONNECTOR_ENABLED": "0"},
        {},
    ],
    ids=["toggle-off", "XCONNECTOR_DISABLE=1", "XCONNECTOR_ENABLED=0", "no-config"],
)
def test_off_switches_leave_the_class_untouched(
    env: dict[str, str], baseline: dict[str, Any]
) -> None:
    out = run(env, "--service-name", "VllmWorker")
    assert out["patched"] == {"recv_kv_caches": 0, "send_kv_caches": 0}
    assert out["computed"] == BASELINE_COMPUTED and out["outputs"] == baseline["outputs"]


def test_the_kill_switch_imports_nothing_beyond_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); "
        "import xconnector.integrations.dynamo.autopatch; "
        "print(sorted(m for m in set(sys.modules) - before))"
    )
    env = {**os.environ, "XCONNECTOR_DISABLE": "1", **service_config(ENABLED)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    loaded = eval(proc.stdout)  # a list literal printed above
    others = [m for m in loaded if not m.startswith("xconnector")]
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in others), others
    assert [m for m in loaded if m.startswith("xconnector")] == [
        "xconnector",
        "xconnector.integrations",
        "xconnector.integrations.dynamo",
        "xconnector.integrations.dynamo.autopatch",
        "xconnector.switches",  # the switches themselves: standard library only
    ]


@pytest.mark.parametrize("yaml_file", ["agg.yaml", "disagg.yaml"])
def test_dynamos_channel_patches_workers_only(yaml_file: str, baseline: dict[str, Any]) -> None:
    # `dynamo serve` hands each process the whole YAML as JSON and starts it with --service-name.
    doc = yaml.safe_load((FIXTURE / yaml_file).read_text())
    # Dynamo hands a worker `block-size` as --block-size; this numpy worker runs 16-token blocks
    # whatever it is told (tests/v0_worker.py), so the file says what it runs.
    doc["Common"]["block-size"] = 16
    doc["Common"]["xconnector"] = {
        "enabled": True,
        "adapters": [{"name": "lmcache", "type": "cache", "config": {"max_cache_size": 256}}],
    }
    env = service_config(doc)
    for service, worker in [("VllmWorker", "worker"), ("PrefillWorker", "prefill")]:
        out = run({**env, "WORKER": worker}, "--service-name", service)
        assert out["patched"] == {"recv_kv_caches": 1, "send_kv_caches": 1}, service
        assert out["computed"] == CACHED_COMPUTED and out["outputs"] == baseline["outputs"]
    # The same worker class in a process that is not a worker service stays untouched.
    for service in ("Frontend", "Processor"):
        out = run(env, "--service-name", service)
        assert out["patched"] == {"recv_kv_caches": 0, "send_kv_caches": 0}, service
        assert out["computed"] == BASELINE_COMPUTED
    front = run({**env, "WORKER": "frontend"}, "--service-name", "Frontend")
    assert front["patched"] == {"recv_kv_caches": 0, "send_kv_caches": 0}


def test_a_target_without_kv_methods_is_one_info_line() -> None:
    doc = {
        "Common": {
            "xconnector": {
                "enabled": True,
                "integration": {"targets": ["components.frontend:Frontend"]},
            }
        }
    }
    out = run(
        {**service_config(doc), "WORKER": "frontend", "LOG_INFO": "1"},
        "--service-name",
        "VllmWorker",
    )
    assert out["patched"] == {"recv_kv_caches": 0, "send_kv_caches": 0}
    assert out["stderr"].count("Frontend has no recv_kv_caches/send_kv_caches methods") == 1, out[
        "stderr"
    ]
    assert "Traceback" not in out["stderr"] and "ERROR" not in out["stderr"]


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "fault",
    [
        "broken-yaml",
        "broken-json",
        "native-panic-lookup",
        "native-error-load",
        "adapter-exception",
        "wrong-shape",
    ],
)
def test_fault_matrix_the_worker_result_equals_the_unpatched_one(
    fault: str, tmp_path: Path, baseline: dict[str, Any]
) -> None:
    env: dict[str, str]
    if fault == "broken-yaml":
        env = {"XCONNECTOR_CONFIG": write(tmp_path, "x.yaml", "xconnector:\n  enabled: [true\n")}
    elif fault == "broken-json":
        env = {"DYNAMO_SERVICE_CONFIG": '{"Common": {"xconnector": {"enabled": true}'}
    elif fault == "native-panic-lookup":
        env = {**service_config(ENABLED), "FAULT": "native:lookup:panic"}
    elif fault == "native-error-load":
        env = {**service_config(ENABLED), "FAULT": "native:load:error"}
    elif fault == "adapter-exception":
        env = {**service_config(ENABLED), "FAULT": "adapter"}
    else:  # KV tensors whose block size is not the configured one: layout detection fails
        doc = {"Common": {"xconnector": {"enabled": True, "performance": {"block_size": 32}}}}
        env = service_config(doc)
    out = run(env, "--service-name", "VllmWorker")
    assert out["outputs"] == baseline["outputs"], fault
    assert out["recv_calls"] == 3 and out["send_calls"] == 3
    assert "Traceback" not in out["stderr"], out["stderr"]
    if fault.startswith("broken"):
        assert out["patched"] == {"recv_kv_caches": 0, "send_kv_caches": 0}
        assert out["stderr"].count("XConnector is off, the worker runs without it") == 1
    else:
        assert out["patched"] == {"recv_kv_caches": 1, "send_kv_caches": 1}
        assert out["fallbacks"], out  # counted
        warned = [ln for ln in out["stderr"].splitlines() if "fell back" in ln]
        assert 1 <= len(warned) <= 2, out["stderr"]  # once per kind (receive, send)


def test_strict_mode_stops_startup_on_a_config_error(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        "x.yaml",
        "xconnector:\n  enabled: true\n  mode: fast\n  integration: {strict: true}\n",
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import xconnector.integrations.dynamo.autopatch"],
        env={**os.environ, "XCONNECTOR_CONFIG": bad, "XCONNECTOR_STRICT": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and "ConfigError" in proc.stderr and "mode" in proc.stderr


def test_the_originals_exceptions_propagate_unchanged_and_it_runs_once() -> None:
    code = """
import asyncio, json
import xconnector.integrations.dynamo.autopatch
from components.worker import VllmWorker
w = VllmWorker.inner({"num_blocks": 16})
w.raise_in_recv = True
try:
    asyncio.run(w.prefill([list(range(1, 40))]))
except RuntimeError as e:
    print(json.dumps({"error": str(e), "recv_calls": w.recv_calls}))
"""
    env = {
        **os.environ,
        **service_config(ENABLED),
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(APP)]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, "--service-name", "VllmWorker"],
        env=env,
        cwd=APP,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout) == {"error": "the worker's own recv failed", "recv_calls": 1}


def test_the_class_hook_goes_once_the_module_ends_without_the_class(tmp_path: Path) -> None:
    # The import line is the worker module's own first line, but the module never defines the
    # target class: the class-statement hook must not stay installed for the process's life.
    (tmp_path / "half_worker.py").write_text(
        "import xconnector.integrations.dynamo.autopatch\n"
        "import builtins\n"
        "HOOKED_WHILE_LOADING = builtins.__build_class__ is not ORIGINAL\n"
        "class SomethingElse:\n"
        "    pass\n"
    )
    code = (
        "import builtins, json\n"
        "import sitecustomize_stub\n"
        "original = builtins.__build_class__\n"
        "import half_worker\n"
        "class AfterTheModule:\n"
        "    pass\n"
        "print(json.dumps({'while': half_worker.HOOKED_WHILE_LOADING,"
        " 'after': builtins.__build_class__ is not original}))\n"
    )
    # half_worker reads ORIGINAL from builtins: the value before any hook.
    (tmp_path / "sitecustomize_stub.py").write_text(
        "import builtins\nbuiltins.ORIGINAL = builtins.__build_class__\n"
    )
    doc = {
        "Common": {
            "xconnector": {"enabled": True, "integration": {"targets": ["half_worker:Worker"]}}
        }
    }
    env = {
        **os.environ,
        **service_config(doc),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, "--service-name", "VllmWorker"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(proc.stdout)
    assert out == {"while": True, "after": False}, proc.stderr


def test_a_class_statement_racing_the_class_hooks_removal_still_builds() -> None:
    # Another thread's class statement looked up the wrapped __build_class__ just before the
    # wrapper removed itself: the call must still build the class (it used to call None).
    import builtins
    import importlib.machinery
    import types

    from xconnector import patching

    module = types.ModuleType("racing_worker")
    module.__spec__ = importlib.machinery.ModuleSpec("racing_worker", None)
    module.__spec__._initializing = True  # type: ignore[attr-defined]
    sys.modules["racing_worker"] = module
    try:
        patching.when_class_defined("racing_worker", "Never", lambda cls: None)
        looked_up = builtins.__build_class__
        patching.restore_all()
        assert builtins.__build_class__ is not looked_up
        built = looked_up(lambda: None, "Built")
        assert isinstance(built, type) and built.__name__ == "Built"
    finally:
        sys.modules.pop("racing_worker", None)
        patching.restore_all()
