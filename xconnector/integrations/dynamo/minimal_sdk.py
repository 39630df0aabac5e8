"""The process-wide SDK of a patched worker (defined in `xconnector.sdk.process`)."""

from xconnector.sdk.process import configure, configured, get_sdk, shutdown, stats

__all__ = ["configure", "configured", "get_sdk", "shutdown", "stats"]
