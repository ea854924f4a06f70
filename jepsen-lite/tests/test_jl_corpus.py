"""Porcupine's public Jepsen histories: every known verdict must agree.

Wall time is deliberately not asserted here (machines vary); run
``python jepsen-lite/tests/bench_corpus.py`` for the timing figure.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from jepsen_lite.checker import WorkerPool, check_history
from jepsen_lite.formats import FormatError, parse_file
from jl_helpers import CORPUS


def _expected() -> list[tuple[int, bool]]:
    path = CORPUS / "etcd" / "expected.txt"
    if not path.exists():
        return []
    pairs = (line.split() for line in path.read_text().splitlines() if line.strip())
    return [(int(n), v == "true") for n, v in pairs]


EXPECTED = _expected()


def test_expected_covers_102_histories(corpus: Path) -> None:
    assert len(EXPECTED) == 102
    assert 95 not in dict(EXPECTED)


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(2) as p:
        yield p


@pytest.mark.parametrize(("n", "valid"), EXPECTED, ids=[f"etcd_{n:03d}" for n, _ in EXPECTED])
def test_etcd_verdicts(corpus: Path, n: int, valid: bool) -> None:
    parsed = parse_file(corpus / "etcd" / f"etcd_{n:03d}.log", "jepsen-etcd-log")
    assert parsed.model == "register"
    r = check_history(parsed.ops, parsed.model)
    assert r.valid is valid
    if not valid:
        (kr,) = r.failures
        assert kr.stuck is not None and kr.stuck in r.by_id


def test_etcd_095_is_empty_and_rejected(corpus: Path) -> None:
    with pytest.raises(FormatError):
        parse_file(corpus / "etcd" / "etcd_095.log", "jepsen-etcd-log")


KV = ["c01-ok", "c01-bad", "c10-ok", "c10-bad", "c50-ok", "c50-bad"]


@pytest.mark.parametrize("name", KV)
def test_kv_verdicts(corpus: Path, pool: WorkerPool, name: str) -> None:
    parsed = parse_file(corpus / "kv" / f"{name}.txt", "jepsen-edn-kv")
    assert parsed.model == "kv"
    r = check_history(parsed.ops, parsed.model, pool=pool)
    assert r.valid is name.endswith("-ok")
    assert len(r.keys) == len({op.key for op in parsed.ops})


def test_c50_bad_all_keys_is_bounded_by_budget(corpus: Path, pool: WorkerPool) -> None:
    """Some c50-bad keys blow up without a budget (24 GB was seen); with one they
    end as unknown, and the history is still refuted by the other keys."""
    parsed = parse_file(corpus / "kv" / "c50-bad.txt", "jepsen-edn-kv")
    r = check_history(
        parsed.ops, "kv", all_keys=True, max_steps=200_000, max_memo=100_000, pool=pool
    )
    assert r.valid is False
    assert len(r.keys) == 10
    assert len(r.failures) >= 5
    assert r.unknowns, "expected some keys to hit the small budget"
    assert {k.reason for k in r.unknowns} <= {"budget-steps", "budget-memo"}
