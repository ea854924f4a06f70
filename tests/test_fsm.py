"""ShardStateMachine: command semantics, idempotency, dedup, determinism, replay, snapshots."""

from __future__ import annotations

import dataclasses
import io
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachenode._errors import FailedPrecondition
from cachenode.fsm import (
    Barrier,
    BarrierResult,
    CasResult,
    Command,
    CompareAndSet,
    Condition,
    Delete,
    DeleteResult,
    ErrorResult,
    Expire,
    ExpireResult,
    Incr,
    IncrResult,
    MSet,
    MSetResult,
    Replayed,
    RequestId,
    Result,
    Set,
    SetResult,
    ShardStateMachine,
    decode_command,
    decode_result,
    encode_command,
    encode_result,
    read_get,
    ttl_remaining_ms,
)
from cachenode.fsm.codec import decode_multi, encode_multi, fingerprint, restamp_command
from cachenode.fsm.commands import restamped
from cachenode.storage.base import MAX_KEY_BYTES, Record, StateWriter, Storage, StorageFault
from cachenode.storage.lmdb_store import LmdbStorage
from cachenode.storage.memory_store import MemoryStorage

G = 1
I64_MAX = (1 << 63) - 1
I64_MIN = -(1 << 63)


class Node:
    """One replica's view for tests: a storage, a state machine, an index counter."""

    def __init__(self, storage: Storage, sm: ShardStateMachine | None = None) -> None:
        self.s = storage
        self.sm = sm or ShardStateMachine()
        self.index = 0

    def apply_raw(self, payload: bytes, index: int | None = None) -> bytes:
        if index is None:
            self.index += 1
            index = self.index
        b = self.s.begin()
        try:
            out = self.sm.apply(payload, index, b.state(G))
        except BaseException:
            b.abort()
            raise
        b.commit()
        return out

    def apply(self, cmd: Command, index: int | None = None) -> Result:
        return decode_result(self.apply_raw(encode_command(cmd), index))

    def get(self, key: bytes, clock: int | None = None) -> Record | None:
        r = self.s.reader(G)
        return read_get(r, key, r.clock_ms() if clock is None else clock)

    def state(self) -> bytes:
        out = io.BytesIO()
        self.s.reader(G).dump(out)
        return out.getvalue()


