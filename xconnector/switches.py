"""The environment switches, read one way everywhere: only "1"/"true" turn a flag on, and only
"0"/"false" turn `XCONNECTOR_ENABLED` off (dd-trace-py's rule). Standard library only: the
autopatch reads these before it imports anything else, in every process Dynamo starts."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # see xconnector/__init__.py
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any


def _is(value: str | None, *words: str) -> bool:
    return (value or "").strip().lower() in words


def disabled(environ: Mapping[str, str] | None = None) -> bool:
    """`XCONNECTOR_DISABLE=1` or `XCONNECTOR_ENABLED=0`: XConnector does nothing at all."""
    env = os.environ if environ is None else environ
    off = _is(env.get("XCONNECTOR_ENABLED"), "0", "false")
    return off or _is(env.get("XCONNECTOR_DISABLE"), "1", "true")


def strict(environ: Mapping[str, str] | None = None, section: Any = None) -> bool:
    """A configuration problem stops startup instead of leaving XConnector off:
    `XCONNECTOR_STRICT=1`, or `integration.strict: true` in `section` (a raw section dict,
    read even when the rest of it is invalid)."""
    integration = section.get("integration") if isinstance(section, dict) else None
    in_section = isinstance(integration, dict) and integration.get("strict") is True
    env = os.environ if environ is None else environ
    return in_section or _is(env.get("XCONNECTOR_STRICT"), "1", "true")
