"""Conformance suite for the storage contract (cachenode.storage.base).

Every test in ``TestConformance`` runs against each storage: ``LmdbStorage``
(real files under pytest's tmp_path, fsync on) and the ``MemoryStorage``
test double.  LMDB-only behaviour (reopen, map full) is tested below it.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachenode._types import META_GROUP_ID
from cachenode.storage.base import MAX_KEY_BYTES, Batch, Record, Storage, StorageFault
from cachenode.storage.lmdb_store import LmdbStorage
from cachenode.storage.memory_store import MemoryStorage

Factory = Callable[[], Storage]


@pytest.fixture(params=["lmdb", "memory"])
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """A factory of fresh, empty storages of the parametrized kind."""
    opened: list[Storage] = []

    def make() -> Storage:
        s: Storage
        if request.param == "lmdb":
            s = LmdbStorage(tmp_path / f"db{len(opened)}", map_size=1 << 30, fsync=True)
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

    def test_batch_closed_after_commit(self, storage: Storage) -> None:
        b = storage.begin()
        b.state(1).put(b"k", rec(b"v"))
        b.commit()
        with pytest.raises(RuntimeError):
            b.commit()
        with pytest.raises(RuntimeError):
            b.state(2)
        b.abort()  # harmless


# -- LMDB only -------------------------------------------------------------------


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
    for fsync in (True, False):
        s = LmdbStorage(tmp_path / str(fsync), fsync=fsync)
        try:
            flags = s._env.flags()
            assert (flags["sync"], flags["metasync"], flags["writemap"]) == (fsync, fsync, False)
        finally:
            s.close()
