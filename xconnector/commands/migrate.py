"""`xconnector migrate-config OLD [-o NEW] [--force]`: the earlier prototype's config in the
current schema. The mapping is native (`xconnector_core::migrate`); this writes its YAML to NEW
(or stdout) and, on stderr, one line per key path for what changed or has no equivalent.
docs/migrating.md explains the differences."""

from __future__ import annotations

import argparse
import os
from typing import TextIO

from xconnector.exceptions import ConfigError, NativeModuleError

EXIT_OK, EXIT_USAGE = 0, 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("old", metavar="OLD", help="the prototype's config file")
    p.add_argument(
        "-o", "--output", metavar="NEW", default="-", help="where to write it (default: - , stdout)"
    )
    p.add_argument("--force", action="store_true", help="overwrite NEW if it exists")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from xconnector import native

    new: str = args.output
    if new != "-" and os.path.lexists(new) and not args.force:
        print(f"error: {new} exists; pass --force to overwrite it, or choose another -o", file=err)
        return EXIT_USAGE
    try:
        result = native().config_migrate(args.old)
    except (ConfigError, NativeModuleError) as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    notes = result["notes"]
    print(f"{args.old}: migrated to {result['section']}; {len(notes)} change(s):", file=err)
    for path, message in notes:
        print(f"  {path}: {message}", file=err)
    if new == "-":
        out.write(result["text"])
        return EXIT_OK
    try:
        with open(new, "w" if args.force else "x", encoding="utf-8") as f:
            f.write(result["text"])
    except OSError as e:
        print(f"error: cannot write {new}: {e.strerror or e}; choose another -o", file=err)
        return EXIT_USAGE
    print(f"wrote {new}; check it with: xconnector check-config {new}", file=err)
    return EXIT_OK
