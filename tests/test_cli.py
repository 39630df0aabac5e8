"""`xconnector check-config` as a user runs it: the installed console script and
`python -m xconnector`, in real subprocesses. Exit codes: 0 valid, 1 invalid, 2 usage error."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG_VARS = ("XCONNECTOR_CONFIG", "DYNAMO_SERVICE_CONFIG", "DYN_DEPLOYMENT_CONFIG")
CONSOLE_SCRIPT = Path(sys.executable).with_name("xconnector")

RISKY = """\
Common:
  model: m
  xconnector:
    enabled: true
    adapters:
      lmcache: {config: {max_cache_size: 2GiB}}
VllmWorker:
  common-configs: [model, xconnector]
  xconnector: {enable_distributed: false}
"""


def run(
    *args: str, env: dict[str, str] | None = None, module: bool = False
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "xconnector"] if module else [str(CONSOLE_SCRIPT)]
    return subprocess.run(
        [*cmd, *args], env=full_env, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_console_script_is_installed() -> None:
    assert CONSOLE_SCRIPT.exists() or shutil.which("xconnector"), CONSOLE_SCRIPT


@pytest.mark.parametrize("module", [False, True], ids=["xconnector", "python -m xconnector"])
def test_a_valid_config_prints_effective_values_origins_and_warnings(
    tmp_path: Path, module: bool
) -> None:
    path = tmp_path / "agg.yaml"
    path.write_text(RISKY)
    r = run("check-config", str(path), "--service", "VllmWorker", module=module)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == (
        f"{path}: valid; XConnector is enabled "
        "(read from Common.xconnector + VllmWorker.xconnector)"
    )
    row = {line.split()[0]: line.split(maxsplit=2)[1:] for line in lines if line.startswith("  ")}
    assert row["enable_distributed"] == [
        "false",
        f"{path}: VllmWorker.xconnector.enable_distributed",
    ]
    assert row["enabled"] == ["true", f"{path}: Common.xconnector.enabled"]
    assert row["adapters[0].config.max_cache_size"] == [
        '"2GiB"',
        f"{path}: Common.xconnector.adapters.lmcache.config.max_cache_size",
    ]
    assert row["adapters[0].type"] == ['"cache"', "default"]
    assert row["performance.block_size"] == ["16", "default"]
    warnings = [line for line in lines if line.startswith("  - ")]
    assert len(warnings) == 2
    assert "VllmWorker.common-configs lists `xconnector`" in warnings[0]
    assert 'vLLM exits with "unrecognized arguments"' in warnings[0]
    assert "VllmWorker.xconnector: Dynamo turns every key under a service" in warnings[1]
    assert run("check-config", str(path), "--strict").returncode == 1


def test_json_output(tmp_path: Path) -> None:
    path = tmp_path / "agg.yaml"
    path.write_text(RISKY)
    r = run("check-config", str(path), "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["valid"] and doc["enabled"]
    assert doc["config"]["adapters"][0]["name"] == "lmcache"
    assert doc["origins"]["mode"] == "default"
    assert len(doc["warnings"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("xconnector: {enabled: maybe}\n")
    r = run("check-config", str(bad), "--json")
    assert r.returncode == 1
    assert "xconnector.enabled: expected true or false" in json.loads(r.stdout)["error"]


def test_a_file_without_a_section_is_valid_and_off(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text("Common:\n  model: m\nVllmWorker:\n  common-configs: [model]\n")
    r = run("check-config", str(path))
    assert r.returncode == 0
    assert r.stdout.startswith(f"{path}: no xconnector section; XConnector stays off.")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"xconnector:\n  enabeld: true\n  mode: fast\n", "3 problem(s)"),
        (b"xconnector: {enabled: true\n", "not valid YAML/JSON"),
        (b"", "is empty"),
        (b"#" * 10_000_000, "is 10.0 MB, more than the 1 MiB a config may be"),
        (b"xconnector:\n  enabled: true # \xff\n", "is not UTF-8 text (byte 0xff"),
    ],
    ids=["invalid", "malformed", "empty", "10MB", "non-utf8"],
)
def test_invalid_files_exit_1_with_a_message_and_no_traceback(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(content)
    r = run("check-config", str(path))
    assert r.returncode == 1
    assert r.stderr.startswith(f"error: {path}: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    missing = run("check-config", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2 and "no such file; check the path" in missing.stderr
    directory = run("check-config", str(tmp_path))
    assert directory.returncode == 2 and "is a directory" in directory.stderr
    assert run().returncode == 2
    assert run("check-config", "--no-such-option").returncode == 2
    assert run("frobnicate").returncode == 2
    for r in (missing, directory):
        assert "Traceback" not in r.stderr


def test_without_a_file_it_checks_what_this_environment_gives_a_worker() -> None:
    dynamo = {
        "Common": {"xconnector": {"enabled": True}},
        "PrefillWorker": {"xconnector": {"enable_caching": False}},
    }
    env = {"DYNAMO_SERVICE_CONFIG": json.dumps(dynamo)}
    r = run("check-config", "--service", "PrefillWorker", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(
        "DYNAMO_SERVICE_CONFIG: valid; XConnector is enabled "
        "(read from Common.xconnector + PrefillWorker.xconnector)"
    )
    r = run("check-config")
    assert (r.returncode, r.stdout.splitlines()[0]) == (
        0,
        "no XConnector config found in this environment; XConnector stays off",
    )
    r = run("check-config", env={"DYN_DEPLOYMENT_CONFIG": "{not json"})
    assert r.returncode == 1 and r.stderr.startswith("error: DYN_DEPLOYMENT_CONFIG: not valid")


def test_help_exits_0_and_lists_every_command_and_option() -> None:
    top = run("--help")
    assert top.returncode == 0 and top.stderr == ""
    for command in ("check-config", "stats", "version", "bench", "migrate-config"):
        assert f"  {command}" in top.stdout, top.stdout
    bench = run("bench", "-h")
    assert bench.returncode == 0
    for option in ("--requests", "--seed", "--cache-mib", "--block-kib", "--plot"):
        assert option in bench.stdout, bench.stdout
    assert "-- WORKER COMMAND" in run("check-config", "--help").stdout


def test_output_goes_through_pythons_streams(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process, what the native command prints is what sys.stdout/sys.stderr receive."""
    from xconnector.cli import check_config, main

    path = tmp_path / "agg.yaml"
    path.write_text(RISKY)
    assert main(["check-config", str(path), "--service", "VllmWorker"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{path}: valid; XConnector is enabled")
    assert "warnings (2):" in captured.out and captured.err == ""
    out, err = io.StringIO(), io.StringIO()
    assert check_config(str(tmp_path / "missing.yaml"), out=out, err=err) == 2
    assert out.getvalue() == "" and "no such file" in err.getvalue()
    assert capsys.readouterr() == ("", "")


def test_an_exception_in_a_python_callback_propagates_unchanged(tmp_path: Path) -> None:
    from xconnector.cli import run as run_cli

    png = tmp_path / "no-such-dir" / "bench.png"
    args = ["bench", "--requests", "60", "--cache-mib", "8", "--plot", str(png)]
    with pytest.raises(FileNotFoundError):
        run_cli(args, io.StringIO(), io.StringIO())


def test_a_closed_stdout_ends_the_command_quietly(tmp_path: Path) -> None:
    path = tmp_path / "agg.yaml"
    path.write_text(RISKY)
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: the first write fails with EPIPE
    try:
        r = subprocess.run(
            [str(CONSOLE_SCRIPT), "check-config", str(path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
