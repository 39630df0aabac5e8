"""The `xconnector` command (also `python -m xconnector`).

`xconnector check-config FILE` prints the effective config, where each value came from, and
warnings for the ways a config breaks Dynamo. Exit codes: 0 valid, 1 invalid, 2 usage error
(including a file that does not exist or is a directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from xconnector.exceptions import ConfigError, NativeModuleError

if TYPE_CHECKING:
    from xconnector.config.discovery import DetectedConfig

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xconnector", description="XConnector: KV-cache connector for Dynamo and vLLM."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser(
        "check-config",
        help="validate a config and show the effective values and where they came from",
        description="Validate an XConnector config. With FILE: a Dynamo YAML (Common.xconnector), "
        "a file with an `xconnector:` key, or the section itself. Without FILE: the config "
        "this environment gives a worker (XCONNECTOR_CONFIG, DYNAMO_SERVICE_CONFIG, "
        "DYN_DEPLOYMENT_CONFIG).",
    )
    check.add_argument("file", nargs="?", metavar="FILE", help="YAML or JSON file to check")
    check.add_argument(
        "--service",
        metavar="NAME",
        help="Dynamo service whose own `xconnector` keys overlay Common's (e.g. VllmWorker)",
    )
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    check.epilog = (
        "After `--`, the worker's command line (e.g. `-- python -m dynamo.vllm --block-size "
        "32`): the settings that must fit its --block-size are checked against it."
    )
    stats = commands.add_parser(
        "stats",
        help="show what XConnector does in a running worker (its Prometheus endpoint)",
        description="Reads a worker's metrics endpoint (performance.metrics_port, or the worker's "
        "own /metrics) and prints hit rate, bytes, tiers and fallbacks.",
    )
    stats.add_argument(
        "url",
        nargs="?",
        default="http://127.0.0.1:9400/metrics",
        help="the metrics URL (default: %(default)s)",
    )
    commands.add_parser("version", help="versions of XConnector, its native module, vLLM, Dynamo")
    bench = commands.add_parser(
        "bench",
        help="replay a workload with shared prefixes and report hit rate, latency, bandwidth",
        description="Replays seeded chat, RAG and agent-loop traffic through the engine.",
    )
    from xconnector.commands.bench import add_arguments

    add_arguments(bench)
    from xconnector.commands import migrate

    migrate.add_arguments(
        commands.add_parser(
            "migrate-config",
            help="turn the earlier prototype's config into the current `xconnector:` section",
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `check-config FILE -- WORKER COMMAND`: the worker's command line is not ours to parse.
    worker = None
    if argv[:1] == ["check-config"] and "--" in argv:
        at = argv.index("--")
        argv, worker = argv[:at], argv[at + 1 :]
    args = parser.parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(
                args.file,
                service=args.service,
                as_json=args.json,
                strict=args.strict,
                worker=worker,
            )
        if args.command == "stats":
            from xconnector.commands import stats

            return stats.run(args.url, sys.stdout, sys.stderr)
        if args.command == "bench":
            from xconnector.commands import bench

            return bench.run(args, sys.stdout, sys.stderr)
        if args.command == "migrate-config":
            from xconnector.commands import migrate

            return migrate.run(args, sys.stdout, sys.stderr)
        if args.command == "version":
            from xconnector.commands import version

            return version.run(sys.stdout)
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly (Python's documented recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def check_config(
    path: str | None,
    *,
    service: str | None = None,
    as_json: bool = False,
    strict: bool = False,
    worker: Sequence[str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Validates like a worker starting does, then runs the checks only this machine can answer
    (disk directory, auth key variable, Redis). Exit 1 where the worker would not start with
    `integration.strict` (or `--strict`), or could not run XConnector at all."""
    out = out or sys.stdout
    err = err or sys.stderr
    from xconnector.config import discovery as config_detector

    try:
        if path is None:
            # What the worker's discovery reads: its command line (its --block-size too).
            argv = ["xconnector", *(worker or [])]
            argv += ["--service-name", service] if service else []
            found = config_detector.detect_config(argv=argv)
        else:
            found = config_detector.load_config_file(path, service=service, argv=worker)
    except ConfigError as e:
        code = EXIT_USAGE if path is not None and not os.path.isfile(path) else EXIT_INVALID
        if as_json:
            print(json.dumps({"valid": False, "error": str(e)}, indent=2), file=out)
        else:
            print(f"error: {e}", file=err)
        return code
    except NativeModuleError as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE

    problems: list[tuple[str, bool]] = []
    if found.found and found.enabled:
        from xconnector import native

        problems = native().config_runtime_problems(found.config.to_dict())
    from xconnector import switches

    strict_here = strict or found.config.integration.strict or switches.strict(os.environ)
    stops = any(fatal for _, fatal in problems) or (bool(problems) and strict_here)
    if as_json:
        doc = {
            "valid": True,
            "runs_here": not stops,
            "runtime_problems": [{"message": m, "fatal": f} for m, f in problems],
            "enabled": found.enabled,
            "source": found.source,
            "section": found.section,
            "config": _shown(found.config.to_dict()),
            "origins": found.origins,
            "warnings": found.warnings,
        }
        print(json.dumps(doc, indent=2), file=out)
    else:
        _print_report(found, out)
        if problems:
            print(f"\non this machine ({len(problems)}):", file=out)
            for message, fatal in problems:
                print(f"  - {'error' if fatal else 'warning'}: {message}", file=out)
    if stops:
        return EXIT_INVALID
    return EXIT_INVALID if strict and found.warnings else EXIT_OK


def _shown(value: Any, key: str = "") -> Any:
    """`value` without secrets (URL passwords, auth keys): check-config output is pasted into
    tickets and chat."""
    from xconnector import native

    return native().config_redact(value, key)


def _print_report(found: DetectedConfig, out: TextIO) -> None:
    if found.found:
        state = "enabled" if found.enabled else "disabled (enabled: false)"
        print(f"{found.source}: valid; XConnector is {state} (read from {found.section})", file=out)
    elif found.source == "none":
        print("no XConnector config found in this environment; XConnector stays off", file=out)
    else:
        print(
            f"{found.source}: no xconnector section; XConnector stays off. To turn it on, add "
            "`xconnector: {enabled: true}` under `Common:`",
            file=out,
        )
    if found.found:
        rows = [
            (k, json.dumps(_shown(found.values[k], k)), origin)
            for k, origin in found.origins.items()
        ]
        kw = max(len(r[0]) for r in rows)
        vw = min(max(len(r[1]) for r in rows), 40)
        print("\neffective configuration (key, value, where it was set):", file=out)
        for key, value, origin in rows:
            print(f"  {key:<{kw}}  {value:<{vw}}  {origin}", file=out)
    if found.warnings:
        print(f"\nwarnings ({len(found.warnings)}):", file=out)
        for w in found.warnings:
            print(f"  - {w}", file=out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
