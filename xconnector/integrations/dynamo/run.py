"""`xconnector-run COMMAND [ARGS...]`: runs any Python program with the autopatch loaded first,
for entry points that cannot be edited (`xconnector-run python -m dynamo.vllm ...`), as
`ddtrace-run` does: a `sitecustomize` on `PYTHONPATH` imports the autopatch at interpreter start,
in the process and in every Python subprocess it starts."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

BOOTSTRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")

USAGE = """usage: xconnector-run COMMAND [ARGS...]

Runs COMMAND with XConnector's autopatch loaded in every Python process it starts.
The config comes from where a worker finds it (XCONNECTOR_CONFIG, DYNAMO_SERVICE_CONFIG,
DYN_DEPLOYMENT_CONFIG, -f/--config-file); XCONNECTOR_DISABLE=1 turns it off."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    args = args[1:] if args[:1] == ["--"] else args
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    paths = [BOOTSTRAP, *filter(None, [os.environ.get("PYTHONPATH")])]
    try:
        os.execvpe(args[0], args, {**os.environ, "PYTHONPATH": os.pathsep.join(paths)})
    except OSError as e:
        print(f"xconnector-run: cannot run {args[0]!r}: {e.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
