"""Generic patching machinery: post-import hooks, class-definition hooks, and a registry of
replaced attributes that `restore_all()` puts back exactly.

A `sys.meta_path` finder wraps the loader of each watched module and runs the hooks right after
the module executes (wrapt's post-import hooks); a module already imported is hooked at once.
Wrappers carry `MARK`, so nothing is wrapped twice (dd-trace-py's `_datadog_patch`). A hook that
fails is logged, never raised: the host's import must succeed whatever happens here.
Standard library only; nothing here knows about Dynamo or vLLM.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.util
import logging
import sys
import threading

TYPE_CHECKING = False  # see xconnector/__init__.py
if TYPE_CHECKING:
    import importlib.machinery
    from collections.abc import Callable, Sequence
    from types import ModuleType
    from typing import Any

log = logging.getLogger("xconnector.autopatch")

#: Set on every wrapper XConnector installs.
MARK = "_xconnector_patch"
MISSING: Any = object()

lock = threading.RLock()
# (owner, attribute, what its __dict__ held before, or MISSING), in patching order.
_patches: list[tuple[type, str, Any]] = []
_hooks: dict[str, list[Callable[[ModuleType], None]]] = {}  # by module name, until restore_all
_finder: _PostImportFinder | None = None


def is_wrapper(fn: Any) -> bool:
    return bool(getattr(fn, MARK, False))


def replace(owner: type, name: str, new: Any) -> None:
    """Sets `owner.name = new`, remembering what `owner.__dict__` held for `restore_all()`."""
    with lock:
        _patches.append((owner, name, owner.__dict__.get(name, MISSING)))
        setattr(owner, name, new)


def call_hook(hook: Callable[[Any], None], arg: Any, what: str) -> None:
    """`hook(arg)`, its failure logged: the host's import or class statement must succeed."""
    try:
        hook(arg)
    except Exception as e:
        log.error("XConnector could not patch %s: %s", what, e)


class _HookedLoader:
    """The real loader (every other attribute is its), then the module's hooks."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader, self._name = loader, name

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for hook in list(_hooks.get(self._name, ())):
            call_hook(hook, module, self._name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _PostImportFinder:
    def __init__(self) -> None:
        self._busy: set[str] = set()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _hooks or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders, not this one again
        except Exception:
            return None
        finally:
            self._busy.discard(fullname)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookedLoader(spec.loader, fullname)  # type: ignore[assignment]
        return spec


def when_imported(module: str, hook: Callable[[ModuleType], None]) -> None:
    """Runs `hook(module)` now if `module` is imported, else right after it is."""
    global _finder
    loaded = sys.modules.get(module)
    if loaded is not None:
        call_hook(hook, loaded, module)
        return
    with lock:
        _hooks.setdefault(module, []).append(hook)
        if _finder is None:
            _finder = _PostImportFinder()
            sys.meta_path.insert(0, _finder)


def initializing(module: ModuleType | None) -> bool:
    """`module` is still executing (the import line is in the module itself)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


# Classes awaited in modules still executing: the autopatch's import line may be the first line
# of the worker module itself, so the class does not exist yet. Class statements go through
# `builtins.__build_class__`; wrapping it while classes are awaited hooks the class the moment it
# is created, before any decorator (Dynamo's `@service`) wraps it. The wrapper removes itself
# when nothing is awaited, including at the first class statement after an awaited module
# finished without defining its class.
_awaited: dict[tuple[str, str], Callable[[type], None]] = {}
_original_build_class: Any = None


def _wrap_build_class(original: Any) -> Any:
    """`__build_class__` that runs the awaited hooks; it calls the `original` it was made with,
    so a class statement racing the wrapper's removal in another thread still works."""

    def build_class(func: Any, name: str, *bases: Any, **kwargs: Any) -> Any:
        cls = original(func, name, *bases, **kwargs)
        with lock:
            key = (getattr(cls, "__module__", ""), getattr(cls, "__qualname__", ""))
            hook = _awaited.pop(key, None)
            for done in [k for k in _awaited if not initializing(sys.modules.get(k[0]))]:
                del _awaited[done]  # its module finished (or is gone) without that class
            if not _awaited:
                _restore_build_class()
        if hook is not None:
            call_hook(hook, cls, name)
        return cls

    return build_class


def _restore_build_class() -> None:
    global _original_build_class
    if _original_build_class is not None:
        builtins.__build_class__ = _original_build_class
        _original_build_class = None


def when_class_defined(module: str, qualname: str, hook: Callable[[type], None]) -> None:
    """Runs `hook(cls)` when the executing `module` defines class `qualname`."""
    global _original_build_class
    with lock:
        _awaited[(module, qualname)] = hook
        if _original_build_class is None:
            _original_build_class = builtins.__build_class__
            builtins.__build_class__ = _wrap_build_class(_original_build_class)


def restore_all() -> None:
    """Puts back every replaced attribute exactly, and removes the import and class hooks."""
    global _finder
    with lock:
        while _patches:
            owner, name, original = _patches.pop()
            if original is MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(owner, name)
            else:
                setattr(owner, name, original)
        _awaited.clear()
        _restore_build_class()
        _hooks.clear()
        if _finder is not None:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(_finder)
            _finder = None
