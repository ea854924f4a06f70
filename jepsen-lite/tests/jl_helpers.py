"""Hand-written history helpers shared by the jepsen-lite tests."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

from jepsen_lite.history import Op

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "porcupine"


def hist(*events: tuple[Any, ...], key: Hashable = None) -> list[Op]:
    """Events as ``(process, type, f, value[, key])``; time = position in the list.

    Interleaving the tuples is how a test expresses concurrency, as in Jepsen's own
    checker tests: ``(0, "invoke", ...), (1, "invoke", ...), (0, "ok", ...)`` makes
    the two ops overlap.
    """
    ops = []
    for i, ev in enumerate(events):
        process, typ, f, value = ev[:4]
        k = ev[4] if len(ev) > 4 else key
        ops.append(Op(i, i * 10, process, typ, f, k, value))
    return ops


def timed(*events: tuple[Any, ...], key: Hashable = None) -> list[Op]:
    """Events as ``(time_ns, process, type, f, value)``, for models that read time."""
    return [Op(i, t, p, typ, f, key, v) for i, (t, p, typ, f, v) in enumerate(events)]
