"""Native log records reach Python's `logging` under `xconnector`; XCONNECTOR_LOG: stderr."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from xconnector import Engine
from xconnector.logs import set_level


def test_native_records_reach_python_logging(caplog: pytest.LogCaptureFixture) -> None:
    set_level(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG, logger="xconnector"):
            Engine(block_bytes=64, capacity_bytes=640, model="logging-test")
        records = [r for r in caplog.records if r.name.startswith("xconnector.")]
        assert any("engine created" in r.getMessage() for r in records), caplog.text
        assert all(r.levelno == logging.DEBUG for r in records)
    finally:
        set_level(logging.NOTSET)


def test_disabled_level_emits_nothing(caplog: pytest.LogCaptureFixture) -> None:
    set_level(logging.WARNING)
    try:
        with caplog.at_level(logging.WARNING, logger="xconnector"):
            Engine(block_bytes=64, capacity_bytes=640, model="quiet")
        assert not [r for r in caplog.records if "engine created" in r.getMessage()]
    finally:
        set_level(logging.NOTSET)


def test_xconnector_log_env_prints_to_stderr() -> None:
    code = "from xconnector import Engine; Engine(block_bytes=64, capacity_bytes=640)"
    env = {**os.environ, "XCONNECTOR_LOG": "debug"}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "engine created" in r.stderr and "DEBUG" in r.stderr
    quiet = {k: v for k, v in os.environ.items() if k != "XCONNECTOR_LOG"}
    r = subprocess.run(
        [sys.executable, "-c", code], env=quiet, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "engine created" not in r.stderr
