"""Puts XConnector into a worker process: reads the config and, in a worker, patches the KV
methods of the configured worker classes and of vLLM v0's KV connectors whenever they are
imported, and gives vLLM v1 engines XConnector's KV connector (`integrations.vllm.engine_config`).
`@service` wrappers are unwrapped (`.inner`); `unpatch()` puts back exactly what was there.
"""

from __future__ import annotations

import logging
import os
import sys

from xconnector import patching, switches
from xconnector.exceptions import ConfigError

# Imports kept light: Dynamo runs this in every process it starts; only workers need the rest.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import ModuleType
    from typing import Any

    from xconnector.integrations.dynamo.worker_wrapper import SdkProvider

log = logging.getLogger("xconnector.autopatch")

#: (receive, send) method names: Dynamo-style workers, and vLLM v0 KV connectors.
WORKER_METHODS = ("recv_kv_caches", "send_kv_caches")
V0_CONNECTOR_METHODS = ("recv_kv_caches_and_hidden_states", "send_kv_caches_and_hidden_states")
V0_CONNECTOR_MODULE = "vllm.distributed.kv_transfer.kv_connector.base"

_installed = False


def patch_class(
    cls: type, methods: tuple[str, str] = WORKER_METHODS, get_sdk: SdkProvider | None = None
) -> bool:
    """Wraps `cls`'s receive and send methods; False (and one info line) if it has neither.
    `get_sdk` defaults to the process-wide SDK (`xconnector.sdk.process`)."""
    import inspect

    from xconnector.integrations.dynamo.worker_wrapper import make_recv_wrapper, make_send_wrapper
    from xconnector.sdk import process

    who, found = cls.__qualname__, False
    with patching.lock:
        for name, make in zip(methods, (make_recv_wrapper, make_send_wrapper), strict=True):
            current = inspect.getattr_static(cls, name, None)
            if patching.is_wrapper(current):
                found = True  # patched already, here or on a base class
            elif inspect.isfunction(current):
                patching.replace(cls, name, make(current, get_sdk or process.get_sdk))
                found = True
            elif current is not None:
                log.info("XConnector: %s.%s is not a plain method; left alone", who, name)
    if not found:
        what = "/".join(methods)
        log.info("XConnector: %s has no %s methods, so there is nothing to patch there", who, what)
    return found


def _resolve(module: ModuleType, qualname: str) -> type | None:
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        obj = getattr(obj, "inner", None)  # Dynamo's @service keeps the class as .inner
    return obj if isinstance(obj, type) else None


def _watch(target: str) -> None:
    """Patches the class `target` (`module:QualName`) now, when its module is imported, or, when
    that module is still executing (the import line is its own), when the class is defined."""
    module_name, qualname = target.split(":", 1)

    def patch(cls: type | None) -> None:
        if cls is None:
            log.info("XConnector: %s has no class %s; nothing patched", module_name, qualname)
        elif patch_class(cls):
            log.info("XConnector: patched %s", target)

    loading = sys.modules.get(module_name)
    if loading and patching.initializing(loading) and _resolve(loading, qualname) is None:
        patching.when_class_defined(module_name, qualname, patch)
    else:
        patching.when_imported(module_name, lambda module: patch(_resolve(module, qualname)))


def _v0_connector_hook(module: ModuleType) -> None:
    """Patches every subclass of vLLM v0's KVConnectorBase, now and when defined later."""
    found = getattr(module, "KVConnectorBase", None)
    if not isinstance(found, type):
        return
    base: type = found

    def patch(cls: type) -> None:
        if any(m in cls.__dict__ for m in V0_CONNECTOR_METHODS):
            patch_class(cls, V0_CONNECTOR_METHODS)

    todo: list[type] = base.__subclasses__()
    while todo:
        cls = todo.pop()
        patch(cls)
        todo += cls.__subclasses__()
    original = base.__dict__.get("__init_subclass__")

    def __init_subclass__(cls: Any, /, **kwargs: Any) -> None:
        if original is None:
            super(base, cls).__init_subclass__(**kwargs)  # type: ignore[arg-type]
        else:
            original.__func__(cls, **kwargs)
        patching.call_hook(patch, cls, cls.__qualname__)

    setattr(__init_subclass__, patching.MARK, True)
    patching.replace(base, "__init_subclass__", classmethod(__init_subclass__))


def install(environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> bool:
    """Reads the config and, in a worker process, patches the targets. True when patching is in
    place. Never raises, except a configuration error with `integration.strict: true` (or
    `XCONNECTOR_STRICT=1`)."""
    global _installed
    env = os.environ if environ is None else environ
    strict = switches.strict(env)
    with patching.lock:
        if _installed:
            return True
        try:
            from xconnector._loader import load_native

            native = load_native()
            wanted = {k: env[k] for k in native.config_env_vars() if k in env}
            found = native.config_discover(wanted, list(sys.argv if argv is None else argv))
            strict = strict or found["config"]["integration"]["strict"]
            # Off, another Dynamo service (supervisor, frontend: kept cheap), or a listed
            # service's worker this machine cannot run XConnector in (checked once, natively).
            where = (found["section"] is not None, found["source"], found["service"], strict)
            if not native.config_worker_patches(found["config"], *where):
                return False
            # A worker process: from here on, the full SDK.
            from xconnector.config.discovery import DetectedConfig
            from xconnector.integrations.vllm import engine_config
            from xconnector.sdk import process

            detected = DetectedConfig.from_native(found)
            process.configure(detected.config)
            for target in detected.config.integration.targets:
                _watch(target)
            patching.when_imported(V0_CONNECTOR_MODULE, _v0_connector_hook)
            patching.when_imported(engine_config.MODULE, engine_config.hook)
            _installed = True
            targets = ", ".join(detected.config.integration.targets)
            log.info("XConnector %s; watching %s", detected.describe(), targets)
            return True
        except Exception as e:
            if not (strict or getattr(e, "strict", False)):
                log.error("XConnector is off, the worker runs without it: %s", e)
                return False
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"XConnector could not start: {e}") from e


def unpatch() -> None:
    """Restores every patched attribute exactly and removes the import hooks."""
    global _installed
    with patching.lock:
        patching.restore_all()
        process = sys.modules.get("xconnector.sdk.process")
        if process is not None:
            process.configure(None)
        _installed = False
