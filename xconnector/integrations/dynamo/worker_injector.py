"""Finds the worker classes and patches their KV methods, whenever their modules are imported.

A `sys.meta_path` finder wraps the loader of each watched module and patches the module right
after it executes (wrapt's post-import hooks), so the import line may come before or after the
worker's imports. Targets already imported are patched at once. Dynamo's `@service` wrapper is
unwrapped (`.inner`). Wrappers are marked, so nothing is wrapped twice; `unpatch()` puts back
exactly what was there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import threading

from xconnector.sdk.exceptions import ConfigError

# Imports kept light on purpose: Dynamo runs this in every process it starts, and only worker
# processes need more than config discovery (the rest is imported when patching starts).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import importlib.machinery
    from collections.abc import Callable, Mapping, Sequence
    from types import ModuleType
    from typing import Any

    from xconnector.integrations.dynamo.worker_wrapper import SdkProvider

log = logging.getLogger("xconnector.autopatch")

#: (receive, send) method names: Dynamo-style workers, and vLLM v0 KV connectors.
WORKER_METHODS = ("recv_kv_caches", "send_kv_caches")
V0_CONNECTOR_METHODS = ("recv_kv_caches_and_hidden_states", "send_kv_caches_and_hidden_states")
V0_CONNECTOR_MODULE = "vllm.distributed.kv_transfer.kv_connector.base"
V1_ENGINE_ARGS_MODULE = "vllm.engine.arg_utils"
V1_CONNECTOR = "XConnectorV1"
V1_CONNECTOR_MODULE = "xconnector.integrations.vllm.connector"

_MISSING = object()
_lock = threading.RLock()
_installed = False
# (owner, attribute, what its __dict__ held before, or _MISSING)
_patches: list[tuple[type, str, Any]] = []
_finder: _PostImportFinder | None = None


class _HookedLoader:
    """Runs the real loader, then the hooks; a hook that fails is logged, never raised."""

    def __init__(self, loader: Any, hooks: list[Callable[[ModuleType], None]]) -> None:
        self._loader = loader
        self._hooks = hooks

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for hook in self._hooks:
            try:
                hook(module)
            except Exception as e:  # the host's import must succeed whatever happens here
                log.error("XConnector could not patch %s: %s", module.__name__, e)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _PostImportFinder:
    def __init__(self) -> None:
        self.hooks: dict[str, list[Callable[[ModuleType], None]]] = {}
        self._busy: set[str] = set()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        hooks = self.hooks.get(fullname)
        if not hooks or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders, not this one again
        except Exception:
            return None
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _HookedLoader(spec.loader, list(hooks))  # type: ignore[assignment]
        return spec


def _when_imported(module: str, hook: Callable[[ModuleType], None]) -> None:
    """Runs `hook(module)` now if `module` is imported, else right after it is."""
    global _finder
    loaded = sys.modules.get(module)
    if loaded is not None:
        try:
            hook(loaded)
        except Exception as e:
            log.error("XConnector could not patch %s: %s", module, e)
        return
    if _finder is None:
        _finder = _PostImportFinder()
        sys.meta_path.insert(0, _finder)
    _finder.hooks.setdefault(module, []).append(hook)


# Targets whose module was still executing when the autopatch ran: the import line is the
# first line of the worker module itself (DESIGN's usage), so the class does not exist yet. The
# class statement goes through `builtins.__build_class__`; wrapping it while such targets are
# pending patches the class the moment it is created, before any decorator (Dynamo's
# `@service`) wraps it. The wrapper is removed when nothing is pending.
_pending_classes: dict[tuple[str, str], Callable[[type], None]] = {}
_original_build_class: Any = None


def _build_class(func: Any, name: str, *bases: Any, **kwargs: Any) -> Any:
    cls = _original_build_class(func, name, *bases, **kwargs)
    try:
        hook = _pending_classes.pop(
            (getattr(cls, "__module__", ""), getattr(cls, "__qualname__", "")), None
        )
        if hook is not None:
            hook(cls)
        if not _pending_classes:
            _restore_build_class()
    except Exception as e:  # the host's class statement must succeed whatever happens here
        log.error("XConnector could not patch %s: %s", name, e)
    return cls


def _restore_build_class() -> None:
    global _original_build_class
    import builtins

    if _original_build_class is not None:
        builtins.__build_class__ = _original_build_class
        _original_build_class = None


def _when_class_defined(module: str, qualname: str, hook: Callable[[type], None]) -> None:
    global _original_build_class
    import builtins

    _pending_classes[(module, qualname)] = hook
    if _original_build_class is None:
        _original_build_class = builtins.__build_class__
        builtins.__build_class__ = _build_class  # type: ignore[assignment]


def _initializing(module: ModuleType) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _patch_method(owner: type, name: str, make: Callable[..., Any], get_sdk: SdkProvider) -> bool:
    import inspect

    from xconnector.integrations.dynamo.worker_wrapper import is_wrapper

    current = inspect.getattr_static(owner, name, _MISSING)
    if current is _MISSING:
        return False
    if is_wrapper(current):
        return True  # patched already (here or on a base class)
    if not inspect.isfunction(current):
        log.info("XConnector: %s.%s is not a plain method; left alone", owner.__qualname__, name)
        return False
    _patches.append((owner, name, owner.__dict__.get(name, _MISSING)))
    setattr(owner, name, make(current, get_sdk))
    return True


def patch_class(
    cls: type,
    methods: tuple[str, str] = WORKER_METHODS,
    get_sdk: SdkProvider | None = None,
) -> bool:
    """Wraps `cls`'s receive and send methods; False (and one info line) if it has neither.
    `get_sdk` defaults to the process-wide SDK of `minimal_sdk`."""
    from xconnector.integrations.dynamo import minimal_sdk
    from xconnector.integrations.dynamo.worker_wrapper import make_recv_wrapper, make_send_wrapper

    provider = get_sdk or minimal_sdk.get_sdk
    recv, send = methods
    with _lock:
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
    original = base.__dict__.get("__init_subclass__", _MISSING)

    def __init_subclass__(cls: Any, /, **kwargs: Any) -> None:
        if original is not _MISSING:
            original.__func__(cls, **kwargs)
        else:
            super(base, cls).__init_subclass__(**kwargs)  # type: ignore[arg-type]
        try:
            if any(m in cls.__dict__ for m in V0_CONNECTOR_METHODS):
                patch_class(cls, V0_CONNECTOR_METHODS)
        except Exception as e:
            log.error("XConnector could not patch %s: %s", cls.__qualname__, e)

    from xconnector.integrations.dynamo.worker_wrapper import MARK

    setattr(__init_subclass__, MARK, True)
    with _lock:
        _patches.append((base, "__init_subclass__", original))
        base.__init_subclass__ = classmethod(__init_subclass__)  # type: ignore[assignment]


#: Where an inline `remote_auth_key` travels to vLLM's engine processes (they inherit the
#: environment), instead of inside vLLM's config, which vLLM may print.
AUTH_KEY_ENV = "XCONNECTOR_REDIS_AUTH_KEY"


def _without_inline_secrets(section: dict[str, Any]) -> dict[str, Any]:
    """`section` with an inline `remote_auth_key` moved into this process's environment
    (`AUTH_KEY_ENV`) and named by `remote_auth_key_env`."""
    adapters = section.get("adapters")
    if not isinstance(adapters, list):
        return section
    out = []
    for a in adapters:
        cfg = a.get("config") if isinstance(a, dict) else None
        if isinstance(cfg, dict) and isinstance(cfg.get("remote_auth_key"), str):
            cfg = {k: v for k, v in cfg.items() if k != "remote_auth_key"}
            os.environ[AUTH_KEY_ENV] = a["config"]["remote_auth_key"]
            cfg["remote_auth_key_env"] = AUTH_KEY_ENV
            a = {**a, "config": cfg}
        out.append(a)
    return {**section, "adapters": out}


def v1_transfer_config(existing: Any, section: dict[str, Any]) -> dict[str, Any] | None:
    """The `kv_transfer_config` an engine should run with: XConnector's connector when it has
    none, vLLM's MultiConnector over its own connector (first: it serves P/D transfers) and
    XConnector's when it has one; None when XConnector is in it already."""
    ours = {
        "kv_connector": V1_CONNECTOR,
        "kv_connector_module_path": V1_CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"xconnector": _without_inline_secrets(section)},
    }
    if existing is None:
        return {**ours, "kv_load_failure_policy": "recompute"}
    current = existing if isinstance(existing, dict) else _as_dict(existing)
    if current.get("kv_connector") is None:
        return {**ours, "kv_load_failure_policy": "recompute"}
    children = current.get("kv_connector_extra_config", {}).get("connectors", [])
    names = [current.get("kv_connector"), *(c.get("kv_connector") for c in children)]
    if V1_CONNECTOR in names:
        return None
    inner = {k: v for k, v in current.items() if k in _CHILD_KEYS and v is not None}
    return {
        "kv_connector": "MultiConnector",
        "kv_role": current.get("kv_role") or "kv_both",
        "kv_load_failure_policy": current.get("kv_load_failure_policy") or "recompute",
        "kv_connector_extra_config": {"connectors": [inner, ours]},
    }


