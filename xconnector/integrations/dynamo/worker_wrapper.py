"""Wrappers for a worker's KV methods, with the vLLM-v0 connector shapes:

    recv(model_executable, model_input, kv_caches)
        -> (hidden_or_None, bypass_model_exec, model_input)
    send(model_executable, model_input, kv_caches, hidden_or_intermediate_states) -> None

Receive: XConnector loads each fresh prefill request's cached prefix into the paged KV tensors,
then the original runs, once, on the batch rebuilt to cover only the uncached rest. Send: the
original runs first; then XConnector stores the full blocks just computed.

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
from xconnector.patching import MARK, is_wrapper
from xconnector.sdk.xconnector_sdk import XConnectorSDK

__all__ = [
    "MARK",
    "SdkProvider",
    "VLLMWorkerWrapper",
    "errors",
    "is_wrapper",
    "make_recv_wrapper",
    "make_send_wrapper",
]

log = logging.getLogger("xconnector.autopatch")

SdkProvider = Callable[[], "XConnectorSDK | None"]
_Args = tuple[tuple[Any, ...], dict[str, Any]]


_errors = SdkStats()  # native: counts by kind, thread-safe, the first of each reported once


def errors() -> dict[str, int]:
    """Errors swallowed by the guard, by kind (`receive`, `send`)."""
    return _errors.counters()


@contextlib.contextmanager
def _guard(kind: str, sdk: XConnectorSDK | None) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        first = _errors.count(kind) == 1
        if sdk is not None:
            sdk.get_monitoring_handler().fallback(f"wrapper_{kind}")
        say = log.warning if first else log.debug
        say("XConnector %s failed (%s: %s); the worker's own path ran", kind, type(e).__name__, e)


class _Call:
    """A call's arguments by role, and how to re-issue it with another model_input."""

    _ROLES = ("model_executable", "model_input", "kv_caches", "hidden_or_intermediate_states")

    def __init__(
        self, sig: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.args = args
        self.kwargs = kwargs
        bound = sig.bind(*args, **kwargs)
        params = [p for p in sig.parameters.values() if p.name != "self"]
        positional = [
            p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        self.names: dict[str, str] = {}
        for i, role in enumerate(self._ROLES):
            if role in bound.arguments:
                self.names[role] = role
            elif i < len(positional):  # user code may name them differently
                self.names[role] = positional[i]
        self.values = {role: bound.arguments.get(name) for role, name in self.names.items()}
        self._positional = positional
        self._has_self = "self" in sig.parameters

    def get(self, role: str) -> Any:
        return self.values.get(role)

    def with_model_input(self, model_input: Any) -> _Args:
        name = self.names["model_input"]
        if name in self.kwargs:
            return self.args, {**self.kwargs, name: model_input}
        index = self._positional.index(name) + (1 if self._has_self else 0)
        args = list(self.args)
        args[index] = model_input
        return tuple(args), self.kwargs


def _mark(wrapper: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, MARK, True)
    return wrapper


def make_recv_wrapper(original: Callable[..., Any], get_sdk: SdkProvider) -> Callable[..., Any]:
    sig = inspect.signature(original)

    def served(sdk: XConnectorSDK, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Args:
        """The call's arguments, its model_input rebuilt to skip what XConnector loaded."""
        with _guard("receive", sdk):
            call = _Call(sig, args, kwargs)
            result = sdk.handle_kv_receive_sync(
                call.get("model_executable"), call.get("model_input"), call.get("kv_caches")
            )
            if result.cache_hit:
                return call.with_model_input(result.model_input)
        return args, kwargs

    if inspect.iscoroutinefunction(original):

        async def async_recv(*args: Any, **kwargs: Any) -> Any:
            sdk = get_sdk()
            if sdk is not None:
                with _guard("receive", sdk):  # `served` guards itself; this, the thread hop
                    args, kwargs = await asyncio.to_thread(served, sdk, args, kwargs)
            return await original(*args, **kwargs)

        return _mark(async_recv, original)

    def recv(*args: Any, **kwargs: Any) -> Any:
        sdk = get_sdk()
        if sdk is not None:
            args, kwargs = served(sdk, args, kwargs)
        return original(*args, **kwargs)

    return _mark(recv, original)


def make_send_wrapper(original: Callable[..., Any], get_sdk: SdkProvider) -> Callable[..., Any]:
    sig = inspect.signature(original)

    def store(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sdk = get_sdk()
        if sdk is None:
            return
        with _guard("send", sdk):
            call = _Call(sig, args, kwargs)
            sdk.handle_kv_send_sync(
                call.get("model_executable"),
                call.get("model_input"),
                call.get("kv_caches"),
                call.get("hidden_or_intermediate_states"),
            )

    if inspect.iscoroutinefunction(original):

        async def async_send(*args: Any, **kwargs: Any) -> Any:
            out = await original(*args, **kwargs)
            await asyncio.to_thread(store, args, kwargs)
            return out

        return _mark(async_send, original)

    def send(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        store(args, kwargs)
        return out

    return _mark(send, original)


class VLLMWorkerWrapper:
    """Wraps a worker instance: `recv_kv_caches`/`send_kv_caches` consult XConnector around the
    worker's own; everything else is the worker's. Sync or async as the worker's methods are."""

    def __init__(self, original_worker: Any, xconnector_sdk: XConnectorSDK | None) -> None:
        self.worker = original_worker
        self.sdk = xconnector_sdk
        self._recv = make_recv_wrapper(original_worker.recv_kv_caches, lambda: self.sdk)
        self._send = make_send_wrapper(original_worker.send_kv_caches, lambda: self.sdk)

    def recv_kv_caches(self, *args: Any, **kwargs: Any) -> Any:
        return self._recv(*args, **kwargs)

    def send_kv_caches(self, *args: Any, **kwargs: Any) -> Any:
        return self._send(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.worker, name)
