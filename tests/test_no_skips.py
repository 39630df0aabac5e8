"""The `no_skips` plugin scripts/test.sh loads for the .venv-vllm pass: there a skip (torch or
vLLM gone from the environment) fails the run instead of leaving it green. Checked on throwaway
test files in a pytest of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

MIXED = """
import pytest

def test_passes():
    pass

@pytest.mark.skipif(True, reason="needs torch")
def test_skipped_by_a_marker():
    pass

def test_skipped_inside():
    pytest.skip("no vllm here")

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_to_fail():
    assert False
"""

MODULE_SKIP = """
import pytest
pytest.importorskip("xconnector_no_such_module")

def test_never_collected():
    pass
"""


def pytest_in(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(TESTS)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args],
        cwd=path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    (tmp_path / "test_mixed.py").write_text(MIXED)
    return tmp_path


def test_without_the_plugin_skips_pass(mixed: Path) -> None:
    run = pytest_in(mixed)
    assert run.returncode == 0, run.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in run.stdout


def test_with_the_plugin_every_skip_fails_with_its_reason(mixed: Path) -> None:
    run = pytest_in(mixed, "-p", "no_skips")
    assert run.returncode == 1, run.stdout
    # A marker skips in setup (an error), pytest.skip in the call (a failure).
    assert "1 failed, 1 passed, 1 xfailed, 1 error" in run.stdout
    assert "ERROR test_mixed.py::test_skipped_by_a_marker" in run.stdout
    assert "FAILED test_mixed.py::test_skipped_inside" in run.stdout
    assert "PASSED test_mixed.py::test_passes" in run.stdout
    assert "Skipped: needs torch" in run.stdout and "Skipped: no vllm here" in run.stdout


def test_with_the_plugin_a_module_skipped_at_collection_fails(mixed: Path) -> None:
    (mixed / "test_module_skip.py").write_text(MODULE_SKIP)
    assert pytest_in(mixed, "-k", "passes").returncode == 0
    run = pytest_in(mixed, "-p", "no_skips", "-k", "passes")
    assert run.returncode != 0, run.stdout
    assert "ERROR test_module_skip.py" in run.stdout
    assert "could not import 'xconnector_no_such_module'" in run.stdout
