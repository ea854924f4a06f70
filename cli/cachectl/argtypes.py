"""argparse value types shared by cachectl's nouns (one-line errors)."""

from __future__ import annotations

import argparse


def _at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
    return value


def count(text: str) -> int:
    """A whole number >= 1."""
    return _at_least(text, 1)


def whole(text: str) -> int:
    """A whole number >= 0."""
    return _at_least(text, 0)


def seconds(text: str) -> float:
    """A number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
