"""Puts XConnector into a worker process: reads the config and, in a worker, patches the KV
methods of the configured worker classes (Dynamo-era `recv_kv_caches`/`send_kv_caches`) and of
vLLM v0's KV connectors whenever their modules are imported, and gives vLLM v1 engines
XConnector's KV connector (`integrations.vllm.engine_config`).

Import order does not matter (`xconnector.patching`'s post-import and class-definition hooks);
Dynamo's `@service` wrapper is unwrapped (`.inner`); nothing is wrapped twice; `unpatch()` puts
back exactly what was there.
"""

from __future__ import annotations

import logging
import os
import sys

from xconnector import patching, switches
from xconnector.exceptions import ConfigError

# Imports kept light on purpose: Dynamo runs this in every process it starts, and only worker
# processes need more than config discovery (the rest is imported when patching starts).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from types import ModuleType
    from typing import Any

    from xconnector.integrations.dynamo.worker_wrapper import SdkProvider

log = logging.getLogger("xconnector.autopatch")

#: (receive, send) method names: Dynamo-style workers, and vLLM v0 KV connectors.
WORKER_METHODS = ("recv_kv_caches", "send_kv_caches")
V0_CONNECTOR_METHODS = ("recv_kv_caches_and_hidden_states", "send_kv_caches_and_hidden_states")
V0_CONNECTOR_MODULE = "vllm.distributed.kv_transfer.kv_connector.base"

_installed = False


def _patch_method(owner: type, name: str, make: Callable[..., Any], get_sdk: SdkProvider) -> bool:
    import inspect

    current = inspect.getattr_static(owner, name, patching.MISSING)
    if current is patching.MISSING:
        return False
    if patching.is_wrapper(current):
        return True  # patched already (here or on a base class)
    if not inspect.isfunction(current):
        log.info("XConnector: %s.%s is not a plain method; left alone", owner.__qualname__, name)
        return False
    patching.replace(owner, name, make(current, get_sdk))
    return True


def patch_class(
    cls: type,
    methods: tuple[str, str] = WORKER_METHODS,
    get_sdk: SdkProvider | None = None,
) -> bool:
    """Wraps `cls`'s receive and send methods; False (and one info line) if it has neither.
    `get_sdk` defaults to the process-wide SDK (`xconnector.sdk.process`)."""
    from xconnector.integrations.dynamo.worker_wrapper import make_recv_wrapper, make_send_wrapper
    from xconnector.sdk import process

    provider = get_sdk or process.get_sdk
    recv, send = methods
    with patching.lock:
        a = _patch_method(cls, recv, make_recv_wrapper, provider)
        b = _patch_method(cls, send, make_send_wrapper, provider)
    if not (a or b):
        log.info(
            "XConnector: %s has no %s/%s methods, so there is nothing to patch there",
            cls.__qualname__,
            recv,
            send,
        )
    return a or b


def _resolve(module: ModuleType, qualname: str) -> type | None:
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    inner = getattr(obj, "inner", None)  # Dynamo's @service keeps the class as .inner
    if not isinstance(obj, type) and isinstance(inner, type):
        return inner
    return obj if isinstance(obj, type) else None


def _target_hook(target: str) -> tuple[str, Callable[[ModuleType], None]]:
    module_name, qualname = target.split(":", 1)

    def hook(module: ModuleType) -> None:
        cls = _resolve(module, qualname)
        if cls is None:
            log.info("XConnector: %s has no class %s; nothing patched", module_name, qualname)
            return
        if patch_class(cls):
            log.info("XConnector: patched %s", target)

    return module_name, hook


def _class_hook(target: str) -> Callable[[type], None]:
    def hook(cls: type) -> None:
        if patch_class(cls):
            log.info("XConnector: patched %s", target)

    return hook