_CHILD_KEYS = (
    "kv_connector",
    "kv_connector_module_path",
    "kv_role",
    "kv_rank",
    "kv_parallel_size",
    "kv_ip",
    "kv_port",
    "kv_buffer_device",
    "kv_buffer_size",
    "kv_connector_extra_config",
)


def _as_dict(config: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return dict(vars(config))


def _v1_engine_args_hook(module: ModuleType) -> None:
    """vLLM v1: give every engine XConnector's KV connector (DESIGN 3.2, item 3)."""
    engine_args = getattr(module, "EngineArgs", None)
    if not isinstance(engine_args, type) or not hasattr(engine_args, "create_engine_config"):
        return
    from xconnector.integrations.dynamo import minimal_sdk
    from xconnector.integrations.dynamo.worker_wrapper import MARK, is_wrapper

    original = engine_args.__dict__.get("create_engine_config")
    if original is None or is_wrapper(original):
        return

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            config = minimal_sdk.configured()
            if config is not None:
                wanted = v1_transfer_config(
                    getattr(self, "kv_transfer_config", None), config.to_dict()
                )
                if wanted is not None:
                    from vllm.config import KVTransferConfig

                    self.kv_transfer_config = KVTransferConfig(**wanted)
                    log.info("XConnector: engine KV connector %s", wanted["kv_connector"])
        except Exception as e:  # the engine starts as the user configured it
            log.error("XConnector could not add its KV connector: %s", e)
        return original(self, *args, **kwargs)

    create_engine_config.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(create_engine_config, MARK, True)
    with _lock:
        _patches.append((engine_args, "create_engine_config", original))
        engine_args.create_engine_config = create_engine_config


def service_name(environ: Mapping[str, str], argv: Sequence[str]) -> str | None:
    """The Dynamo service this process runs: `--service-name` in argv (how `dynamo serve`
    starts components), else `XCONNECTOR_SERVICE`."""
    for i, arg in enumerate(argv):
        if arg == "--service-name" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--service-name="):
            return arg.split("=", 1)[1]
    return environ.get("XCONNECTOR_SERVICE") or None


def install(environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> bool:
    """Reads the config and, in a worker process, patches the targets. True when patching is in
    place. Never raises, except a configuration error with `integration.strict: true` (or
    `XCONNECTOR_STRICT=1`)."""
    global _installed
    env = os.environ if environ is None else environ
    args = sys.argv if argv is None else argv
    strict = env.get("XCONNECTOR_STRICT", "").strip().lower() in ("1", "true")
    with _lock:
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
            service = service_name(env, args)
            services = config["integration"]["services"]
            if service is not None and service not in services:
                log.debug("XConnector: service %s not in %s; nothing patched", service, services)
                return False
            # A worker process: from here on, the full SDK.
            from xconnector.integrations.dynamo import minimal_sdk
            from xconnector.integrations.dynamo.config_detector import _detected

            detected = _detected(found)
            minimal_sdk.configure(detected.config)
            for target in detected.config.integration.targets:
                module_name, qualname = target.split(":", 1)
                loading = sys.modules.get(module_name)
                if (
                    loading is not None
                    and _initializing(loading)
                    and _resolve(loading, qualname) is None
                ):
                    _when_class_defined(module_name, qualname, _class_hook(target))
                else:
                    _when_imported(*_target_hook(target))
            _when_imported(V0_CONNECTOR_MODULE, _v0_connector_hook)
            _when_imported(V1_ENGINE_ARGS_MODULE, _v1_engine_args_hook)
            _installed = True
            targets = ", ".join(detected.config.integration.targets)
            log.info("XConnector %s; watching %s", detected.describe(), targets)
            return True
        except ConfigError as e:
            if strict:
                raise
            log.error("XConnector is off, the worker runs without it: %s", e)
            return False
        except Exception as e:
            if strict:
                raise ConfigError(f"XConnector could not start: {e}") from e
            log.error("XConnector is off, the worker runs without it: %s", e)
            return False


def unpatch() -> None:
    """Restores every patched attribute exactly and removes the import hook."""
    global _installed, _finder
    with _lock:
        while _patches:
            owner, name, original = _patches.pop()
            if original is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(owner, name)
            else:
                setattr(owner, name, original)
        _pending_classes.clear()
        _restore_build_class()
        if _finder is not None:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(_finder)
            _finder = None
        minimal = sys.modules.get("xconnector.integrations.dynamo.minimal_sdk")
        if minimal is not None:
            minimal.configure(None)
        _installed = False


def patched() -> list[tuple[type, str]]:
    """What is patched now: (class, attribute)."""
    with _lock:
        return [(owner, name) for owner, name, _ in _patches]