@pytest.fixture(params=["lmdb", "memory"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    s: Storage = (
        LmdbStorage(tmp_path / "db", fsync=False) if request.param == "lmdb" else MemoryStorage()
    )
    yield Node(s)
    s.close()


def rid(seq: int, client: bytes = b"client") -> RequestId:
    return RequestId(client, seq)


# -- command semantics -------------------------------------------------------


def test_set_conditions(node: Node) -> None:
    assert node.apply(Set(b"k", b"v1", 0, Condition.ALWAYS, 1000)) == SetResult(True, 1)
    assert node.apply(Set(b"k", b"v2", 0, Condition.IF_ABSENT, 1000)) == SetResult(False, 1)
    assert node.apply(Set(b"k", b"v3", 0, Condition.IF_PRESENT, 1000)) == SetResult(True, 3)
    assert node.apply(Set(b"other", b"x", 0, Condition.IF_PRESENT, 1000)) == SetResult(False, 0)
    assert node.apply(Set(b"other", b"x", 0, Condition.IF_ABSENT, 1000)) == SetResult(True, 5)
    assert node.get(b"k") == Record(b"v3", 3, 0)
    assert node.get(b"other") == Record(b"x", 5, 0)
    r = node.s.reader(G)
    assert (r.applied_index(), r.clock_ms(), r.count()) == (5, 1000, 2)


def test_ttl_expired_behaves_as_absent(node: Node) -> None:
    node.apply(Set(b"k", b"v", 2000, Condition.ALWAYS, 1000))
    assert node.get(b"k", 1999) == Record(b"v", 1, 2000)
    assert node.get(b"k", 2000) is None  # due at exactly expires_at_ms
    rec = node.get(b"k", 1500)
    assert rec is not None and ttl_remaining_ms(rec, 1500) == 500
    assert ttl_remaining_ms(Record(b"", 1, 0), 1500) == -1
    # Once the clock passes the expiry, every command sees the key as absent.
    assert node.apply(Set(b"k", b"new", 0, Condition.IF_PRESENT, 2000)) == SetResult(False, 0)
    assert node.apply(Incr(b"k", 1, 2000)) == IncrResult(1, 3)  # started from 0
    assert node.get(b"k") == Record(b"1", 3, 0)  # a fresh record without the old expiry


def test_expired_record_invisible_to_if_absent_and_delete(node: Node) -> None:
    node.apply(Set(b"k", b"v", 1500, Condition.ALWAYS, 1000))
    node.apply(Barrier(1600))
    assert node.s.reader(G).get(b"k") is not None  # still stored...
    assert node.apply(Delete(b"k", 1600)) == DeleteResult(False, 3)  # ...but not live
    assert node.s.reader(G).get(b"k") is None  # and dropped by the delete
    node.apply(Set(b"j", b"v", 1700, Condition.ALWAYS, 1600))
    assert node.apply(Set(b"j", b"w", 0, Condition.IF_ABSENT, 1800)) == SetResult(True, 5)


def test_clock_is_monotonic_across_skewed_leaders(node: Node) -> None:
    node.apply(Set(b"k", b"v", 1500, Condition.ALWAYS, 1000))
    assert node.apply(Barrier(2000)) == BarrierResult(2, 2000)
    # A new leader whose clock is behind: the group clock does not go back,
    # so the key stays expired.
    assert node.apply(Barrier(1200)) == BarrierResult(3, 2000)
    assert node.apply(Set(b"k", b"x", 0, Condition.IF_PRESENT, 1200)) == SetResult(False, 0)
    assert node.s.reader(G).clock_ms() == 2000


def test_set_with_past_expiry_stores_nothing(node: Node) -> None:
    node.apply(Set(b"k", b"v", 0, Condition.ALWAYS, 1000))
    assert node.apply(Set(b"k", b"gone", 900, Condition.ALWAYS, 1000)) == SetResult(True, 2)
    assert node.s.reader(G).get(b"k") is None
    assert node.s.reader(G).count() == 0


def test_delete(node: Node) -> None:
    node.apply(Set(b"k", b"v", 0, Condition.ALWAYS, 1))
    assert node.apply(Delete(b"k", 1)) == DeleteResult(True, 2)
    assert node.apply(Delete(b"k", 1)) == DeleteResult(False, 3)
    assert node.get(b"k") is None


def test_cas_on_value_version_and_absence(node: Node) -> None:
    def cas(
        ev: bytes | None = None, ever: int | None = None, absent: bool = False, new: bytes = b"n"
    ) -> Result:
        return node.apply(CompareAndSet(b"k", ev, ever, absent, new, 0, 10))

    assert cas(ev=b"x") == CasResult(False, 0, False, None, 0)
    assert cas(ever=5) == CasResult(False, 0, False, None, 0)
    assert cas(absent=True, new=b"a") == CasResult(True, 3, False, None, 0)
    assert cas(absent=True) == CasResult(False, 0, True, b"a", 3)
    assert cas(ever=0) == CasResult(False, 0, True, b"a", 3)  # version 0 = must be absent
    assert cas(ev=b"wrong") == CasResult(False, 0, True, b"a", 3)
    assert cas(ev=b"a", new=b"b") == CasResult(True, 7, False, None, 0)
    assert cas(ever=3) == CasResult(False, 0, True, b"b", 7)
    assert cas(ever=7, new=b"c") == CasResult(True, 9, False, None, 0)
    assert node.get(b"k") == Record(b"c", 9, 0)
    node.apply(Delete(b"k", 10))
    assert cas(ever=0, new=b"d") == CasResult(True, 11, False, None, 0)


def test_cas_sets_expiry_and_sees_expired_as_absent(node: Node) -> None:
    node.apply(CompareAndSet(b"k", None, None, True, b"v", 50, 10))
    assert node.get(b"k") == Record(b"v", 1, 50)
    assert node.apply(CompareAndSet(b"k", b"v", None, False, b"w", 0, 60)) == CasResult(
        False, 0, False, None, 0
    )
    assert node.apply(CompareAndSet(b"k", None, None, True, b"w", 0, 60)) == CasResult(
        True, 3, False, None, 0
    )


def test_incr(node: Node) -> None:
    assert node.apply(Incr(b"n", 5, 1)) == IncrResult(5, 1)
    assert node.apply(Incr(b"n", -7, 1)) == IncrResult(-2, 2)
    assert node.get(b"n") == Record(b"-2", 2, 0)
    node.apply(Set(b"m", b"41", 500, Condition.ALWAYS, 1))
    assert node.apply(Incr(b"m", 1, 2)) == IncrResult(42, 4)
    assert node.get(b"m") == Record(b"42", 4, 500)  # keeps the expiry
    node.apply(Set(b"big", str(I64_MAX - 1).encode(), 0, Condition.ALWAYS, 2))
    assert node.apply(Incr(b"big", 1, 2)) == IncrResult(I64_MAX, 6)
    node.apply(Set(b"small", str(I64_MIN).encode(), 0, Condition.ALWAYS, 2))
    assert node.apply(Incr(b"small", 0, 2)) == IncrResult(I64_MIN, 8)


@pytest.mark.parametrize(
    "stored, delta, why",
    [
        (b"abc", 1, "not an integer"),
        (b"1.5", 1, "not an integer"),
        (b" 1", 1, "not an integer"),
        (b"+1", 1, "not an integer"),
        (b"007", 1, "not an integer"),
        (b"-0", 1, "not an integer"),
        (b"", 1, "not an integer"),
        (b"99999999999999999999", 1, "not an integer"),
        (str(I64_MAX + 1).encode(), 0, "not an integer"),
        (str(I64_MAX).encode(), 1, "overflow"),
        (str(I64_MIN).encode(), -1, "overflow"),
    ],
)
def test_incr_errors_change_nothing(node: Node, stored: bytes, delta: int, why: str) -> None:
    node.apply(Set(b"k", stored, 0, Condition.ALWAYS, 1))
    before = node.s.reader(G).get(b"k")
    res = node.apply(Incr(b"k", delta, 1))
    assert isinstance(res, ErrorResult) and res.kind == "failed_precondition"
    assert why in res.message
    assert node.s.reader(G).get(b"k") == before
    assert node.s.reader(G).applied_index() == 2  # the group moves on


def test_mset_all_in_one_version(node: Node) -> None:
    node.apply(Set(b"b", b"old", 0, Condition.ALWAYS, 1))
    items = ((b"a", b"1", 0), (b"b", b"2", 100), (b"a", b"3", 0), (b"gone", b"x", 1))
    assert node.apply(MSet(items, 5)) == MSetResult(4, 2)
    assert node.get(b"a") == Record(b"3", 2, 0)  # last one wins
    assert node.get(b"b") == Record(b"2", 2, 100)
    assert node.s.reader(G).get(b"gone") is None  # already due when written
    assert node.apply(MSet((), 5)) == MSetResult(0, 3)


def test_expire_deletes_only_the_record_the_leader_saw(node: Node) -> None:
    node.apply(Set(b"due", b"v", 100, Condition.ALWAYS, 1))
    node.apply(Set(b"reset", b"v", 100, Condition.ALWAYS, 1))
    node.apply(Set(b"notyet", b"v", 500, Condition.ALWAYS, 1))
    node.apply(Set(b"forever", b"v", 0, Condition.ALWAYS, 1))
    node.apply(Barrier(200))
    keys = node.s.reader(G).expired(200, 10)
    assert keys == [(b"due", 100), (b"reset", 100)]
    node.apply(Set(b"reset", b"new", 1000, Condition.ALWAYS, 200))  # re-set after the scan
    expire = Expire((*keys, (b"due", 100), (b"notyet", 500), (b"forever", 0), (b"missing", 1)), 200)
    assert node.apply(expire) == ExpireResult(1)
    r = node.s.reader(G)
    assert r.get(b"due") is None
    assert r.get(b"reset") == Record(b"new", 6, 1000)
    assert r.get(b"notyet") is not None and r.get(b"forever") is not None
    assert node.apply(Expire(((b"notyet", 500),), 500)) == ExpireResult(1)


def test_barrier_changes_no_data(node: Node) -> None:
    node.apply(Set(b"k", b"v", 0, Condition.ALWAYS, 10))
    items = list(node.s.reader(G).items())
    assert node.apply(Barrier(20)) == BarrierResult(2, 20)
    assert list(node.s.reader(G).items()) == items
    assert node.s.reader(G).applied_index() == 2


def test_key_limits(node: Node) -> None:
    assert MAX_KEY_BYTES == 4096
    assert node.apply(Set(b"k" * MAX_KEY_BYTES, b"v", 0, Condition.ALWAYS, 1)) == SetResult(True, 1)
    for key in (b"", b"k" * (MAX_KEY_BYTES + 1)):
        with pytest.raises(ValueError):
            encode_command(Set(key, b"v", 0, Condition.ALWAYS, 1))
        # Forged past the encoder, it is still refused, not a storage fault.
        raw = bytes((1, 1)) + msgpack.packb([key, b"v", 0, 0, 1])
        res = decode_result(node.apply_raw(raw))
        assert isinstance(res, ErrorResult) and res.kind == "invalid_argument"


def _forged(key: bytes) -> list[tuple[Command, bytes]]:
    """Every keyed command with ``key``, and its payload built without the
    encoder's checks (tag + msgpack fields, as codec.encode_command lays them out)."""
    cmds: list[tuple[Command, int, list[Any]]] = [
        (Set(key, b"v", 0, Condition.ALWAYS, 5), 1, [key, b"v", 0, 0, 5]),
        (Delete(key, 5), 2, [key, 5]),
        (
            CompareAndSet(key, None, None, True, b"v", 0, 5),
            3,
            [key, None, None, True, b"v", 0, 5],
        ),
        (Incr(key, 1, 5, rid(9)), 4, [key, 1, 5, b"client", 9]),
        (MSet(((b"ok", b"v", 0), (key, b"v", 0)), 5), 5, [[[b"ok", b"v", 0], [key, b"v", 0]], 5]),
        (Expire(((key, 3),), 5), 6, [[[key, 3]], 5]),
    ]
    return [(c, bytes((1, tag)) + msgpack.packb(f, use_bin_type=True)) for c, tag, f in cmds]


@pytest.mark.parametrize("n", [MAX_KEY_BYTES + 1, 2 * MAX_KEY_BYTES])
def test_every_command_refuses_keys_over_the_limit(node: Node, n: int) -> None:
    key = (b"%d:" % n).ljust(n, b"k")
    node.apply(Set(key[:MAX_KEY_BYTES], b"neighbour", 0, Condition.ALWAYS, 1))
    before = list(node.s.reader(G).items())
    for cmd, raw in _forged(key):
        with pytest.raises(ValueError):
            encode_command(cmd)
        res = decode_result(node.apply_raw(raw))
        assert isinstance(res, ErrorResult) and res.kind == "invalid_argument", cmd
        assert str(MAX_KEY_BYTES) in res.message
    assert list(node.s.reader(G).items()) == before
    assert node.s.reader(G).applied_index() == 1 + len(_forged(key))


@pytest.mark.parametrize("n", [1024, MAX_KEY_BYTES])
def test_long_keys_work_in_every_command(node: Node, n: int) -> None:
    k = (b"%d:" % n).ljust(n, b"k")
    k2 = k[:-1] + b"2"  # differs only in its last byte
    k3 = k[:-1] + b"3"
    # The forged payloads of the limit test are exactly what the encoder makes.
    assert [encode_command(c) for c, _ in _forged(k)] == [raw for _, raw in _forged(k)]

    assert node.apply(Set(k, b"v1", 0, Condition.ALWAYS, 10)) == SetResult(True, 1)
    assert node.apply(Set(k, b"no", 0, Condition.IF_ABSENT, 10)) == SetResult(False, 1)
    assert node.get(k) == Record(b"v1", 1, 0) and node.get(k2) is None

    assert node.apply(Incr(k2, 5, 10, rid(1))) == IncrResult(5, 3)
    assert node.apply(Incr(k2, 5, 11, rid(1))) == IncrResult(5, 3)  # retry: deduplicated
    assert node.apply(Incr(k2, -2, 11)) == IncrResult(3, 5)

    assert node.apply(CompareAndSet(k, b"v1", None, False, b"v2", 0, 12)) == CasResult(
        True, 6, False, None, 0
    )
    assert node.apply(CompareAndSet(k, None, 1, False, b"x", 0, 12)) == CasResult(
        False, 0, True, b"v2", 6
    )
    assert node.apply(CompareAndSet(k, None, 6, False, b"v3", 500, 12)) == CasResult(
        True, 8, False, None, 0
    )
    assert node.apply(CompareAndSet(k3, None, None, True, b"c", 0, 12)) == CasResult(
        True, 9, False, None, 0
    )

    items = ((k, b"m1", 100), (k2, b"m2", 0), (k3, b"m3", 200))
    assert node.apply(MSet(items, 50)) == MSetResult(3, 10)
    assert node.get(k) == Record(b"m1", 10, 100)
    assert node.get(k3) == Record(b"m3", 10, 200)

    node.apply(Barrier(150))
    found = node.s.reader(G).expired(150, 10)
    assert found == [(k, 100)]  # the full key comes back from the expiry index
    assert node.apply(Expire(tuple(found), 150)) == ExpireResult(1)
    assert node.s.reader(G).get(k) is None
    assert node.apply(Expire(((k3, 200),), 250)) == ExpireResult(1)

    assert node.apply(Delete(k2, 300)) == DeleteResult(True, 14)
    assert node.apply(Delete(k2, 300)) == DeleteResult(False, 15)
    r = node.s.reader(G)
    assert (r.count(), r.size_bytes(), list(r.items())) == (0, 0, [])


# -- idempotency and exactly-once ---------------------------------------------


def test_same_index_twice_is_a_replay(node: Node) -> None:
    payload = encode_command(Incr(b"n", 1, 10))
    assert decode_result(node.apply_raw(payload, 1)) == IncrResult(1, 1)
    state = node.state()
    assert decode_result(node.apply_raw(payload, 1)) == Replayed(1)
    assert decode_result(node.apply_raw(encode_command(Set(b"x", b"", 0, 0, 99)), 1)) == Replayed(1)
    assert node.state() == state


def test_retry_with_same_request_id_returns_cached_result(node: Node) -> None:
    first = node.apply_raw(encode_command(Incr(b"n", 5, 10, rid(1))))
    node.apply(Set(b"other", b"v", 0, Condition.ALWAYS, 11))
    # The retry lands at a new index: same bytes back, counter unchanged.
    again = node.apply_raw(encode_command(Incr(b"n", 5, 12, rid(1))))
    assert again == first and decode_result(again) == IncrResult(5, 1)
    assert node.get(b"n") == Record(b"5", 1, 0)
    r = node.s.reader(G)
    assert (r.applied_index(), r.clock_ms()) == (3, 12)
    assert node.apply(Incr(b"n", 5, 13, rid(2))) == IncrResult(10, 4)  # next seq applies
    assert node.apply(Incr(b"n", 5, 13, rid(1, b"other-client"))) == IncrResult(15, 5)
    # Errors are remembered too: the retry gets the same answer.
    node.apply(Set(b"t", b"text", 0, Condition.ALWAYS, 14))
    e1 = node.apply_raw(encode_command(Incr(b"t", 1, 15, rid(3))))
    node.apply(Set(b"t", b"1", 0, Condition.ALWAYS, 16))
    assert node.apply_raw(encode_command(Incr(b"t", 1, 17, rid(3)))) == e1


def test_unsafe_dup_incr_applies_retries_again(tmp_path: Path) -> None:
    node = Node(MemoryStorage(), ShardStateMachine(unsafe_dup_incr=True))
    assert node.apply(Incr(b"n", 5, 10, rid(1))) == IncrResult(5, 1)
    assert node.apply(Incr(b"n", 5, 11, rid(1))) == IncrResult(10, 2)  # the bug, on purpose
    assert node.get(b"n") == Record(b"10", 2, 0)
    # Only Incr is affected.
    assert node.apply(Set(b"s", b"a", 0, Condition.IF_ABSENT, 12, rid(2))) == SetResult(True, 3)
    assert node.apply(Set(b"s", b"a", 0, Condition.IF_ABSENT, 13, rid(2))) == SetResult(True, 3)


REUSES = [
    # (first request, another request with the same request id)
    (Set(b"k", b"v", 0, Condition.ALWAYS, 10), Incr(b"k", 1, 11)),  # another command
    (Set(b"k", b"v", 0, Condition.ALWAYS, 10), Set(b"j", b"v", 0, Condition.ALWAYS, 11)),  # another key
    (Set(b"k", b"v", 0, Condition.ALWAYS, 10), Set(b"k", b"w", 0, Condition.ALWAYS, 11)),  # another value
    (Set(b"k", b"v", 0, Condition.ALWAYS, 10), Set(b"k", b"v", 0, Condition.IF_ABSENT, 11)),
    (Incr(b"n", 1, 10), Incr(b"n", 2, 11)),
    (Delete(b"k", 10), Delete(b"j", 11)),
    (CompareAndSet(b"k", None, None, True, b"v", 0, 10), CompareAndSet(b"k", None, 0, False, b"v", 0, 11)),
    (CompareAndSet(b"k", b"a", None, False, b"v", 0, 10), CompareAndSet(b"k", b"b", None, False, b"v", 0, 11)),
    (MSet(((b"a", b"1", 0), (b"b", b"2", 0)), 10), MSet(((b"a", b"1", 0), (b"b", b"3", 0)), 11)),
    (MSet(((b"a", b"12", 0),), 10), MSet(((b"a1", b"2", 0),), 11)),  # the same bytes, split elsewhere
]


@pytest.mark.parametrize(("first", "other"), REUSES)
def test_a_request_id_reused_for_a_different_request_is_refused(node: Node, first: Command, other: Command) -> None:
    """Answering the reuse with the first request's result would tell its
    client that a write was applied when nothing was (or hand an incr the
    result of a set)."""
    first, other = first.replace(rid=rid(1)), other.replace(rid=rid(1))
    answer = node.apply_raw(encode_command(first))
    data = [node.get(k) for k in (b"k", b"j", b"n", b"a", b"b", b"a1")]
    res = node.apply(other)
    assert isinstance(res, ErrorResult) and res.kind == FailedPrecondition.kind, res
    assert "request id (client 636c69656e74, seq 1) was already used on this shard for a different request" in res.message
    assert "nothing was applied on this shard. A retry must repeat its request exactly" in res.message
    assert [node.get(k) for k in (b"k", b"j", b"n", b"a", b"b", b"a1")] == data
    assert node.s.reader(G).applied_index() == 2  # the refusal used its index, like any answer
    # The record is kept: a true retry of the first request still gets its answer.
    assert node.apply_raw(encode_command(first.replace(now_ms=12))) == answer


def test_a_retry_stamped_by_another_leader_is_the_same_request(node: Node) -> None:
    """A retry reaches a leader with another clock (or is restamped when
    forwarded): its stamp and expiries differ, and it is still the retry."""
    first = Set(b"k", b"v", 30_010, Condition.IF_ABSENT, 10, rid(1))
    answer = node.apply_raw(encode_command(first))
    assert node.apply_raw(encode_command(restamped(first, 5_000))) == answer
    mset = MSet(((b"a", b"1", 0), (b"b", b"2", 1_010)), 10, rid(2))
    answer = node.apply_raw(encode_command(mset))
    assert node.apply_raw(encode_command(restamped(mset, 9_999))) == answer


def test_a_dedup_record_from_before_fingerprints_still_answers_its_retries(node: Node) -> None:
    """Records written before fingerprints hold the encoded result alone;
    they live at most one dedup window after an upgrade."""
    b = node.s.begin()
    b.state(G).dedup_put(b"client", 1, encode_result(IncrResult(5, 1)), 10)
    b.commit()
    assert node.apply(Incr(b"n", 5, 11, rid(1))) == IncrResult(5, 1)
    assert node.get(b"n") is None


def test_dedup_entries_expire_after_the_window(node: Node) -> None:
    node.sm = ShardStateMachine(dedup_window_ms=1000)
    assert node.apply(Incr(b"n", 1, 10_000, rid(1))) == IncrResult(1, 1)
    assert node.apply(Incr(b"n", 1, 10_999, rid(1))) == IncrResult(1, 1)  # inside the window
    node.apply(Barrier(11_001))  # prunes entries stored before 10_001
    assert node.apply(Incr(b"n", 1, 11_002, rid(1))) == IncrResult(2, 4)


def test_dedup_prune_is_bounded_per_apply(node: Node) -> None:
    node.sm = ShardStateMachine(dedup_window_ms=10)
    for seq in range(1, 101):
        node.apply(Delete(b"k", 0, rid(seq)))
    node.apply(Barrier(1000))
    b = node.s.begin()
    w = b.state(G)
    remaining = sum(w.dedup_get(b"client", s) is not None for s in range(1, 101))
    b.abort()
    assert remaining == 100 - 64


# -- never raises ---------------------------------------------------------------


def _check_garbage_applied(node: Node, payload: bytes) -> None:
    before = node.s.reader(G).applied_index()
    out = node.apply_raw(payload)
    res = decode_result(out)  # always a well-formed result
    assert not isinstance(res, Replayed)
    assert node.s.reader(G).applied_index() == before + 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    _check_garbage_applied(Node(MemoryStorage()), payload)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=8)
    | st.text(max_size=4)
    | st.floats(),
    lambda inner: (
        st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10), st.lists(msgpack_values, max_size=10))
