"""Data-driven scheduler scenarios: a cluster state as text in, the
operators the PD proposes out.  Each ``testdata/*.txt`` holds the scenario,
a ``----`` line, and the expected plan.  ``REWRITE_GOLDEN=1 pytest
tests/pd`` rewrites the expected part (review the diff before committing)."""

from __future__ import annotations

import itertools
import os
import pathlib

import pytest

from cachenode.pd import scenario
from cachenode.pd.planner import plan

DATA = pathlib.Path(__file__).parent / "testdata"
SEP = "----\n"


def run(text: str) -> str:
    sc = scenario.parse(text)
    ids = itertools.count(1)
    return scenario.render(plan(sc.view, [], sc.config, lambda: next(ids), sc.paused))


@pytest.mark.parametrize("path", sorted(DATA.glob("*.txt")), ids=lambda p: p.stem)
def test_golden(path: pathlib.Path) -> None:
    text = path.read_text()
    given, sep, expected = text.partition(SEP)
    got = run(given)
    if os.environ.get("REWRITE_GOLDEN"):
        path.write_text(given + SEP + got)
        return
    assert sep, f"{path.name} has no expected part; run with REWRITE_GOLDEN=1"
    assert got == expected
