"""Integrations with inference stacks. Importing a subpackage loads nothing heavy."""