def test_well_framed_garbage_never_raises(tag: int, fields: list[Any]) -> None:
    # Right version byte and a plausible tag: exercises the field checks.
    _check_garbage_applied(Node(MemoryStorage()), bytes((1, tag)) + msgpack.packb(fields))


class _FaultyWriter:
    """Delegates to a real writer; ``fail`` names the method that raises ``exc``."""

    def __init__(self, w: StateWriter, fail: str, exc: Exception) -> None:
        self._w, self._fail, self._exc = w, fail, exc

    def __getattr__(self, name: str) -> Any:
        if name == self._fail:

            def boom(*a: Any, **k: Any) -> Any:
                raise self._exc

            return boom
        return getattr(self._w, name)


def test_storage_fault_propagates() -> None:
    s = MemoryStorage()
    b = s.begin()
    w = _FaultyWriter(b.state(G), "put", StorageFault("disk full"))
    with pytest.raises(StorageFault):
        ShardStateMachine().apply(encode_command(Set(b"k", b"v", 0, 0, 1)), 1, w)
    b.abort()


def test_storage_misbehaving_mid_write_is_a_fault() -> None:
    s = MemoryStorage()
    b = s.begin()
    w = _FaultyWriter(b.state(G), "dedup_put", RuntimeError("bug"))
    with pytest.raises(StorageFault):
        ShardStateMachine().apply(encode_command(Set(b"k", b"v", 0, 0, 1, rid(1))), 1, w)
    b.abort()


