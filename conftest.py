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

_RANK = {"jepsen": 0, "cluster": 1}
"""A file's rank is its best-ranked test's; unmarked files rank last."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    rank: dict[str, int] = {}
    for item in items:
        r = min((_RANK[m.name] for m in item.iter_markers() if m.name in _RANK), default=len(_RANK))
        rank[item.location[0]] = min(r, rank.get(item.location[0], r))
    items.sort(key=lambda item: rank[item.location[0]])  # stable: order within a rank is kept
