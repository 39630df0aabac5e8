"""Dynamo's `@service` decorator as far as XConnector sees it: it returns a wrapper object that
keeps the real class as `.inner` (Dynamo itself, with its runtime, is not installed here)."""

from __future__ import annotations

from typing import Any


class DynamoService:
    def __init__(self, inner: type) -> None:
        self.inner = inner
        self.name = inner.__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def service(cls: type) -> DynamoService:
    return DynamoService(cls)