@pytest.mark.parametrize("exc", [StorageFault("disk full"), RuntimeError("bug")])
def test_an_mset_whose_writes_fail_is_a_fault(exc: Exception) -> None:
    """An MSet's keys go through put_values: a failure there stops the
    replica (the batch is aborted) instead of answering a half-applied write."""
    s = MemoryStorage()
    b = s.begin()
    w = _FaultyWriter(b.state(G), "put_values", exc)
    with pytest.raises(StorageFault):
        ShardStateMachine().apply(encode_command(MSet(((b"a", b"1", 0), (b"b", b"2", 0)), 5, rid(1))), 1, w)
    b.abort()
    assert s.reader(G).count() == 0


def test_logic_failure_is_an_internal_error_and_changes_no_data() -> None:
    s = MemoryStorage()
    b = s.begin()
    w = _FaultyWriter(b.state(G), "get", RuntimeError("bug while planning"))
    out = ShardStateMachine().apply(encode_command(Set(b"k", b"v", 0, Condition.IF_ABSENT, 7)), 1, w)
    res = decode_result(out)
    assert isinstance(res, ErrorResult) and res.kind == "internal" and "RuntimeError" in res.message
    b.commit()
    r = s.reader(G)
    assert (r.applied_index(), r.clock_ms(), r.count()) == (1, 7, 0)


