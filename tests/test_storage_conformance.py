"""Conformance suite for the storage contract (cachenode.storage.base).

Every test in ``TestConformance`` runs against each storage: ``LmdbStorage``
(real files under pytest's tmp_path, fsync on; with writemap, the default,
and without) and the ``MemoryStorage`` test double.  LMDB-only behaviour (reopen, map full) is tested below it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachenode._types import META_GROUP_ID
from cachenode.storage import lmdb_store
from cachenode.storage.base import MAX_KEY_BYTES, Batch, Record, Storage, StorageFault
from cachenode.storage.lmdb_store import (
    INLINE_KEY_BYTES,
    DumpReader,
    DumpWriter,
    LmdbStorage,
    stored_key,
)
from cachenode.storage.memory_store import MemoryStorage

Factory = Callable[[], Storage]


@pytest.fixture(params=["lmdb", "lmdb-nowritemap", "memory"])
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """A factory of fresh, empty storages of the parametrized kind."""
    opened: list[Storage] = []

    def make() -> Storage:
        s: Storage
        if request.param.startswith("lmdb"):
            s = LmdbStorage(
                tmp_path / f"db{len(opened)}", map_size=1 << 30, fsync=True, writemap=request.param == "lmdb"
            )
        else:
            s = MemoryStorage()
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def storage(make_storage: Factory) -> Storage:
    return make_storage()


def rec(value: bytes, version: int = 1, expires: int = 0) -> Record:
    return Record(value, version, expires)


def put_all(
    s: Storage, group: int, items: dict[bytes, Record], applied: int = 0, clock: int = 0
) -> None:
    b = s.begin()
    w = b.state(group)
    for k, r in items.items():
        w.put(k, r)
    if applied:
        w.set_applied(applied, clock)
    b.commit()


def dump_bytes(s: Storage, group: int) -> bytes:
    out = io.BytesIO()
    s.reader(group).dump(out)
    return out.getvalue()


def populate(s: Storage, group: int) -> None:
    """A group with data (with and without expiry), dedup entries and meta."""
    b = s.begin()
    w = b.state(group)
    for i in range(50):
        w.put(b"key%03d" % i, rec(b"v" * i, i + 1, 0 if i % 3 else 1000 + i))
    w.delete(b"key010")
    for seq in range(1, 6):
        w.dedup_put(b"client-a", seq, b"result%d" % seq, 100 * seq)
    w.dedup_put(b"b", 7, b"r", 150)
    w.set_applied(77, 5000)
    b.commit()


# Long keys: LMDB stores keys of more than INLINE_KEY_BYTES (480) bytes under
# their first 480 bytes + a digest.  P480 makes keys that share those bytes.
P400 = b"p" * 400
P480 = b"s" * INLINE_KEY_BYTES


def lkey(n: int, tag: bytes = b"", prefix: bytes = b"") -> bytes:
    """A distinct key of exactly ``n`` bytes: ``prefix``, then ``tag``, then filler."""
    assert len(prefix + tag) <= n
    return (prefix + tag + b"#%d#" % n)[:n].ljust(n, b"k")


LONG_LENGTHS = [401, 480, 481, 500, 1024, 4095, MAX_KEY_BYTES]


def populate_long(s: Storage, group: int) -> dict[bytes, Record]:
    """Short and long keys, with and without expiry, after overwrites and deletes.
    Returns what should be stored."""
    want: dict[bytes, Record] = {}
    b = s.begin()
    w = b.state(group)
    for i, n in enumerate(LONG_LENGTHS):
        for prefix in (b"", P400, P480):
            if len(prefix) >= n:
                continue
            k = lkey(n, b"%d" % i, prefix)
            want[k] = rec(b"v%d" % n * (i + 1), i + 1, 0 if i % 2 else 1000 + n)
            w.put(k, want[k])
    gone = lkey(4000, b"gone", P480)
    w.put(gone, rec(b"deleted again", 1, 5))
    assert w.delete(gone)
    moved = lkey(2000, b"moved", P480)
    w.put(moved, rec(b"first", 1, 7))
    want[moved] = rec(b"second", 2, 9)
    w.put(moved, want[moved])
    for i in range(5):
        want[b"short%d" % i] = rec(b"s", 1, 500 + i if i % 2 else 0)
        w.put(b"short%d" % i, want[b"short%d" % i])
    w.put(P480, rec(b"exactly 480", 1, 1000))  # a short key that prefixes long ones
    want[P480] = rec(b"exactly 480", 1, 1000)
    w.dedup_put(b"client-a", 1, b"r1", 100)
    w.set_applied(42, 4200)
    b.commit()
    return want


def collision_free_pair() -> tuple[bytes, bytes]:
    """Two long keys sharing the first 480 bytes whose digest order is the
    reverse of their byte order."""
    for i in range(1000):
        x, y = P480 + b"%03d" % i, P480 + b"%03d" % (i + 1)
        if stored_key(x) > stored_key(y):
            return x, y
    raise AssertionError("no inverted pair found")


class _ConstantDigest:
    """Stands in for hashlib.blake2b: every key has the same digest."""

    def __init__(self, data: bytes, digest_size: int) -> None:
        self.size = digest_size

    def digest(self) -> bytes:
        return b"\x00" * self.size


class TestConformance:
    def test_put_get_delete(self, storage: Storage) -> None:
        b = storage.begin()
        w = b.state(1)
        assert w.get(b"k") is None
        w.put(b"k", rec(b"v1", 3, 99))
        assert w.get(b"k") == rec(b"v1", 3, 99)  # a writer reads its own writes
        w.put(b"k", rec(b"v2", 4))
        assert w.get(b"k") == rec(b"v2", 4)
        w.put(b"", rec(b"empty key is opaque bytes too", 5))
        b.commit()
        r = storage.reader(1)
        assert r.get(b"k") == rec(b"v2", 4)
        assert r.get(b"") is not None
        b = storage.begin()
        w = b.state(1)
        assert w.delete(b"k") is True
        assert w.delete(b"k") is False
        assert w.delete(b"never") is False
        assert w.get(b"k") is None
        b.commit()
        assert r.get(b"k") is None

    def test_items_in_key_order(self, storage: Storage) -> None:
        keys = [b"b", b"a", b"\x00", b"ab", b"\xff\xff", b"aa"]
        put_all(storage, 1, {k: rec(k) for k in keys})
        assert [k for k, _ in storage.reader(1).items()] == sorted(keys)
        b = storage.begin()
        assert [k for k, _ in b.state(1).items()] == sorted(keys)
        b.abort()

    def test_readers_do_not_see_uncommitted_writes(self, storage: Storage) -> None:
        put_all(storage, 1, {b"a": rec(b"old")}, applied=1, clock=10)
        r = storage.reader(1)
        b = storage.begin()
        w = b.state(1)
        w.put(b"a", rec(b"new", 2))
        w.put(b"b", rec(b"b", 2, 50))
        w.set_applied(2, 20)
        # Same thread, batch open: committed view only, no deadlock.
        assert r.get(b"a") == rec(b"old")
        assert r.get(b"b") is None
        assert (r.applied_index(), r.clock_ms(), r.count()) == (1, 10, 1)
        assert r.expired(100, 10) == []
        assert [k for k, _ in r.items()] == [b"a"]
        b.commit()
        assert r.get(b"a") == rec(b"new", 2)
        assert (r.applied_index(), r.clock_ms(), r.count()) == (2, 20, 2)

    def test_abort_discards(self, storage: Storage) -> None:
        put_all(storage, 1, {b"a": rec(b"kept")}, applied=1, clock=1)
        before = dump_bytes(storage, 1)
        b = storage.begin()
        w = b.state(1)
        w.put(b"a", rec(b"changed", 2, 7))
        w.put(b"z", rec(b"z", 2))
        w.delete(b"a")
        w.dedup_put(b"c", 1, b"r", 1)
        w.set_applied(2, 2)
        b.log.append(1, 1, 1, b"cmd")
        b.log.set_meta(1, "term", b"1")
        b.abort()
        assert dump_bytes(storage, 1) == before
        assert storage.load_log(1) == []
        assert storage.load_log_meta(1) == {}
        b = storage.begin()  # the batch slot is free again
        assert b.state(1).dedup_get(b"c", 1) is None
        b.abort()

    def test_one_batch_at_a_time(self, storage: Storage) -> None:
        b = storage.begin()
        with pytest.raises(RuntimeError):
            storage.begin()
        assert b.state(3) is b.state(3)
        b.commit()
        storage.begin().abort()

    def test_applied_index_and_clock_commit_with_data(self, storage: Storage) -> None:
        r = storage.reader(1)
        assert (r.applied_index(), r.clock_ms()) == (0, 0)
        b = storage.begin()
        w = b.state(1)
        w.put(b"k", rec(b"v", 5))
        w.set_applied(5, 1234)
        assert (w.applied_index(), w.clock_ms()) == (5, 1234)
        b.abort()
        assert (r.applied_index(), r.clock_ms(), r.get(b"k")) == (0, 0, None)
        b = storage.begin()
        w = b.state(1)
        assert (w.applied_index(), w.clock_ms()) == (0, 0)
        w.put(b"k", rec(b"v", 5))
        w.set_applied(5, 1234)
        b.commit()
        assert (r.applied_index(), r.clock_ms(), r.get(b"k")) == (5, 1234, rec(b"v", 5))
        b = storage.begin()
        w = b.state(1)
        assert (w.applied_index(), w.clock_ms()) == (5, 1234)  # a new batch starts from disk
        b.abort()

    def test_expiry_index_order_and_limit(self, storage: Storage) -> None:
        put_all(
            storage,
            1,
            {
                b"c": rec(b"", 1, 300),
                b"a": rec(b"", 1, 300),
                b"b": rec(b"", 1, 100),
                b"never": rec(b"", 1, 0),
                b"late": rec(b"", 1, 10_000),
                b"big": rec(b"", 1, 2**64 - 1),
            },
        )
        r = storage.reader(1)
        assert r.expired(1000, 10) == [(b"b", 100), (b"a", 300), (b"c", 300)]
        assert r.expired(1000, 2) == [(b"b", 100), (b"a", 300)]
        assert r.expired(300, 10) == [(b"b", 100), (b"a", 300), (b"c", 300)]  # inclusive
        assert r.expired(299, 10) == [(b"b", 100)]
        assert r.expired(99, 10) == []
        assert r.expired(1000, 0) == []
        assert r.expired(2**64 - 1, 100)[-1] == (b"big", 2**64 - 1)
        b = storage.begin()
        w = b.state(1)
        assert w.expired(1000, 1) == [(b"b", 100)]
        b.abort()

    def test_expiry_index_follows_overwrite_and_delete(self, storage: Storage) -> None:
        put_all(
            storage, 1, {b"a": rec(b"", 1, 100), b"b": rec(b"", 1, 200), b"c": rec(b"", 1, 300)}
        )
        b = storage.begin()
        w = b.state(1)
        w.put(b"a", rec(b"", 2, 5000))  # moved later
        w.put(b"b", rec(b"", 2, 0))  # no longer expires
        w.delete(b"c")
        w.put(b"d", rec(b"", 2, 150))
        w.put(b"d", rec(b"x", 3, 150))  # same expiry, new value: one index entry
        assert w.expired(1000, 10) == [(b"d", 150)]
        b.commit()
        r = storage.reader(1)
        assert r.expired(10_000, 10) == [(b"d", 150), (b"a", 5000)]

    def test_counters(self, storage: Storage) -> None:
        r = storage.reader(1)
        assert (r.count(), r.size_bytes()) == (0, 0)
        b = storage.begin()
        w = b.state(1)
        w.put(b"ab", rec(b"12345"))
        w.put(b"c", rec(b"1"))
        assert (w.count(), w.size_bytes()) == (2, 2 + 5 + 1 + 1)
        w.put(b"ab", rec(b"1", 2))  # overwrite shrinks
        assert (w.count(), w.size_bytes()) == (2, 2 + 1 + 1 + 1)
        w.delete(b"c")
        w.delete(b"missing")
        assert (w.count(), w.size_bytes()) == (1, 3)
        b.commit()
        assert (r.count(), r.size_bytes()) == (1, 3)
        b = storage.begin()
        b.state(1).delete(b"ab")
        b.commit()
        assert (r.count(), r.size_bytes()) == (0, 0)

    @pytest.mark.parametrize("seed", range(4))
    def test_put_values_is_put_and_delete_item_by_item(self, make_storage: Factory, seed: int) -> None:
        """An MSet's fast path leaves exactly the state that ``put`` and
        ``delete`` per item would: records, expiry index, counters, dump."""
        rng = random.Random(seed)
        keys = [b"k%d" % i for i in range(12)] + [b"L" * (INLINE_KEY_BYTES + 1 + i) for i in range(4)]
        clock = 1_000

        def item() -> tuple[bytes, bytes, int]:
            exp = rng.choice([0, 0, 0, clock - 1, clock, clock + 50, clock + 900])
            return rng.choice(keys), rng.randbytes(rng.randrange(0, 40)), exp

        before = {k: rec(rng.randbytes(8), 1, rng.choice([0, 0, 500, 2_000])) for k in rng.sample(keys, 8)}
        batches = [tuple(item() for _ in range(rng.randrange(1, 12))) for _ in range(6)]
        fast, slow = make_storage(), make_storage()
        for s in (fast, slow):
            put_all(s, 3, before)
            put_all(s, 4, {b"k1": rec(b"other group", 1, 700)})
        for version, items in enumerate(batches, start=2):
            bf, bs = fast.begin(), slow.begin()
            bf.state(3).put_values(items, version, clock)
            ws = bs.state(3)
            for k, v, exp in items:
                if exp and exp <= clock:
                    ws.delete(k)
                else:
                    ws.put(k, Record(v, version, exp))
            wf = bf.state(3)
            assert (wf.count(), wf.size_bytes()) == (ws.count(), ws.size_bytes())
            bf.commit()
            bs.commit()
        for g in (3, 4):
            rf, rs = fast.reader(g), slow.reader(g)
            assert list(rf.items()) == list(rs.items())
            assert rf.expired(10**9, 100) == rs.expired(10**9, 100)
            assert (rf.count(), rf.size_bytes()) == (rs.count(), rs.size_bytes())
            assert dump_bytes(fast, g) == dump_bytes(slow, g)
        # The items really landed (the test would pass on two no-ops otherwise).
        last: dict[bytes, tuple[bytes, int, int]] = {}
        for version, items in enumerate(batches, start=2):
            for k, v, exp in items:
                last[k] = (v, version, exp)
        r = fast.reader(3)
        for k, (v, version, exp) in last.items():
            got = r.get(k)
            if exp and exp <= clock:
                assert got is None
            else:
                assert got is not None and (got.value, got.version, got.expires_at_ms) == (v, version, exp)

    def test_answered_says_whether_a_request_id_has_a_dedup_record(self, storage: Storage) -> None:
        """Through the writer (its own uncommitted record), then the reader
        and a view (committed only), and gone once pruned."""
        b = storage.begin()
        w = b.state(1)
        assert not w.answered(b"c1", 1)
        w.dedup_put(b"c1", 1, b"r1", 100)
        assert w.answered(b"c1", 1) and not w.answered(b"c1", 2) and not w.answered(b"c2", 1)
        assert not storage.reader(1).answered(b"c1", 1)
        b.commit()
        assert storage.reader(1).answered(b"c1", 1) and not storage.reader(2).answered(b"c1", 1)
        with storage.view(1) as v:
            assert v.answered(b"c1", 1) and not v.answered(b"c1", 2)
        b = storage.begin()
        assert b.state(1).dedup_prune(101, 64) == 1
        b.commit()
        assert not storage.reader(1).answered(b"c1", 1)

    def test_dedup_get_put_prune(self, storage: Storage) -> None:
        b = storage.begin()
        w = b.state(1)
        assert w.dedup_get(b"c1", 1) is None
        w.dedup_put(b"c1", 1, b"r1", 100)
        w.dedup_put(b"c1", 2, b"r2", 100)
        w.dedup_put(b"c2", 1, b"r3", 50)
        w.dedup_put(b"c1", 3, b"r4", 300)
        assert w.dedup_get(b"c1", 1) == b"r1"
        assert w.dedup_get(b"c2", 1) == b"r3"
        assert w.dedup_get(b"c2", 2) is None
        assert w.dedup_prune(0, 64) == 0
        assert w.dedup_prune(-5, 64) == 0  # clock - window may be negative
        assert w.dedup_prune(50, 64) == 0  # strictly older only
        assert w.dedup_prune(101, 2) == 2  # oldest first: c2/1 (50), then c1/1 (100)
        assert w.dedup_get(b"c2", 1) is None
        assert w.dedup_get(b"c1", 1) is None
        assert w.dedup_get(b"c1", 2) == b"r2"
        b.commit()
        b = storage.begin()
        w = b.state(1)
        assert w.dedup_get(b"c1", 2) == b"r2"
        w.dedup_put(b"c1", 2, b"r2-again", 400)  # replacing moves it in time
        assert w.dedup_prune(301, 64) == 1  # only c1/3
        assert w.dedup_get(b"c1", 2) == b"r2-again"
        assert w.dedup_prune(401, 0) == 0
        assert w.dedup_prune(401, 64) == 1
        assert w.dedup_prune(10**9, 64) == 0
        with pytest.raises(ValueError):
            w.dedup_put(b"", 1, b"r", 1)
        with pytest.raises(ValueError):
            w.dedup_put(b"x" * 256, 1, b"r", 1)
        b.commit()

    def test_dedup_prune_tie_order(self, storage: Storage) -> None:
        # Same time: pruned in (len(client_id), client_id, seq) order everywhere.
        b = storage.begin()
        w = b.state(1)
        for cid, seq in [(b"bb", 1), (b"a", 2), (b"b", 1), (b"a", 1), (b"aa", 300)]:
            w.dedup_put(cid, seq, b"", 10)
        remaining = [(b"a", 1), (b"a", 2), (b"b", 1), (b"aa", 300), (b"bb", 1)]
        while remaining:
            assert w.dedup_prune(11, 1) == 1
            remaining.pop(0)
            assert [w.dedup_get(c, s) is not None for c, s in remaining] == [True] * len(remaining)
        b.commit()

    def test_dump_load_round_trip(self, make_storage: Factory) -> None:
        src = make_storage()
        populate(src, 1)
        blob = dump_bytes(src, 1)
        # Into another group of the same storage, and into a fresh storage.
        for dst, gid in [(src, 9), (make_storage(), 1), (make_storage(), META_GROUP_ID)]:
            b = dst.begin()
            b.state(gid).load(io.BytesIO(blob))
            b.commit()
            r, o = dst.reader(gid), src.reader(1)
            assert list(r.items()) == list(o.items())
            assert (r.applied_index(), r.clock_ms()) == (77, 5000)
            assert (r.count(), r.size_bytes()) == (o.count(), o.size_bytes())
            assert r.expired(10**6, 1000) == o.expired(10**6, 1000)
            assert dump_bytes(dst, gid) == blob
            b = dst.begin()
            w = b.state(gid)
            assert w.dedup_get(b"client-a", 3) == b"result3"
            assert w.dedup_prune(301, 64) == 4  # the time index was rebuilt
            b.abort()

    def test_load_replaces_existing_state(self, storage: Storage) -> None:
        populate(storage, 1)
        blob = dump_bytes(storage, 1)
        b = storage.begin()
        w = b.state(2)
        w.put(b"stale", rec(b"x", 1, 5))
        w.dedup_put(b"stale", 1, b"", 1)
        w.set_applied(999, 999)
        w.load(io.BytesIO(blob))
        assert w.get(b"stale") is None
        assert w.dedup_get(b"stale", 1) is None
        assert (w.applied_index(), w.clock_ms()) == (77, 5000)
        assert w.count() == 49
        b.commit()
        assert dump_bytes(storage, 2) == blob

    def test_install_in_pieces_replaces_existing_state(self, storage: Storage) -> None:
        """A snapshot loaded over several batches: marked installing (and
        empty of meta) from the first, equal to a whole load at the end."""
        populate(storage, 1)
        blob = dump_bytes(storage, 1)
        populate_long(storage, 2)
        b = storage.begin()
        w = b.state(2)
        w.dedup_put(b"stale", 1, b"", 1)
        w.put(b"stale-expiring", rec(b"x", 1, 5))
        b.commit()
        assert not storage.reader(2).installing()
        b = storage.begin()
        w = b.state(2)
        w.begin_install()
        assert w.installing() and (w.applied_index(), w.clock_ms(), w.size_bytes()) == (0, 0, 0)
        b.commit()
        assert storage.reader(2).installing() and storage.reader(2).applied_index() == 0
        steps = 0
        while True:  # clearing, a few records per batch
            b = storage.begin()
            done = b.state(2).clear_some(3)
            b.commit()
            steps += 1
            if done:
                break
        assert steps > 3 and storage.reader(2).installing() and storage.reader(2).count() == 0
        assert list(storage.reader(2).items()) == [] and storage.reader(2).expired(10**9, 10) == []
        reader = DumpReader(io.BytesIO(blob))
        records = reader.records()
        while True:
            chunk = list(itertools.islice(records, 7))
            b = storage.begin()
            b.state(2).install_records(chunk)
            b.commit()
            if not chunk:
                break
        assert storage.reader(2).installing()
        b = storage.begin()
        b.state(2).end_install(reader.applied_index, reader.clock_ms, reader.count, reader.size_bytes)
        b.commit()
        assert not storage.reader(2).installing()
        assert dump_bytes(storage, 2) == blob
        assert storage.reader(2).expired(10**9, 100) == storage.reader(1).expired(10**9, 100)

    def test_a_view_sees_one_committed_state(self, storage: Storage) -> None:
        """Everything read through one view is of the same commit, also
        across commits made meanwhile (a stale read checks the install mark
        and reads the record in one view)."""
        put_all(storage, 5, {b"k": rec(b"old", 1)}, applied=3, clock=30)
        with storage.view(5) as v:
            assert v.get(b"k") == rec(b"old", 1) and not v.installing()
            b = storage.begin()
            w = b.state(5)
            w.put(b"k", rec(b"new", 4))
            w.begin_install()
            b.commit()
            assert v.get(b"k") == rec(b"old", 1) and not v.installing()
            assert (v.applied_index(), v.clock_ms(), v.count()) == (3, 30, 1)
            assert [k for k, _ in v.items()] == [b"k"]
        with storage.view(5) as v:
            assert v.installing() and v.get(b"k") == rec(b"new", 4) and v.applied_index() == 0

    def test_clear_removes_the_install_mark(self, storage: Storage) -> None:
        b = storage.begin()
        b.state(4).begin_install()
        b.commit()
        assert 4 in storage.groups()
        b = storage.begin()
        b.state(4).clear()
        b.commit()
        assert not storage.reader(4).installing() and 4 not in storage.groups()

    def test_load_from_writer_dump_in_same_batch(self, storage: Storage) -> None:
        b = storage.begin()
        w = b.state(1)
        w.put(b"k", rec(b"uncommitted", 4, 40))
        w.set_applied(4, 30)
        out = io.BytesIO()
        w.dump(out)  # a writer's dump includes the batch's writes
        b.state(2).load(io.BytesIO(out.getvalue()))
        b.commit()
        assert storage.reader(2).get(b"k") == rec(b"uncommitted", 4, 40)
        assert storage.reader(2).expired(40, 5) == [(b"k", 40)]

    def test_dumps_are_storage_independent(self, tmp_path: Path) -> None:
        lm = LmdbStorage(tmp_path / "x", fsync=False)
        mem = MemoryStorage()
        try:
            populate(lm, 3)
            populate(mem, 3)
            assert dump_bytes(lm, 3) == dump_bytes(mem, 3)
            b: Batch = mem.begin()
            b.state(4).load(io.BytesIO(dump_bytes(lm, 3)))
            b.commit()
            b = lm.begin()
            b.state(4).load(io.BytesIO(dump_bytes(mem, 3)))
            b.commit()
            assert dump_bytes(lm, 4) == dump_bytes(mem, 4) == dump_bytes(lm, 3)
        finally:
            lm.close()

    def test_empty_group_dump(self, storage: Storage) -> None:
        blob = dump_bytes(storage, 5)
        populate(storage, 6)
        b = storage.begin()
        b.state(6).load(io.BytesIO(blob))
        b.commit()
        assert list(storage.reader(6).items()) == []
        assert 6 not in storage.groups()

    def test_truncated_or_corrupt_dump_is_rejected(self, storage: Storage) -> None:
        b = storage.begin()
        w = b.state(1)
        w.put(b"k1", rec(b"v1", 1, 10))
        w.put(b"k2", rec(b"v2", 2))
        w.dedup_put(b"c", 1, b"r", 5)
        w.set_applied(2, 5)
        b.commit()
        blob = dump_bytes(storage, 1)
        populate(storage, 2)
        before = dump_bytes(storage, 2)
        bad = [blob[:n] for n in range(len(blob))]  # every truncation
        for i in range(len(blob)):  # every single-byte corruption
            bad.append(blob[:i] + bytes([blob[i] ^ 0x41]) + blob[i + 1 :])
        bad.append(b"not a dump at all")
        for data in bad:
            b = storage.begin()
            w = b.state(2)
            with pytest.raises(ValueError):
                w.load(io.BytesIO(data))
            # load is atomic: the group is untouched even inside the batch
            assert w.count() == 49 and w.applied_index() == 77
            assert w.get(b"key001") is not None and w.get(b"k1") is None
            w.put(b"after-failed-load", rec(b"x"))  # the batch stays usable
            b.abort()
        assert dump_bytes(storage, 2) == before

    def test_log(self, storage: Storage) -> None:
        b = storage.begin()
        log = b.log
        for i in [1, 2, 3, 255, 256, 257, 1000]:
            log.append(7, i, i // 100 + 1, b"cmd%d" % i)
        log.append(8, 1, 1, b"other group")
        log.set_meta(7, "term", b"3")
        log.set_meta(7, "voted", b"node-b")
        b.commit()
        assert [i for _, i, _ in storage.load_log(7)] == [1, 2, 3, 255, 256, 257, 1000]
        assert storage.load_log(7)[4] == (b"cmd256", 256, 3)
        assert storage.load_log_meta(7) == {"term": b"3", "voted": b"node-b"}
        b = storage.begin()
        b.log.delete_from(7, 256)
        b.log.delete_before(7, 2)
        b.log.append(7, 256, 9, b"replaced")
        b.log.append(7, 3, 9, b"overwritten")
        b.log.set_meta(7, "term", b"9")
        b.commit()
        assert storage.load_log(7) == [
            (b"cmd2", 2, 1),
            (b"overwritten", 3, 9),
            (b"cmd255", 255, 3),
            (b"replaced", 256, 9),
        ]
        assert storage.load_log_meta(7)["term"] == b"9"
        assert storage.log_sizes(7) == [(2, 1, 4), (3, 9, 11), (255, 3, 6), (256, 9, 8)]
        assert storage.log_entries(7, 3, 255) == [(b"overwritten", 3, 9), (b"cmd255", 255, 3)]
        assert storage.log_entries(7, 4, 254) == [] and storage.log_entries(7, 9, 3) == []
        assert storage.log_entries(7, 256, 10**9) == [(b"replaced", 256, 9)]
        assert storage.log_entries(8, 0, 10**9) == [(b"other group", 1, 1)]
        b = storage.begin()
        b.log.append(7, 257, 9, b"not yet committed")
        assert storage.log_entries(7, 257, 257) == [] and len(storage.log_sizes(7)) == 4
        b.abort()
        b = storage.begin()
        b.log.clear(7)
        b.commit()
        assert storage.load_log(7) == []
        assert storage.load_log_meta(7) == {"term": b"9", "voted": b"node-b"}  # clear keeps meta
        assert storage.load_log(8) == [(b"other group", 1, 1)]
        b = storage.begin()
        b.log.clear_meta(7)
        b.commit()
        assert storage.load_log_meta(7) == {}
        assert storage.load_log(99) == [] and storage.load_log_meta(99) == {}

    def test_commit_journal_makes_the_journal_readable_before_the_state(self, storage: Storage) -> None:
        b = storage.begin()
        b.log.append(3, 1, 1, b"entry")
        b.state(3).put(b"k", rec(b"v"))
        b.commit_journal()
        assert storage.log_entries(3, 1, 1) == [(b"entry", 1, 1)]
        assert storage.reader(3).get(b"k") is None  # the state waits for commit()
        b.commit()
        assert storage.reader(3).get(b"k") == rec(b"v")
        with pytest.raises(RuntimeError):
            b.commit()

    def test_log_edges_of_group_id_space(self, storage: Storage) -> None:
        b = storage.begin()
        for g in (0, 1, META_GROUP_ID):
            b.log.append(g, 5, 1, b"g%d" % g)
            b.log.append(g, 6, 1, b"g%d" % g)
        b.log.delete_from(META_GROUP_ID, 6)
        b.log.delete_before(0, 6)
        b.commit()
        assert [i for _, i, _ in storage.load_log(0)] == [6]
        assert [i for _, i, _ in storage.load_log(1)] == [5, 6]
        assert [i for _, i, _ in storage.load_log(META_GROUP_ID)] == [5]
        assert storage.log_sizes(0) == [(6, 1, 2)] and storage.log_sizes(2) == []
        assert storage.log_entries(META_GROUP_ID, 0, 2**64 - 1) == [(b"g%d" % META_GROUP_ID, 5, 1)]
        assert storage.log_entries(1, 6, 2**64 - 1) == [(b"g1", 6, 1)]

    def test_groups(self, storage: Storage) -> None:
        assert storage.groups() == set()
        b = storage.begin()
        b.state(1).put(b"k", rec(b"v"))
        b.state(2).set_applied(3, 4)
        b.state(3).dedup_put(b"c", 1, b"r", 1)
        b.log.append(4, 1, 1, b"x")
        b.log.set_meta(5, "term", b"1")
        b.state(META_GROUP_ID).put(b"m", rec(b"v"))
        b.state(6)  # touched but nothing written
        b.commit()
        assert storage.groups() == {1, 2, 3, 4, 5, META_GROUP_ID}
        b = storage.begin()
        for g in (1, 2, 3, META_GROUP_ID):
            b.state(g).clear()
        b.log.clear(4)
        b.log.clear_meta(5)
        b.commit()
        assert storage.groups() == set()

    def test_groups_are_isolated(self, storage: Storage) -> None:
        groups = [0, 1, 256, 65536, META_GROUP_ID]  # ids whose byte prefixes overlap
        b = storage.begin()
        for g in groups:
            w = b.state(g)
            w.put(b"shared", rec(b"%d" % g, g + 1, 100 + g % 1000))
            w.put(b"own%d" % g, rec(b"x"))
            w.dedup_put(b"c", 1, b"%d" % g, g % 1000)
            w.set_applied(g + 1, g)
        b.commit()
        for g in groups:
            r = storage.reader(g)
            assert r.get(b"shared") == rec(b"%d" % g, g + 1, 100 + g % 1000)
            assert [k for k, _ in r.items()] == sorted([b"shared", b"own%d" % g])
            assert r.count() == 2 and r.applied_index() == g + 1
            assert r.expired(10**6, 10) == [(b"shared", 100 + g % 1000)]
        b = storage.begin()
        b.state(256).clear()
        w = b.state(1)
        assert w.dedup_get(b"c", 1) == b"1"
        assert w.dedup_prune(10**6, 64) == 1
        b.commit()
        assert storage.reader(256).count() == 0 and storage.reader(256).get(b"shared") is None
        for g in (0, 65536, META_GROUP_ID):
            assert storage.reader(g).count() == 2
            b = storage.begin()
            assert b.state(g).dedup_get(b"c", 1) == b"%d" % g
            b.abort()

    def test_clear(self, storage: Storage) -> None:
        populate(storage, 1)
        b = storage.begin()
        w = b.state(1)
        w.clear()
        assert (w.count(), w.size_bytes(), w.applied_index(), w.clock_ms()) == (0, 0, 0, 0)
        assert w.get(b"key001") is None and w.dedup_get(b"client-a", 1) is None
        b.commit()
        r = storage.reader(1)
        assert list(r.items()) == [] and r.expired(10**9, 10) == [] and r.applied_index() == 0

    def test_reader_on_another_thread_while_writer_commits(self, storage: Storage) -> None:
        stop = threading.Event()
        errors: list[str] = []
        seen: set[int] = set()
        r = storage.reader(1)

        def read() -> None:
            while not stop.is_set():
                items = dict(r.items())  # one snapshot: a and b always agree
                if items and items[b"a"].value != items[b"b"].value:
                    errors.append(f"torn snapshot {items}")
                got = r.get(b"a")
                if got is not None:
                    if got.value == b"uncommitted":
                        errors.append("saw an uncommitted write")
                    seen.add(int(got.value))

        t = threading.Thread(target=read)
        t.start()
        try:
            for i in range(200):
                b = storage.begin()
                w = b.state(1)
                w.put(b"a", rec(b"%d" % i, i + 1))
                w.put(b"b", rec(b"%d" % i, i + 1))
                w.set_applied(i + 1, i)
                b.commit()
                b = storage.begin()
                b.state(1).put(b"a", rec(b"uncommitted"))
                b.abort()
            # A batch held open does not block readers on other threads.
            b = storage.begin()
            b.state(1).put(b"a", rec(b"uncommitted"))
            done = threading.Event()
            result: list[Record | None] = []

            def one_read() -> None:
                result.append(r.get(b"a"))
                done.set()

            threading.Thread(target=one_read).start()
            assert done.wait(5), "reader blocked by an open batch"
            assert result == [rec(b"199", 200)]
            # On a loaded machine the reader thread may not have run yet: give
            # it time to observe the last commit (the batch is still open).
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                time.sleep(0.001)
            b.abort()
        finally:
            stop.set()
            t.join(10)
        assert not errors, errors[:3]
        assert seen  # the reader did observe commits

    def test_oversized_key_rejected(self, storage: Storage) -> None:
        b = storage.begin()
        w = b.state(1)
        w.put(b"k" * MAX_KEY_BYTES, rec(b"max is fine", 1, 5))
        with pytest.raises(ValueError):
            w.put(b"k" * (MAX_KEY_BYTES + 1), rec(b"too long"))
        b.commit()
        assert storage.reader(1).expired(5, 1) == [(b"k" * MAX_KEY_BYTES, 5)]

    def test_oversized_key_is_absent_for_get_and_delete(self, storage: Storage) -> None:
        too_long = lkey(MAX_KEY_BYTES + 1)
        b = storage.begin()
        w = b.state(1)
        assert w.get(too_long) is None and w.get(too_long * 3) is None
        assert w.delete(too_long) is False
        b.commit()
        assert storage.reader(1).get(too_long) is None

    # -- keys longer than INLINE_KEY_BYTES --------------------------------------

    @pytest.mark.parametrize("n", LONG_LENGTHS)
    def test_long_key_put_get_overwrite_delete(self, storage: Storage, n: int) -> None:
        k = lkey(n, b"a", P400)
        near = lkey(n, b"b", P400)  # same length, same first 400 bytes
        b = storage.begin()
        w = b.state(1)
        w.put(k, rec(b"v1", 1, 99))
        assert w.get(k) == rec(b"v1", 1, 99)
        assert w.get(near) is None and w.get(k + b"x") is None and w.get(k[:-1]) is None
        w.put(k, rec(b"v2", 2))  # overwrite: new value, expiry dropped
        assert w.get(k) == rec(b"v2", 2)
        assert (w.count(), w.size_bytes()) == (1, n + 2)
        assert w.expired(10**6, 10) == []
        b.commit()
        r = storage.reader(1)
        assert r.get(k) == rec(b"v2", 2)
        assert r.get(near) is None
        assert list(r.items()) == [(k, rec(b"v2", 2))]
        b = storage.begin()
        w = b.state(1)
        assert w.delete(near) is False
        assert w.delete(k) is True
        assert w.delete(k) is False
        assert w.get(k) is None
        assert (w.count(), w.size_bytes()) == (0, 0)
        b.commit()
        assert r.get(k) is None and list(r.items()) == [] and r.count() == 0

    def test_long_keys_sharing_a_prefix_stay_distinct(self, storage: Storage) -> None:
        keys = [
            P400 + b"a" * 100,
            P400 + b"b" * 100,
            P480 + b"a",
            P480 + b"b",
            P480 + b"a" * 2,
            P480 + b"a" * (MAX_KEY_BYTES - INLINE_KEY_BYTES),
            P480 + b"a" * (MAX_KEY_BYTES - INLINE_KEY_BYTES - 1) + b"b",
            P480,  # short: 480 bytes
            P480[:-1],  # short
        ]
        put_all(storage, 1, {k: rec(b"%d" % len(k), i + 1, 1000 + i) for i, k in enumerate(keys)})
        r = storage.reader(1)
        for i, k in enumerate(keys):
            assert r.get(k) == rec(b"%d" % len(k), i + 1, 1000 + i)
        assert r.count() == len(keys)
        assert r.size_bytes() == sum(len(k) + len(b"%d" % len(k)) for k in keys)
        assert r.expired(10**6, 100) == [(k, 1000 + i) for i, k in enumerate(keys)]
        b = storage.begin()
        w = b.state(1)
        assert w.delete(keys[5]) is True
        assert w.get(keys[6]) == rec(b"4096", 7, 1006)  # its neighbour is untouched
        assert w.delete(keys[5]) is False
        b.commit()
        assert [k for k, _ in r.items()] == sorted(
            (k for i, k in enumerate(keys) if i != 5), key=stored_key
        )

    def test_items_order_with_long_keys(self, storage: Storage) -> None:
        x, y = collision_free_pair()  # byte order x < y, digest order y < x
        keys = [
            b"a",
            b"b" * 600,
            b"b" * 480,
            b"b" * 479 + b"c",
            P400 + b"z" * 200,
            P400 + b"y" * 1000,
            x,
            y,
            P480,
            P480 + b"\x00",
            b"\xff" * 4096,
            b"\xff" * 10,
        ]
        put_all(storage, 1, {k: rec(k[:8]) for k in keys})
        order = [k for k, _ in storage.reader(1).items()]
        assert order == sorted(keys, key=stored_key)
        # Byte order, except among long keys with the same first 480 bytes.
        for i, a in enumerate(order):
            for c in order[i + 1 :]:
                same_slot_prefix = (
                    len(a) > INLINE_KEY_BYTES
                    and len(c) > INLINE_KEY_BYTES
                    and a[:INLINE_KEY_BYTES] == c[:INLINE_KEY_BYTES]
                )
                assert a < c or same_slot_prefix, (a[:20], c[:20])
        assert order.index(y) < order.index(x)  # the documented exception
        b = storage.begin()
        assert [k for k, _ in b.state(1).items()] == order
        b.abort()

    def test_long_key_ttl_and_expired(self, storage: Storage) -> None:
        x, y = collision_free_pair()
        a, c = lkey(4096, b"a", P480), lkey(700, b"c")
        put_all(
            storage,
            1,
            {
                a: rec(b"", 1, 300),
                x: rec(b"", 1, 200),
                y: rec(b"", 1, 200),  # same time: stored-key order, so y first
                c: rec(b"", 1, 100),
                b"short": rec(b"", 1, 200),
                lkey(900, b"never"): rec(b"", 1, 0),
            },
        )
        r = storage.reader(1)
        want = [(c, 100), (b"short", 200), (y, 200), (x, 200), (a, 300)]
        assert r.expired(1000, 10) == want
        assert r.expired(1000, 3) == want[:3]
        assert r.expired(299, 10) == want[:4]
        b = storage.begin()
        w = b.state(1)
        w.put(a, rec(b"x", 2, 50))  # moved earlier
        w.put(x, rec(b"x", 2, 0))  # no longer expires
        w.delete(y)
        w.put(c, rec(b"new", 2, 100))  # same expiry, new value: one index entry
        assert w.expired(1000, 10) == [(a, 50), (c, 100), (b"short", 200)]
        b.commit()
        assert r.expired(1000, 10) == [(a, 50), (c, 100), (b"short", 200)]

    def test_long_key_counters(self, storage: Storage) -> None:
        a, c = lkey(1000, b"a"), lkey(4096, b"c", P480)
        b = storage.begin()
        w = b.state(1)
        w.put(a, rec(b"12345"))
        w.put(c, rec(b"1"))
        w.put(b"s", rec(b"12"))
        assert (w.count(), w.size_bytes()) == (3, 1000 + 5 + 4096 + 1 + 1 + 2)
        w.put(a, rec(b"1", 2))  # overwrite shrinks
        w.put(c, rec(b"123456789", 2))  # and grows
        assert (w.count(), w.size_bytes()) == (3, 1000 + 1 + 4096 + 9 + 3)
        w.delete(c)
        w.delete(lkey(4096, b"missing", P480))
        assert (w.count(), w.size_bytes()) == (2, 1001 + 3)
        b.commit()
        r = storage.reader(1)
        assert (r.count(), r.size_bytes()) == (2, 1004)

    def test_long_key_dump_load_round_trip(self, make_storage: Factory) -> None:
        src = make_storage()
        want = populate_long(src, 1)
        o = src.reader(1)
        assert dict(o.items()) == want
        assert [k for k, _ in o.items()] == sorted(want, key=stored_key)
        blob = dump_bytes(src, 1)
        for dst, gid in [(src, 9), (make_storage(), 1), (make_storage(), META_GROUP_ID)]:
            b = dst.begin()
            w = b.state(gid)
            w.put(lkey(3000, b"stale", P480), rec(b"replaced by the load", 1, 3))
            w.load(io.BytesIO(blob))
            assert w.get(lkey(3000, b"stale", P480)) is None
            b.commit()
            r = dst.reader(gid)
            assert list(r.items()) == list(o.items())
            assert (r.applied_index(), r.clock_ms()) == (42, 4200)
            assert (
                (r.count(), r.size_bytes())
                == (o.count(), o.size_bytes())
                == (
                    len(want),
                    sum(len(k) + len(v.value) for k, v in want.items()),
                )
            )
            assert r.expired(10**6, 1000) == o.expired(10**6, 1000)
            assert len(r.expired(10**6, 1000)) == sum(1 for v in want.values() if v.expires_at_ms)
            for k, v in want.items():
                assert r.get(k) == v
            assert dump_bytes(dst, gid) == blob
            b = dst.begin()  # the loaded long keys behave like written ones
            w = b.state(gid)
            k = next(k for k in want if len(k) == MAX_KEY_BYTES and k.startswith(P480))
            assert w.delete(k) is True and w.get(k) is None
            assert w.count() == len(want) - 1
            b.abort()

    def test_corrupt_long_key_dump_is_rejected(self, storage: Storage) -> None:
        src = MemoryStorage()
        populate_long(src, 1)
        blob = dump_bytes(src, 1)
        populate(storage, 2)
        before = dump_bytes(storage, 2)
        bad = [blob[:n] for n in range(0, len(blob), 97)]
        bad += [blob[:i] + bytes([blob[i] ^ 0x41]) + blob[i + 1 :] for i in range(9, len(blob), 89)]
        # Long keys in byte order instead of stored-key order.
        x, y = collision_free_pair()
        out = io.BytesIO()
        dw = DumpWriter(out, 1, 1)
        dw.data(x, rec_bytes(rec(b"x")))
        dw.data(y, rec_bytes(rec(b"y")))
        dw.finish()
        bad.append(out.getvalue())
        for data in bad:
            b = storage.begin()
            w = b.state(2)
            with pytest.raises(ValueError):
                w.load(io.BytesIO(data))
            assert w.count() == 49 and w.applied_index() == 77
            b.abort()
        assert dump_bytes(storage, 2) == before

    def test_digest_collision(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        a, c = P480 + b"a" * 10, P480 + b"c" * 600  # same first 480 bytes
        # A dump with both, written while their digests differ...
        good = MemoryStorage()
        put_all(good, 1, {a: rec(b"A"), c: rec(b"C")})
        blob = dump_bytes(good, 1)
        monkeypatch.setattr(lmdb_store, "_blake2b", _ConstantDigest)
        assert stored_key(a) == stored_key(c)
        # ...cannot be loaded where they collide (atomically refused).
        b = storage.begin()
        w = b.state(1)
        with pytest.raises(ValueError):
            w.load(io.BytesIO(blob))
        assert w.count() == 0
        # The key written last owns the slot; the other reads as absent.
        w.put(a, rec(b"A", 1, 100))
        w.put(b"short", rec(b"s"))
        w.put(c, rec(b"C" * 3, 2, 0))
        assert w.get(a) is None and w.get(c) == rec(b"CCC", 2)
        assert w.delete(a) is False
        assert (w.count(), w.size_bytes()) == (2, len(c) + 3 + 5 + 1)
        assert w.expired(10**6, 10) == []
        b.commit()
        r = storage.reader(1)
        assert r.get(a) is None and r.get(c) == rec(b"CCC", 2)
        assert list(r.items()) == [(b"short", rec(b"s")), (c, rec(b"CCC", 2))]
        b = storage.begin()
        w = b.state(1)
        w.put(a, rec(b"AA", 3, 70))
        assert w.get(c) is None and w.get(a) == rec(b"AA", 3, 70)
        assert w.expired(10**6, 10) == [(a, 70)]
        assert (w.count(), w.size_bytes()) == (2, len(a) + 2 + 5 + 1)
        assert w.delete(c) is False
        assert w.delete(a) is True
        assert (w.count(), w.size_bytes()) == (1, 6)
        b.commit()
        assert r.get(a) is None and r.get(c) is None and r.expired(10**6, 10) == []

    def test_batch_closed_after_commit(self, storage: Storage) -> None:
        b = storage.begin()
        b.state(1).put(b"k", rec(b"v"))
        b.commit()
        with pytest.raises(RuntimeError):
            b.commit()
        with pytest.raises(RuntimeError):
            b.state(2)
        b.abort()  # harmless


def rec_bytes(r: Record) -> bytes:
    return r.version.to_bytes(8, "big") + r.expires_at_ms.to_bytes(8, "big") + r.value


def test_long_key_dumps_are_storage_independent(tmp_path: Path) -> None:
    lm = LmdbStorage(tmp_path / "x", fsync=False)
    mem = MemoryStorage()
    try:
        assert populate_long(lm, 3) == populate_long(mem, 3)
        assert dump_bytes(lm, 3) == dump_bytes(mem, 3)
        for s in (lm, mem):
            r = s.reader(3)
            assert [k for k, _ in r.items()] == [k for k, _ in mem.reader(3).items()]
            assert r.expired(10**6, 1000) == mem.reader(3).expired(10**6, 1000)
        b: Batch = mem.begin()
        b.state(4).load(io.BytesIO(dump_bytes(lm, 3)))
        b.commit()
        b = lm.begin()
        b.state(4).load(io.BytesIO(dump_bytes(mem, 3)))
        b.commit()
        assert dump_bytes(lm, 4) == dump_bytes(mem, 4) == dump_bytes(lm, 3)
    finally:
        lm.close()


def test_digest_collision_same_on_both_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lmdb_store, "_blake2b", _ConstantDigest)
    lm = LmdbStorage(tmp_path / "x", fsync=False)
    mem = MemoryStorage()
    try:
        for s in (lm, mem):
            b = s.begin()
            w = b.state(1)
            w.put(P480 + b"1", rec(b"one", 1, 10))
            w.put(P480 + b"2" * 100, rec(b"two", 2, 20))
            w.put(P400 + b"3" * 100, rec(b"three", 3, 30))
            w.put(P480 + b"4" * 1000, rec(b"four", 4))
            w.delete(P480 + b"2" * 100)
            w.set_applied(4, 4)
            b.commit()
        assert dump_bytes(lm, 1) == dump_bytes(mem, 1)
        assert list(lm.reader(1).items()) == list(mem.reader(1).items())
        assert lm.reader(1).size_bytes() == mem.reader(1).size_bytes()
    finally:
        lm.close()


# -- LMDB only -------------------------------------------------------------------


def test_lmdb_key_layout(tmp_path: Path) -> None:
    """Pins the on-disk encoding: short keys exactly as before long keys
    existed, long keys as first 480 bytes + blake2b-128 with the rest in the value."""
    path = tmp_path / "layout"
    short, edge = b"k", b"e" * INLINE_KEY_BYTES
    long = lkey(1024, b"long", P480)
    s = LmdbStorage(path, fsync=False)
    put_all(s, 7, {short: rec(b"v", 1, 5), edge: rec(b"w", 2), long: rec(b"x", 3, 6)})
    s.close()
    s = LmdbStorage(path, fsync=False)
    try:
        g = (7).to_bytes(4, "big")
        k_long = long[:480] + hashlib.blake2b(long, digest_size=16).digest()
        with s._env.begin() as txn:
            data = dict(txn.cursor(db=s._dbs.data).iternext())
            expiry = dict(txn.cursor(db=s._dbs.expiry).iternext())
        assert data == {
            g + short: rec_bytes(rec(b"v", 1, 5)),
            g + edge: rec_bytes(rec(b"w", 2)),
            g + k_long: rec_bytes(rec(b"", 3, 6))
            + (1024 - 480).to_bytes(2, "big")
            + long[480:]
            + b"x",
        }
        assert len(g + k_long) == 500
        assert expiry == {
            g + (5).to_bytes(8, "big") + short: b"",
            g + (6).to_bytes(8, "big") + k_long: b"",
        }
        assert max(len(k) for k in expiry) <= 511
        r = s.reader(7)
        assert r.get(long) == rec(b"x", 3, 6)
        assert r.expired(10, 10) == [(short, 5), (long, 6)]
    finally:
        s.close()


def test_lmdb_reopen_finds_committed_not_aborted(tmp_path: Path) -> None:
    path = tmp_path / "node"
    s = LmdbStorage(path)
    populate(s, 1)
    b = s.begin()
    b.log.append(1, 1, 1, b"entry")
    b.log.set_meta(1, "term", b"1")
    b.commit()
    b = s.begin()
    b.state(1).put(b"aborted", rec(b"x"))
    b.state(1).set_applied(1000, 1000)
    b.log.append(1, 2, 1, b"aborted entry")
    b.abort()
    b = s.begin()  # left open: close() aborts it
    b.state(1).put(b"open at close", rec(b"x"))
    before = dump_bytes(s, 1)
    s.close()
    s = LmdbStorage(path)
    try:
        assert dump_bytes(s, 1) == before
        r = s.reader(1)
        assert r.get(b"aborted") is None and r.get(b"open at close") is None
        assert (r.applied_index(), r.clock_ms(), r.count()) == (77, 5000, 49)
        assert s.load_log(1) == [(b"entry", 1, 1)]
        assert s.load_log_meta(1) == {"term": b"1"}
        assert s.groups() == {1}
    finally:
        s.close()


def test_lmdb_map_full_is_a_storage_fault(tmp_path: Path) -> None:
    s = LmdbStorage(tmp_path / "tiny", map_size=1 << 20)
    try:
        b = s.begin()
        w = b.state(1)
        with pytest.raises(StorageFault):
            for i in range(10_000):
                w.put(b"k%d" % i, rec(b"x" * 4000))
        b.abort()
        b = s.begin()
        w = b.state(1)
        with pytest.raises(StorageFault):
            for i in range(10_000):
                w.put(b"k%d" % i, rec(b"x" * 4000))
        with pytest.raises(StorageFault):
            b.commit()  # a failed transaction cannot commit, and is released
        put_all(s, 1, {b"small": rec(b"ok")})  # the storage is still usable
        assert s.reader(1).get(b"small") == rec(b"ok")
    finally:
        s.close()


def test_lmdb_fsync_flags(tmp_path: Path) -> None:
    """The state is never synced by LMDB (it is rebuilt from the journal and
    snapshots after a machine crash: see LmdbStorage); the journal is, unless
    fsync=False."""
    for fsync, writemap in ((True, True), (False, True), (True, False)):
        s = LmdbStorage(tmp_path / f"{fsync}-{writemap}", fsync=fsync, writemap=writemap)
        try:
            flags = s._env.flags()
            assert (flags["sync"], flags["metasync"], flags["writemap"]) == (False, False, writemap)
            assert s._wal.fsync is fsync
        finally:
            s.close()


def test_lmdb_writemap_file_is_sparse(tmp_path: Path) -> None:
    """With writemap the data file is as large as the map but takes only the
    disk its pages use (the module docstring's promise to operators)."""
    s = LmdbStorage(tmp_path / "db", map_size=1 << 30, fsync=False)
    try:
        put_all(s, 1, {b"k%d" % i: rec(b"v" * 100) for i in range(1000)})
        st = (tmp_path / "db" / "data.mdb").stat()
        assert st.st_size == 1 << 30
        assert st.st_blocks * 512 < 16 << 20
    finally:
        s.close()


class _Changing(io.BytesIO):
    """A seekable dump whose bytes change after the first pass has read them."""

    def __init__(self, good: bytes, bad: bytes) -> None:
        super().__init__(good)
        self._bad = bad
        self._seeks = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self._seeks += 1
        if self._seeks == 1:  # the rewind before the second pass
            at = self.tell()
            self.getbuffer()[:] = self._bad
            super().seek(at)
        return super().seek(pos, whence)


class _OnePass(io.RawIOBase):
    """A stream that can be read once, like a socket."""

    def __init__(self, data: bytes) -> None:
        self._b = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray) -> int:  # type: ignore[override]
        return self._b.readinto(buf)


