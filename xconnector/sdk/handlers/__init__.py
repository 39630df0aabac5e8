"""The SDK's handlers: KV cache work, distributed (overlap scoring), monitoring."""

from xconnector.sdk.handlers.distributed import DistributedHandler
from xconnector.sdk.handlers.kv_cache import KVCacheHandler, KVReceiveResult, KVSendResult
from xconnector.sdk.handlers.monitoring import MonitoringHandler

__all__ = [
    "DistributedHandler",
    "KVCacheHandler",
    "KVReceiveResult",
    "KVSendResult",
    "MonitoringHandler",
]
