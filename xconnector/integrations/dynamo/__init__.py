"""NVIDIA Dynamo integration. Kept empty of imports on purpose: Dynamo imports the worker module,
and with it the autopatch, in every process it starts, so this package must cost nothing."""
