"""One line turns XConnector on in a Dynamo worker:

    import xconnector.integrations.dynamo.autopatch

It reads the `xconnector:` config and, in worker processes, patches the configured worker
classes whenever they are imported (`worker_injector`). With `XCONNECTOR_DISABLE=1` or
`XCONNECTOR_ENABLED=0` it imports nothing beyond `os` (in `xconnector.switches`). It never raises
into the importing program, except with `integration.strict: true` (or `XCONNECTOR_STRICT=1`).
"""

from xconnector.switches import disabled as _disabled

if not _disabled():
    try:
        from xconnector.integrations.dynamo.worker_injector import install as _install
    except Exception as _error:  # a broken installation must not stop the worker
        import logging as _logging

        _logging.getLogger("xconnector").error(
            "XConnector is off: it could not be imported (%s); the worker runs without it", _error
        )
    else:
        _install()  # raises only in strict mode, by request
