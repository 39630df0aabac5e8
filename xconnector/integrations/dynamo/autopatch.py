"""One line turns XConnector on in a Dynamo worker:

    import xconnector.integrations.dynamo.autopatch

It reads the `xconnector:` config (see `config_detector`), and in worker processes patches the
KV receive/send methods of the configured worker classes, whenever they are imported. With
`XCONNECTOR_DISABLE=1` or `XCONNECTOR_ENABLED=0` it imports nothing beyond `os` and returns.
It never raises into the importing program, except with `integration.strict: true` (or
`XCONNECTOR_STRICT=1`), where a configuration error stops startup.
"""

import os as _os


def _switch_off() -> bool:
    # dd-trace-py's rule: only "1"/"true" turn a flag on; "0"/"false" turn ENABLED off.
    disable = _os.environ.get("XCONNECTOR_DISABLE", "").strip().lower() in ("1", "true")
    enabled = _os.environ.get("XCONNECTOR_ENABLED", "").strip().lower() not in ("0", "false")
    return disable or not enabled


if not _switch_off():
    try:
        from xconnector.integrations.dynamo.worker_injector import install as _install
    except Exception as _error:  # a broken installation must not stop the worker
        import logging as _logging

        _logging.getLogger("xconnector").error(
            "XConnector is off: it could not be imported (%s); the worker runs without it", _error
        )
    else:
        _install()  # raises only in strict mode, by request
