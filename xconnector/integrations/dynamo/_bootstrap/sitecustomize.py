"""Python imports this at startup in processes run by `xconnector-run`: it loads the autopatch,
then the `sitecustomize` that would have run otherwise (if any), as ddtrace-run does."""

import os
import sys

try:
    import xconnector.integrations.dynamo.autopatch  # noqa: F401
except Exception as error:  # only a strict-mode configuration error gets here
    print(f"xconnector-run: {error}", file=sys.stderr)
    raise SystemExit(1) from error

_here = os.path.dirname(os.path.abspath(__file__))
_ours = sys.modules.pop("sitecustomize", None)
_saved = list(sys.path)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
try:
    import sitecustomize  # type: ignore[import-not-found]  # noqa: F401  (the next one, if any)
except ImportError:
    pass
finally:
    sys.path[:] = _saved
    if "sitecustomize" not in sys.modules and _ours is not None:
        sys.modules["sitecustomize"] = _ours
