"""Wrappers for a worker's KV methods, with the vLLM-v0 connector shapes (DESIGN 3.2):
`recv(model_executable, model_input, kv_caches) -> (hidden_or_None, bypass, model_input)` and
`send(model_executable, model_input, kv_caches, hidden_or_intermediate_states) -> None`.

Receive: XConnector loads the cached prefixes, then the original runs on the batch rebuilt to
cover only the uncached rest. Send: the original runs, then XConnector stores the new blocks.
Sentry's rule: XConnector's bookkeeping runs inside `_guard`, which swallows and counts its
errors (logged once per kind); the host's call runs outside it, exactly once, and its exceptions
propagate unchanged. A sync method gets a sync wrapper, a coroutine function an async one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

from xconnector._native import SdkStats
from xconnector.integrations.dynamo.worker_injector import WORKER_METHODS
from xconnector.patching import MARK, is_wrapper
from xconnector.sdk.xconnector_sdk import XConnectorSDK

log = logging.getLogger("xconnector.autopatch")

SdkProvider = Callable[[], "XConnectorSDK | None"]
_Args = tuple[tuple[Any, ...], dict[str, Any]]
_ROLES = ("model_executable", "model_input", "kv_caches", "hidden_or_intermediate_states")
_errors = SdkStats()  # native: counts by kind, thread-safe, the first of each reported once
#: `errors()`: the errors the guard swallowed, by kind (`receive`, `send`).
errors = _errors.counters


@contextlib.contextmanager
def _guard(kind: str, sdk: XConnectorSDK) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        first = _errors.count(kind) == 1
        sdk.get_monitoring_handler().fallback(f"wrapper_{kind}")
        say = log.warning if first else log.debug
        say("XConnector %s failed (%s: %s); the worker's own path ran", kind, type(e).__name__, e)


def _wrap(original: Callable[..., Any], get_sdk: SdkProvider, kind: str) -> Callable[..., Any]:
    """XConnector's part runs before the original (`receive`) or after it (`send`), in a thread
    when the original is a coroutine function."""
    sig = inspect.signature(original)
    receive = kind == "receive"
    # Each role's parameter: by name, else by position (user code may name them differently).
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p.name for p in sig.parameters.values() if p.name != "self" and p.kind in kinds]
    names = [
        r if r in sig.parameters or i >= len(params) else params[i] for i, r in enumerate(_ROLES)
    ]

    def consult(sdk: XConnectorSDK, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Args:
        """Receive: the call's arguments, its model_input rebuilt to skip what XConnector
        loaded. Send: stores the blocks the original computed."""
        with _guard(kind, sdk):
            bound = sig.bind(*args, **kwargs)
            values = [bound.arguments.get(name) for name in names]
            if not receive:
                sdk.handle_kv_send_sync(*values)
            elif (result := sdk.handle_kv_receive_sync(*values[:3])).cache_hit:
                bound.arguments[names[1]] = result.model_input
                return bound.args, bound.kwargs
        return args, kwargs

    async def hop(sdk: XConnectorSDK, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Args:
        with _guard(kind, sdk):  # `consult` guards itself; this, the thread hop
            return await asyncio.to_thread(consult, sdk, args, kwargs)
        return args, kwargs

    async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
        sdk = get_sdk()
        if sdk is not None and receive:
            args, kwargs = await hop(sdk, args, kwargs)
        out = await original(*args, **kwargs)
        if sdk is not None and not receive:
            await hop(sdk, args, kwargs)
        return out

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sdk = get_sdk()
        if sdk is not None and receive:
            args, kwargs = consult(sdk, args, kwargs)
        out = original(*args, **kwargs)
        if sdk is not None and not receive:
            consult(sdk, args, kwargs)
        return out

    chosen = async_wrapper if inspect.iscoroutinefunction(original) else wrapper
    functools.update_wrapper(chosen, original)
    setattr(chosen, MARK, True)
    return chosen


make_recv_wrapper = functools.partial(_wrap, kind="receive")
make_send_wrapper = functools.partial(_wrap, kind="send")


def wrap_methods(target: Any, source: Any, get_sdk: SdkProvider) -> bool:
    """Sets `target`'s receive and send methods to wrappers of `source`'s (those it has, unless
    they are wrappers already). False if `source` has neither."""
    found = False
    for name, make in zip(WORKER_METHODS, (make_recv_wrapper, make_send_wrapper), strict=True):
        method = getattr(source, name, None)
        if method is not None and not is_wrapper(method):
            setattr(target, name, make(method, get_sdk))
        found = found or method is not None
    return found


class VLLMWorkerWrapper:
    """Wraps a worker instance: `recv_kv_caches`/`send_kv_caches` consult XConnector around the
    worker's own; everything else is the worker's. Sync or async as the worker's methods are."""

    def __init__(self, original_worker: Any, xconnector_sdk: XConnectorSDK | None) -> None:
        self.worker = original_worker
        self.sdk = xconnector_sdk
        wrap_methods(self, original_worker, lambda: self.sdk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.worker, name)
