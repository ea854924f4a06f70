"""Clocks are inputs: every component that needs time takes a ``Clock``.

``SystemClock`` reads wall time plus an adjustable offset (the jepsen-lite
clock nemesis moves it through the admin API) and the monotonic clock.
Tests pass a ``ManualClock``.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def wall_ms(self) -> int:
        """Wall-clock milliseconds since the epoch (may jump; may be skewed)."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""
        ...

    def true_wall_ms(self) -> int:
        """Wall time WITHOUT any test skew: used only to measure how long this
        node was down (durations across a restart), never as a timestamp."""
        ...


class SystemClock:
    def __init__(self, offset_ms: int = 0) -> None:
        self._offset_ms = offset_ms
        self._lock = threading.Lock()

    def set_offset_ms(self, offset_ms: int) -> None:
        with self._lock:
            self._offset_ms = offset_ms

    @property
    def offset_ms(self) -> int:
        return self._offset_ms

    def wall_ms(self) -> int:
        return int(time.time() * 1000) + self._offset_ms

    def true_wall_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """Test double: time moves only when the test says so."""

    def __init__(self, wall_ms: int = 1_700_000_000_000) -> None:
        self._wall = wall_ms
        self._mono = 1000.0

    def advance(self, seconds: float) -> None:
        self._wall += int(seconds * 1000)
        self._mono += seconds

    def wall_ms(self) -> int:
        return self._wall

    def true_wall_ms(self) -> int:
        return self._wall

    def monotonic(self) -> float:
        return self._mono