@pytest.mark.parametrize("key_len", [1, 481, MAX_KEY_BYTES])  # inline, and over the inline part
@pytest.mark.parametrize("new_expiry", [0, 7000, 6000])  # none, another, the same
def test_an_unconditional_set_replaces_without_reading_the_old_record(
    node: Node, key_len: int, new_expiry: int
) -> None:
    """The old record matters only to a conditional set: an unconditional
    one replaces it blind (less work on every replica), and the storage
    keeps the count, the size and the expiry index right by itself."""
    key = b"k" * key_len
    node.apply(Set(key, b"old value", 6000, Condition.ALWAYS, 1000))
    b = node.s.begin()
    w = _FaultyWriter(b.state(G), "get", AssertionError("an unconditional set read the old record"))
    out = ShardStateMachine().apply(encode_command(Set(key, b"new", new_expiry, Condition.ALWAYS, 1000, rid(1))), 2, w)
    b.commit()
    assert decode_result(out) == SetResult(True, 2)
    assert node.get(key, 1000) == Record(b"new", 2, new_expiry)
    r = node.s.reader(G)
    assert r.expired(9000, 10) == ([(key, new_expiry)] if new_expiry else [])  # the old entry is gone
    assert (r.count(), r.size_bytes()) == (1, key_len + 3)


# -- codec ------------------------------------------------------------------------

keys = st.sampled_from([b"a", b"b", b"c", b"n"])
u64 = st.integers(0, 2**64 - 1)
rids = st.none() | st.builds(RequestId, st.binary(min_size=1, max_size=255), u64)


def cas_commands() -> st.SearchStrategy[CompareAndSet]:
    return st.one_of(
        st.builds(
            CompareAndSet,
            keys,
            st.binary(max_size=4),
            st.none(),
            st.just(False),
            st.binary(max_size=4),
            u64,
            u64,
            rids,
        ),
        st.builds(
            CompareAndSet,
            keys,
            st.none(),
            u64,
            st.just(False),
            st.binary(max_size=4),
            u64,
            u64,
            rids,
        ),
        st.builds(
            CompareAndSet,
            keys,
            st.none(),
            st.none(),
            st.just(True),
            st.binary(max_size=4),
            u64,
            u64,
            rids,
        ),
    )


any_commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(
        Set,
        st.binary(min_size=1, max_size=MAX_KEY_BYTES),
        st.binary(),
        u64,
        st.sampled_from(list(Condition)),
        u64,
        rids,
    ),
    st.builds(Delete, keys, u64, rids),
    cas_commands(),
    st.builds(Incr, keys, st.integers(I64_MIN, I64_MAX), u64, rids),
    st.builds(
        MSet,
        st.lists(st.tuples(keys, st.binary(max_size=4), u64), max_size=4).map(tuple),
        u64,
        rids,
    ),
    st.builds(Expire, st.lists(st.tuples(keys, u64), max_size=4).map(tuple), u64),
    st.builds(Barrier, u64),
)


@settings(max_examples=300, deadline=None)
@given(any_commands)
def test_command_codec_round_trip(cmd: Command) -> None:
    assert decode_command(encode_command(cmd)) == cmd


@settings(max_examples=300, deadline=None)
@given(any_commands.filter(lambda c: not isinstance(c, Expire | Barrier)), u64, rids)
def test_fingerprint_ignores_the_stamp_expiries_and_request_id(cmd: Command, now: int, other_rid: RequestId | None) -> None:
    assert fingerprint(restamped(cmd, now)) == fingerprint(cmd)
    assert fingerprint(cmd.replace(rid=other_rid)) == fingerprint(cmd)


@settings(max_examples=300, deadline=None)
@given(st.lists(any_commands.filter(lambda c: not isinstance(c, Expire | Barrier)), min_size=2, max_size=2))
def test_fingerprint_differs_when_the_request_does(pair: list[Command]) -> None:
    a, b = pair
    same = fingerprint(restamped(a, 0)) == fingerprint(restamped(b, 0))
    assert same == (_asked(a) == _asked(b)), (a, b)


def _asked(cmd: Command) -> tuple[object, ...]:
    """What a request asked for, as the fingerprint's contract lists it."""
    if isinstance(cmd, MSet):
        return ("MSet", tuple((k, v) for k, v, _ in cmd.items))
    if isinstance(cmd, Set):
        return ("Set", cmd.key, cmd.value, int(cmd.condition))
    if isinstance(cmd, CompareAndSet):
        return ("CAS", cmd.key, cmd.expected_value, cmd.expected_version, cmd.expect_absent, cmd.new_value)
    if isinstance(cmd, Incr):
        return ("Incr", cmd.key, cmd.delta)
    assert isinstance(cmd, Delete)
    return ("Delete", cmd.key)


any_results: st.SearchStrategy[Result] = st.one_of(
    st.builds(SetResult, st.booleans(), u64),
    st.builds(DeleteResult, st.booleans(), u64),
    st.builds(CasResult, st.booleans(), u64, st.booleans(), st.none() | st.binary(), u64),
    st.builds(IncrResult, st.integers(I64_MIN, I64_MAX), u64),
    st.builds(MSetResult, u64, u64),
    st.builds(ExpireResult, u64),
    st.builds(BarrierResult, u64, u64),
    st.builds(ErrorResult, st.text(), st.text()),
    st.builds(Replayed, u64),
)


@settings(max_examples=200, deadline=None)
@given(any_results)
def test_result_codec_round_trip(r: Result) -> None:
    assert decode_result(encode_result(r)) == r