def test_lmdb_writemap_load_reads_a_stream_once_and_stops_at_the_end(tmp_path: Path) -> None:
    s = LmdbStorage(tmp_path / "db", fsync=False)
    try:
        populate(s, 1)
        blob = dump_bytes(s, 1)
        src = _OnePass(blob + b"TRAILER")
        b = s.begin()
        b.state(2).load(src)  # type: ignore[arg-type]
        b.commit()
        assert src.read() == b"TRAILER"  # the caller's stream ends where the dump did
        seekable = io.BytesIO(b"HEAD" + blob + b"TRAILER")
        seekable.seek(4)
        b = s.begin()
        b.state(3).load(seekable)
        b.commit()
        assert seekable.read() == b"TRAILER"
        assert dump_bytes(s, 2) == dump_bytes(s, 3) == blob
    finally:
        s.close()


def test_lmdb_writemap_load_that_changes_between_passes_is_a_storage_fault(tmp_path: Path) -> None:
    """The first pass validated the dump, the second finds other bytes: the
    group is half-written inside the batch, so it is a fault (the node
    stops; the batch never commits), never a silent partial load."""
    s = LmdbStorage(tmp_path / "db", fsync=False)
    try:
        populate(s, 1)
        blob = dump_bytes(s, 1)
        bad = blob[: len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 0xFF]) + blob[len(blob) // 2 + 1 :]
        before = dump_bytes(s, 2)
        b = s.begin()
        with pytest.raises(StorageFault, match="changed or could not be read again"):
            b.state(2).load(_Changing(blob, bad))
        b.abort()
        assert dump_bytes(s, 2) == before
    finally:
        s.close()
