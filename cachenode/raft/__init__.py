"""Raft layer: the only package that imports pysyncobj (see docs/architecture.md)."""
