"""XConnector's configuration: the `xconnector:` section as dataclasses (`schema`), and where a
worker process finds it (`discovery`). The schema and every rule live in the native core; these
modules mirror and call it."""
