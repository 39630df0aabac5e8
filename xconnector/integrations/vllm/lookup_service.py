"""Scheduler-side lookups across processes (tensor or pipeline parallel > 1): each rank's engine
answers on a Unix socket in a directory private to this user; the scheduler asks every rank and
takes the smallest answer. Rules, trust checks, wire format: `xconnector_core::lookup_service`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xconnector._loader import load_native

if TYPE_CHECKING:
    from xconnector._native import Engine, LookupClient, LookupServer

log = logging.getLogger("xconnector.vllm")

#: How long one scheduler-side lookup waits for all ranks together, in seconds.
LOOKUP_TIMEOUT = 0.1


def socket_path(engine_id: str, rank: int) -> str:
    """Where rank `rank` of engine `engine_id` serves lookups."""
    path: str = load_native().lookup_socket_path(engine_id, rank)
    return path


def serve(engine: Engine, engine_id: str, rank: int) -> LookupServer | None:
    """Serves this rank's lookups with `engine`; None, logged, if the socket is refused (a socket
    directory not private to this user, something else at the path): the worker runs on, and the
    scheduler, which cannot reach this rank, promises no hits."""
    try:
        server: LookupServer = load_native().LookupServer(engine, socket_path(engine_id, rank))
    except Exception as e:
        log.error(
            "XConnector's lookup service is off on rank %d (the scheduler will load no KV): %s",
            rank,
            e,
        )
        return None
    return server


def client(engine_id: str, ranks: int, timeout: float = LOOKUP_TIMEOUT) -> LookupClient:
    """Asks ranks 0..ranks-1 of engine `engine_id`."""
    paths = [socket_path(engine_id, r) for r in range(ranks)]
    lookup_client: LookupClient = load_native().LookupClient(paths, timeout=timeout)
    return lookup_client
