"""A pytest plugin (`-p no_skips`, with tests/ on the path) that turns every skip into a failure.

scripts/test.sh loads it for the pass in .venv-vllm: there every selected test exists to run
(torch and vLLM are installed for it), so a skip means the environment lost what the test needs,
and it must not leave the suite green. A skipped test fails with its skip reason; a module
skipped while being collected (`pytest.importorskip` at module level) is a collection error.
Expected failures (`xfail`) are left as they are."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

PREFIX = "skipped in a pass where every test must run (scripts/test.sh, -p no_skips)"


def _reason(longrepr: Any) -> str:
    # A skip's longrepr is (path, line, "Skipped: reason").
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return f"{longrepr[0]}:{longrepr[1]}: {longrepr[2]}"
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[Any]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"{PREFIX}: {_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[Any]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{PREFIX}: {_reason(report.longrepr)}"