def _v0_connector_hook(module: ModuleType) -> None:
    """Patches every subclass of vLLM v0's KVConnectorBase, now and when defined later."""
    found = getattr(module, "KVConnectorBase", None)
    if not isinstance(found, type):
        return
    base: type = found

    def patch_tree(cls: type) -> None:
        if cls is not base and any(m in cls.__dict__ for m in V0_CONNECTOR_METHODS):
            patch_class(cls, V0_CONNECTOR_METHODS)
        sub: type
        for sub in cls.__subclasses__():
            patch_tree(sub)

    patch_tree(base)
    original = base.__dict__.get("__init_subclass__", patching.MISSING)

    def __init_subclass__(cls: Any, /, **kwargs: Any) -> None:
        if original is not patching.MISSING:
            original.__func__(cls, **kwargs)
        else:
            super(base, cls).__init_subclass__(**kwargs)  # type: ignore[arg-type]
        try:
            if any(m in cls.__dict__ for m in V0_CONNECTOR_METHODS):
                patch_class(cls, V0_CONNECTOR_METHODS)
        except Exception as e:
            log.error("XConnector could not patch %s: %s", cls.__qualname__, e)

    setattr(__init_subclass__, patching.MARK, True)
    patching.replace(base, "__init_subclass__", classmethod(__init_subclass__))


def install(environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> bool:
    """Reads the config and, in a worker process, patches the targets. True when patching is in
    place. Never raises, except a configuration error with `integration.strict: true` (or
    `XCONNECTOR_STRICT=1`)."""
    global _installed
    env = os.environ if environ is None else environ
    args = sys.argv if argv is None else argv
    strict = switches.strict(env)
    with patching.lock:
        if _installed:
            return True
        try:
            from xconnector._loader import load_native

            native = load_native()
            wanted = {k: env[k] for k in native.config_env_vars() if k in env}
            found = native.config_discover(wanted, list(args))
            config = found["config"]
            strict = strict or config["integration"]["strict"]
            if found["section"] is None or not config["enabled"]:
                log.debug("XConnector is off (config source: %s)", found["source"])
                return False
            service = found["service"]
            services = config["integration"]["services"]
            if service is not None and service not in services:
                log.debug("XConnector: service %s not in %s; nothing patched", service, services)
                return False
            # A listed service's worker: what only this machine can tell (disk directory, auth
            # key variable, Redis), once, before the first request. Other processes that import
            # the graph (supervisor, frontend) stay cheap.
            from xconnector.config.discovery import check_this_machine

            if service is not None and not check_this_machine(config, strict=strict):
                return False
            # A worker process: from here on, the full SDK.
            from xconnector.config.discovery import DetectedConfig
            from xconnector.integrations.vllm import engine_config
            from xconnector.sdk import process

            detected = DetectedConfig.from_native(found)
            process.configure(detected.config)
            for target in detected.config.integration.targets:
                module_name, qualname = target.split(":", 1)
                loading = sys.modules.get(module_name)
                if (
                    loading is not None
                    and patching.initializing(loading)
                    and _resolve(loading, qualname) is None
                ):
                    patching.when_class_defined(module_name, qualname, _class_hook(target))
                else:
                    patching.when_imported(*_target_hook(target))
            patching.when_imported(V0_CONNECTOR_MODULE, _v0_connector_hook)
            patching.when_imported(engine_config.MODULE, engine_config.hook)
            _installed = True
            targets = ", ".join(detected.config.integration.targets)
            log.info("XConnector %s; watching %s", detected.describe(), targets)
            return True
        except ConfigError as e:
            if strict or getattr(e, "strict", False):
                raise
            log.error("XConnector is off, the worker runs without it: %s", e)
            return False
        except Exception as e:
            if strict:
                raise ConfigError(f"XConnector could not start: {e}") from e
            log.error("XConnector is off, the worker runs without it: %s", e)
            return False


def unpatch() -> None:
    """Restores every patched attribute exactly and removes the import hooks."""
    global _installed
    with patching.lock:
        patching.restore_all()
        process = sys.modules.get("xconnector.sdk.process")
        if process is not None:
            process.configure(None)
        _installed = False


patched = patching.patched
