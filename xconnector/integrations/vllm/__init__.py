"""vLLM v1 integration: `connector.XConnectorV1`, a `KVConnectorBase_V1` loaded by vLLM through
`--kv-transfer-config`. Importing this package does not import vLLM."""