@pytest.mark.parametrize(
    "cmd",
    [
        CompareAndSet(b"k", b"v", 1, False, b"n", 0, 1),
        CompareAndSet(b"k", None, None, False, b"n", 0, 1),
        CompareAndSet(b"k", b"v", None, True, b"n", 0, 1),
        Set(b"k", b"v", -1, 0, 1),
        Set(b"k", b"v", 0, 3, 1),
        Incr(b"k", I64_MAX + 1, 1),
        Delete(b"k", 2**64),
        Delete(b"k", 1, RequestId(b"", 1)),
        Delete(b"k", 1, RequestId(b"x" * 256, 1)),
        Delete(b"k", 1, RequestId(b"c", -1)),
    ],
)
def test_encoder_refuses_malformed_commands(cmd: Command) -> None:
    with pytest.raises(ValueError):
        encode_command(cmd)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Set(b"k", "text", 0, 0, 1),
        lambda: MSet([(b"k", b"v", 0)], 1),
        lambda: Expire(((b"k",),), 1),
    ],
    ids=["str-value", "mset-list", "expire-nested"],
)
def test_commands_of_the_wrong_types_never_encode(build: Callable[[], Command]) -> None:
    """Compiled (mypyc) command classes refuse wrong types when built
    (TypeError); interpreted ones build them and the encoder refuses them
    (ValueError).  Either way no such command reaches the log."""
    with pytest.raises((TypeError, ValueError)):
        encode_command(build())


def test_a_bool_never_reaches_the_log_as_an_int_field() -> None:
    """Interpreted, the encoder refuses a bool where an int belongs; a
    compiled ``Set`` stores it as the int it is (1), which then encodes as 1."""
    try:
        cmd = Set(b"k", b"v", 0, 0, True)
        payload = encode_command(cmd)
    except ValueError:
        return
    assert type(cmd.now_ms) is int and decode_command(payload).now_ms == 1


def test_command_encoding_is_compact() -> None:
    assert len(encode_command(Barrier(1_700_000_000_000))) <= 12
    small_set = Set(
        b"k" * 16, b"v" * 100, 0, Condition.ALWAYS, 1_700_000_000_000, RequestId(b"c" * 16, 12345)
    )
    assert len(encode_command(small_set)) <= 16 + 100 + 16 + 24


def test_error_result_maps_to_error_hierarchy() -> None:
    from cachenode._errors import FailedPrecondition, Internal

    assert isinstance(ErrorResult("failed_precondition", "m").to_error(), FailedPrecondition)
    assert isinstance(ErrorResult("no_such_kind", "m").to_error(), Internal)


def test_a_restamped_command_moves_every_expiry_it_sets_with_its_stamp() -> None:
    r = rid(7)
    assert restamped(Set(b"k", b"v", 6000, Condition.IF_ABSENT, 5000, r), 3000) == Set(
        b"k", b"v", 4000, Condition.IF_ABSENT, 3000, r)
    assert restamped(Set(b"k", b"v", 0, Condition.ALWAYS, 5000), 9000) == Set(b"k", b"v", 0, Condition.ALWAYS, 9000)
    assert restamped(CompareAndSet(b"k", b"old", None, False, b"new", 5500, 5000, r), 7000) == CompareAndSet(
        b"k", b"old", None, False, b"new", 7500, 7000, r)
    assert restamped(MSet(((b"a", b"1", 0), (b"b", b"2", 5100)), 5000, r), 2000) == MSet(
        ((b"a", b"1", 0), (b"b", b"2", 2100)), 2000, r)
    assert restamped(Delete(b"k", 5000, r), 1) == Delete(b"k", 1, r)
    assert restamped(Incr(b"n", -3, 5000, r), 8) == Incr(b"n", -3, 8, r)
    # Expire names records by the expiry they hold: those do not move.
    assert restamped(Expire(((b"k", 4000),), 5000), 4500) == Expire(((b"k", 4000),), 4500)
    assert restamped(Barrier(5000), 4000) == Barrier(4000)
    # An expiry already past stays past: moved below 1 it would read as "never".
    assert restamped(Set(b"k", b"v", 100, Condition.ALWAYS, 5000), 1000) == Set(b"k", b"v", 1, Condition.ALWAYS, 1000)


def test_restamp_command_reencodes_only_what_it_changes() -> None:
    payload = encode_command(Set(b"k", b"v", 6000, Condition.ALWAYS, 5000, rid(1)))
    assert decode_command(restamp_command(payload, 4000)) == Set(b"k", b"v", 5000, Condition.ALWAYS, 4000, rid(1))
    assert restamp_command(payload, 5000) is payload  # already this stamp
    garbage = b"\x01\x01\x93\xc0"
    assert restamp_command(garbage, 4000) is garbage  # malformed: every replica's apply rejects it as it is
    far = encode_command(Set(b"k", b"v", 2**64 - 1000, Condition.ALWAYS, 5000))
    assert decode_command(restamp_command(far, 6000)) == Set(b"k", b"v", 2**64 - 1, Condition.ALWAYS, 6000)


def test_restamp_command_restamps_each_command_of_a_multi_entry() -> None:
    """A Batch RPC's writes for one shard travel as one multi entry."""
    a = encode_command(Set(b"a", b"1", 5500, Condition.ALWAYS, 5000, rid(1)))
    b = encode_command(MSet(((b"b", b"2", 0), (b"c", b"3", 6000)), 5000, rid(2)))
    bad = b"\x01\x01\x93\xc0"
    entry = encode_multi([a, bad, b])
    out = decode_multi(restamp_command(entry, 4000))
    assert [decode_command(out[0]), out[1], decode_command(out[2])] == [
        Set(b"a", b"1", 4500, Condition.ALWAYS, 4000, rid(1)),
        bad,  # malformed on its own: every replica's apply rejects this command alone, as before
        MSet(((b"b", b"2", 0), (b"c", b"3", 5000)), 4000, rid(2)),
    ]
    assert restamp_command(entry, 5000) is entry
    assert restamp_command(b"\xc1\x93", 4000) == b"\xc1\x93"  # an undecodable multi entry stays as it is


def test_a_forwarded_command_restamped_by_the_leader_ends_no_ttl_early(node: Node) -> None:
    """The leader of the new term stamped a 1 s TTL at 10,000; a command the
    previous leader stamped at 11,500 (its chain ahead) is forwarded to it.
    Appended as stamped, it moves the shard's clock past the TTL at once;
    restamped with the leader's clock, the key lives its second."""
    node.apply(Set(b"ttl", b"v", 11_000, Condition.ALWAYS, 10_000))
    forwarded = encode_command(Set(b"other", b"w", 0, Condition.ALWAYS, 11_500))
    node.apply_raw(restamp_command(forwarded, 10_100))
    assert node.s.reader(G).clock_ms() == 10_100
    assert node.get(b"ttl") == Record(b"v", 1, 11_000)
    node.apply_raw(forwarded)  # what happened before: the key's TTL ends 500 ms early
    assert node.get(b"ttl") is None


# -- determinism, replay, snapshots (hypothesis) -----------------------------------

# Two long keys (LMDB stores them under a digest) that share their first 480 bytes.
small_keys = st.sampled_from(
    [b"a", b"b", b"c", b"n", b"L" * 480 + b"1", b"L" * 480 + b"2" * (MAX_KEY_BYTES - 480)]
)
values = st.sampled_from([b"", b"x", b"0", b"1", b"-5", b"41", b"9223372036854775807", b"abc"])
ttls = st.sampled_from([0, 0, 50, 100, 200, 400])  # relative to the leader clock; 0 = none
small_rids = st.none() | st.builds(RequestId, st.sampled_from([b"c1", b"c2"]), st.integers(1, 3))
T = 0  # now_ms and expiry placeholders, filled in by _timed


