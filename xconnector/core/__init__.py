"""Compatibility layer: `XConnector`, the facade earlier releases exposed, on top of the SDK."""
