"""Kiln: the logic behind the workflow's rules, as plain functions over values and paths."""

__version__ = "0.1.0"