def _cas(
    key: bytes, mode: int, v: bytes, ver: int, new: bytes, ttl: int, r: RequestId | None
) -> CompareAndSet:
    if mode == 0:
        return CompareAndSet(key, v, None, False, new, ttl, T, r)
    if mode == 1:
        return CompareAndSet(key, None, ver, False, new, ttl, T, r)
    return CompareAndSet(key, None, None, True, new, ttl, T, r)


@dataclasses.dataclass(frozen=True)
class ExpireScan:
    """Placeholder: the leader's expiry loop proposes what its scan found
    ``lag`` entries ago (commands may have re-set those keys since)."""

    lag: int


commands: st.SearchStrategy[Command | ExpireScan] = st.one_of(
    st.builds(
        Set, small_keys, values, ttls, st.sampled_from(list(Condition)), st.just(T), small_rids
    ),
    st.builds(Delete, small_keys, st.just(T), small_rids),
    st.builds(
        _cas, small_keys, st.integers(0, 2), values, st.integers(0, 6), values, ttls, small_rids
    ),
    st.builds(
        Incr, small_keys, st.sampled_from([1, -1, 7, I64_MAX, I64_MIN]), st.just(T), small_rids
    ),
    st.builds(
        MSet,
        st.lists(st.tuples(small_keys, values, ttls), max_size=3).map(tuple),
        st.just(T),
        small_rids,
    ),
    st.builds(
        Expire,
        st.lists(st.tuples(small_keys, st.integers(0, 3000)), max_size=2).map(tuple),
        st.just(T),
    ),
    st.builds(ExpireScan, st.sampled_from([0, 0, 1, 3])),
    st.builds(ExpireScan, st.just(0)),
    st.builds(Barrier, st.just(T)),
)


def _stamp(cmd: Command, now: int) -> Command:
    def exp(ttl: int) -> int:
        return now + ttl if ttl else 0

    if isinstance(cmd, Set | CompareAndSet):
        return cmd.replace(expires_at_ms=exp(cmd.expires_at_ms), now_ms=now)
    if isinstance(cmd, MSet):
        return cmd.replace(items=tuple((k, v, exp(t)) for k, v, t in cmd.items), now_ms=now)
    return cmd.replace(now_ms=now)


def _timed(steps: list[tuple[Command | ExpireScan | bytes, int]]) -> list[bytes]:
    """Turn drawn steps into log entries the way a leader would.

    The leader clock mostly advances (by up to 300 ms) and sometimes steps
    back (a new leader with a slower clock); TTLs become absolute expiry
    times; ExpireScan becomes the Expire a leader would propose from its own
    (slightly stale) scan, found by applying the entries to a reference
    replica.  Garbage payloads stay as they are."""
    ref = Node(MemoryStorage(), ShardStateMachine(dedup_window_ms=700))
    out: list[bytes] = []
    scans: list[tuple[tuple[bytes, int], ...]] = []
    now = 0
    for cmd, step in steps:
        now = max(0, now + step)
        if isinstance(cmd, bytes):
            entry = cmd
        elif isinstance(cmd, ExpireScan):
            if cmd.lag == 0:
                r = ref.s.reader(G)
                found = tuple(r.expired(max(now, r.clock_ms()), 10))
            else:
                found = scans[-cmd.lag] if len(scans) >= cmd.lag else ()
            entry = encode_command(Expire(found, now))
        else:
            entry = encode_command(_stamp(cmd, now))
        out.append(entry)
        ref.apply_raw(entry)
        r = ref.s.reader(G)
        scans.append(tuple(r.expired(max(now, r.clock_ms()), 10)))
    return out


# Mostly real commands, some garbage: the log may hold anything.
payloads = st.lists(
    st.tuples(st.one_of(commands, commands, st.binary(max_size=6)), st.integers(-100, 300)),
    max_size=40,
).map(_timed)
batch_cuts = st.lists(st.booleans(), min_size=40, max_size=40)


def run(
    s: Storage, sm: ShardStateMachine, entries: list[bytes], cuts: list[bool], start: int = 1
) -> list[bytes]:
    """Apply entries[start-1:] at indices start.. in batches ending where ``cuts`` says."""
    out = []
    b = s.begin()
    for i in range(start, len(entries) + 1):
        out.append(sm.apply(entries[i - 1], i, b.state(G)))
        if cuts[i % len(cuts)]:
            b.commit()
            b = s.begin()
    b.commit()
    return out


def snapshot(s: Storage) -> tuple[list[tuple[bytes, Record]], int, int, int, int, bytes]:
    r = s.reader(G)
    out = io.BytesIO()
    r.dump(out)
    return (
        list(r.items()),
        r.applied_index(),
        r.clock_ms(),
        r.count(),
        r.size_bytes(),
        out.getvalue(),
    )


StorageMaker = Callable[[], Storage]


@pytest.fixture
def lmdb_maker(tmp_path: Path) -> Iterator[StorageMaker]:
    opened: list[Storage] = []

    def make() -> Storage:
        s = LmdbStorage(tempfile.mkdtemp(dir=tmp_path), map_size=1 << 26, fsync=False)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


hyp = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@hyp
@given(payloads, batch_cuts)
def test_lmdb_and_memory_agree(
    lmdb_maker: StorageMaker, entries: list[bytes], cuts: list[bool]
) -> None:
    sm = ShardStateMachine(dedup_window_ms=700)
    a, b = lmdb_maker(), MemoryStorage()
    ra = run(a, sm, entries, cuts)
    rb = run(b, sm, entries, [not c for c in cuts])  # batching must not matter either
    assert ra == rb
    assert snapshot(a) == snapshot(b)
    for r in ra:
        decode_result(r)


@hyp
@given(payloads, batch_cuts, st.data())
def test_replay_after_restart_changes_nothing(
    lmdb_maker: StorageMaker, entries: list[bytes], cuts: list[bool], data: st.DataObject
) -> None:
    sm = ShardStateMachine(dedup_window_ms=700)
    k = data.draw(st.integers(0, len(entries)))
    single = lmdb_maker()
    expected = run(single, sm, entries, cuts)
    restarted = lmdb_maker()
    run(restarted, sm, entries[:k], cuts)
    # pysyncobj after a restart: the whole journal again from index 1.
    again = run(restarted, sm, entries, cuts)
    assert again[:k] == [encode_result(Replayed(i)) for i in range(1, k + 1)]
    assert again[k:] == expected[k:]
    assert snapshot(restarted) == snapshot(single)


