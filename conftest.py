"""Test ordering for ``make test``'s parallel run (pytest-xdist, one file per worker).

``make test`` runs the suite on two workers with ``--dist loadfile``: the
suite mostly waits (elections, deadlines, jepsen-lite's timed runs), so two
files side by side use the 2 cores that one leaves idle, and each file's
cluster fixtures still start once.  With ``--no-loadscope-reorder`` xdist
hands files out in collection order (by default it reorders them by their
number of tests), so the longest ones go first (longest-processing-time
first): a jepsen-lite file takes minutes, a cluster file tens of seconds, a
unit file seconds.  Left late, the jepsen-lite file would run alone at the end.

Only under xdist (``PYTEST_XDIST_WORKER`` is set in its workers, which
collect): a plain ``pytest`` keeps the usual order, fast files first.
"""

from __future__ import annotations

import os

import pytest


def _rank(items: list[pytest.Item]) -> int:
    """0: a jepsen-lite suite file (every test marked ``jepsen``), minutes
    long; 1: a file that starts clusters (a test marked ``cluster`` or
    ``jepsen``), tens of seconds; 2: the rest, seconds.  A file with one
    jepsen-lite run among other tests ranks 1, so the two workers do not
    both open with a jepsen-lite run on 2 cores."""
    marks = [{m.name for m in item.iter_markers()} for item in items]
    if all("jepsen" in m for m in marks):
        return 0
    return 1 if any(m & {"cluster", "jepsen"} for m in marks) else 2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    by_file: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_file.setdefault(item.nodeid.split("::", 1)[0], []).append(item)  # xdist's loadfile key
    ordered = sorted(by_file.values(), key=_rank)  # stable: order within a rank is kept
    items[:] = [item for file_items in ordered for item in file_items]
