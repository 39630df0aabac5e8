"""NVIDIA Dynamo integration: config discovery now; the autopatch builds on it.

Kept empty of imports on purpose: Dynamo imports the worker module, and with it the autopatch,
in every process it starts, so this package must cost nothing to import.
"""