@hyp
@given(payloads, batch_cuts, st.data(), st.booleans())
def test_snapshot_then_rest_equals_all(
    lmdb_maker: StorageMaker,
    entries: list[bytes],
    cuts: list[bool],
    data: st.DataObject,
    to_memory: bool,
) -> None:
    sm = ShardStateMachine(dedup_window_ms=700)
    k = data.draw(st.integers(0, len(entries)))
    full = lmdb_maker()
    expected = run(full, sm, entries, cuts)
    leader = lmdb_maker()
    run(leader, sm, entries[:k], cuts)
    blob = io.BytesIO()
    leader.reader(G).dump(blob)
    fresh: Storage = MemoryStorage() if to_memory else lmdb_maker()
    b = fresh.begin()
    b.state(G).load(io.BytesIO(blob.getvalue()))
    b.commit()
    rest = run(fresh, sm, entries, cuts, start=k + 1)
    assert rest == expected[k:]
    assert snapshot(fresh) == snapshot(full)


# -- multi-command entries ------------------------------------------------------


def test_multi_entry_applies_each_command_independently(node: Node) -> None:
    from cachenode.fsm.codec import encode_multi, split_multi_result

    node.apply(Set(b"text", b"hello", 0, Condition.ALWAYS, 1000))
    cmds = [
        Set(b"a", b"1", 0, Condition.ALWAYS, 1000, rid(1)),
        Incr(b"ctr", 5, 1000, rid(2)),
        Incr(b"ctr", 5, 1000, rid(2)),  # a retry inside the same entry: applied once
        Incr(b"text", 1, 1000, rid(3)),  # refused, without failing its neighbours
        Set(b"a", b"2", 0, Condition.IF_ABSENT, 1001, rid(4)),
        Delete(b"nothing", 1002),
    ]
    out = node.apply_raw(encode_multi([encode_command(c) for c in cmds]))
    res = [decode_result(r) for r in split_multi_result(out, len(cmds))]
    assert res[0] == SetResult(True, 2)
    assert res[1] == IncrResult(5, 2) and res[2] == IncrResult(5, 2)
    assert isinstance(res[3], ErrorResult) and res[3].kind == "failed_precondition"
    assert res[4] == SetResult(False, 2)
    assert res[5] == DeleteResult(False, 2)
    assert node.get(b"ctr") == Record(b"5", 2)
    assert node.s.reader(G).applied_index() == 2 and node.s.reader(G).clock_ms() == 1002
    # replay of the same index changes nothing
    before = node.state()
    node.apply_raw(encode_multi([encode_command(c) for c in cmds]), index=2)
    assert node.state() == before


def test_malformed_multi_entry_is_an_error_result_and_moves_on(node: Node) -> None:
    from cachenode.fsm.codec import split_multi_result

    out = node.apply_raw(b"\xc1\xff\x00garbage")
    [only] = split_multi_result(out, 1)
    r = decode_result(only)
    assert isinstance(r, ErrorResult) and r.kind == "invalid_argument"
    assert node.s.reader(G).applied_index() == 1
    assert node.apply(Set(b"k", b"v", 0, Condition.ALWAYS, 5)) == SetResult(True, 2)


def test_multi_entry_same_state_on_lmdb_and_memory(tmp_path: Path) -> None:
    from cachenode.fsm.codec import encode_multi

    a, b = Node(LmdbStorage(tmp_path / "a", fsync=False)), Node(MemoryStorage())
    for n in (a, b):
        for i in range(20):
            cmds = [encode_command(Incr(b"c%d" % (j % 3), j, 100 + i, rid(i * 10 + j))) for j in range(5)]
            cmds.append(encode_command(Set(b"s%d" % i, b"v", 150 + i, Condition.ALWAYS, 100 + i)))
            n.apply_raw(encode_multi(cmds))
        n.apply(Expire(((b"s0", 150),), 10_000))
    assert a.state() == b.state()


def test_the_stored_map_is_parsed_again_only_when_rewritten() -> None:
    """``StoredMap`` (what the node reads every 0.1 s) answers what
    ``current_map`` answers, from one parse per write of the map."""
    from cachenode._types import ClusterMap, NodeInfo
    from cachenode.fsm.meta_machine import (
        MetaStateMachine,
        StoredMap,
        bootstrap_command,
        current_map,
        set_map_command,
    )

    s = MemoryStorage()
    meta, stored = MetaStateMachine(), StoredMap()

    def apply(payload: bytes, index: int) -> None:
        b = s.begin()
        meta.apply(payload, index, b.state(9))
        b.commit()

    assert stored.read(s.reader(9)) is None
    nodes = [NodeInfo(f"n{i}", f"127.0.0.1:{i + 1}", f"127.0.0.1:{i + 11}") for i in range(3)]
    first = ClusterMap.bootstrap(nodes, 4, 3)
    apply(bootstrap_command(first), 1)
    got = stored.read(s.reader(9))
    assert got == first == current_map(s.reader(9))
    assert stored.read(s.reader(9)) is got  # unchanged: not parsed again
    second = first.with_replicas(0, ["n0", "n1"])
    apply(set_map_command(first.version, second), 2)
    assert stored.read(s.reader(9)) == second == current_map(s.reader(9))


def test_a_large_encoding_does_not_leave_its_buffer_with_the_thread() -> None:
    """A msgpack packer keeps the largest buffer it ever needed: the
    thread's packer is dropped after an encoding over PACKER_KEEP_BYTES,
    and encodings before and after it are msgpack's own."""
    from cachenode.fsm import codec

    small = MSet(items=((b"k", b"v", 0),), now_ms=1)
    big = MSet(items=((b"k", b"x" * (codec.PACKER_KEEP_BYTES + 1), 0),), now_ms=1)
    assert decode_command(encode_command(small)) == small  # this thread now keeps a packer
    assert hasattr(codec._packers, "packer")
    assert decode_command(encode_command(big)) == big
    assert not hasattr(codec._packers, "packer"), "the grown packer was kept"
    assert encode_command(small) == encode_command(small)
    assert hasattr(codec._packers, "packer")


def test_value_classes_pickle_and_copy_as_dataclasses_did() -> None:
    import copy
    import pickle

    from cachenode._types import ShardDescriptor
    from cachenode.client.route_table import Route
    from cachenode.raft.group import GroupStatus

    values = [
        Record(b"v", 3, 7),
        Set(b"k", b"v", 0, Condition.IF_ABSENT, 5, RequestId(b"c", 2)),
        MSetResult(2, 9),
        GroupStatus("leader", "n1", 3, 10, 10, ("n1", "n2", "n3"), True),
    ]
    for v in values:
        for again in (pickle.loads(pickle.dumps(v)), copy.copy(v), copy.deepcopy(v)):
            assert again == v and type(again) is type(v) and hash(again) == hash(v)
    # (a compiled frozen dataclass such as ShardDescriptor cannot be pickled
    # or deep-copied itself, so a Route is only copied)
    route = Route(ShardDescriptor(0, 0, 10, 1, ("n1",)), "n1", "127.0.0.1:1")
    assert copy.copy(route) == route and copy.copy(route).shard is route.shard
