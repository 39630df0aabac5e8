"""Shared fixtures: small engines with payloads derived from their tokens."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator

import pytest

from xconnector import Engine, native
from xconnector.logs import set_level

BLOCK = 16
BLOCK_BYTES = 256


def block_payload(tokens: list[int], block_bytes: int = BLOCK_BYTES) -> bytes:
    """Bytes for the full blocks of `tokens`; each block's bytes depend on its whole prefix."""
    out = bytearray()
    for end in range(BLOCK, len(tokens) + 1, BLOCK):
        seed = hashlib.sha256(repr(tokens[:end]).encode()).digest()
        out += (seed * (block_bytes // len(seed) + 1))[:block_bytes]
    return bytes(out)


@pytest.fixture
def make_engine() -> Callable[..., Engine]:
    def make(blocks: int = 64, **kw: object) -> Engine:
        kw.setdefault("model", "test-model")
        return Engine(block_bytes=BLOCK_BYTES, capacity_bytes=blocks * BLOCK_BYTES, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
def no_faults() -> Iterator[None]:
    """Clears injected faults after a test, whatever it did."""
    yield
    for point in ("lookup", "store", "load", "store_copy", "load_copy"):
        native()._inject_fault(point, "none")


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """XConnector's native records at INFO and above, captured (the fault-matrix tests count
    the lines a fault writes)."""
    set_level(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="xconnector"):
            yield caplog
    finally:
        set_level(logging.NOTSET)
