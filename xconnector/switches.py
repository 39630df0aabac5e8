"""The environment switches, read one way everywhere.

dd-trace-py's rule: only "1"/"true" turn a flag on, and only "0"/"false" turn
`XCONNECTOR_ENABLED` off. Standard library only: the autopatch reads these before it imports
anything else, in every process Dynamo starts.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # see xconnector/__init__.py
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any


def _on(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true")


def disabled(environ: Mapping[str, str] | None = None) -> bool:
    """`XCONNECTOR_DISABLE=1` or `XCONNECTOR_ENABLED=0`: XConnector does nothing at all."""
    env = os.environ if environ is None else environ
    off = env.get("XCONNECTOR_ENABLED", "").strip().lower() in ("0", "false")
    return _on(env.get("XCONNECTOR_DISABLE")) or off


def strict(environ: Mapping[str, str] | None = None, section: Any = None) -> bool:
    """A configuration problem stops startup instead of leaving XConnector off:
    `XCONNECTOR_STRICT=1`, or `integration.strict: true` in `section` (a raw section dict,
    read even when the rest of it is invalid)."""
    env = os.environ if environ is None else environ
    if _on(env.get("XCONNECTOR_STRICT")):
        return True
    integration = section.get("integration") if isinstance(section, dict) else None
    return isinstance(integration, dict) and integration.get("strict") is True
