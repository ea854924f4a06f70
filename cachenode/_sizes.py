"""Byte counts for people: one format for the node's messages and cachectl's tables."""

from __future__ import annotations


def show_size(n: int) -> str:
    """``0`` -> ``0 B``, ``1536`` -> ``1.5 KiB``, ``3 << 30`` -> ``3.0 GiB`` (binary units, to TiB)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
