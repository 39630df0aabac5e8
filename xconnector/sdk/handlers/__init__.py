"""The SDK's handlers: KV cache work (`kv_cache`), distributed overlap scoring (`distributed`),
monitoring (`monitoring`)."""
