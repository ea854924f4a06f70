"""The write-ahead log (cachenode.storage.wal) and the crash rules of LmdbStorage.

Real files in pytest's tmp_path.  A "crash" is played by copying the
directory while the log is open (what the disk holds at that moment, as a
process crash leaves it) and opening the copy; a machine crash that tears
the last write by cutting or scribbling over the copy's tail; a machine
restart by a different boot id (LmdbStorage's seam).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import hypothesis.strategies as st
import lmdb
import pytest
from hypothesis import HealthCheck, given, settings

from cachenode.storage.base import Record, StorageFault
from cachenode.storage.lmdb_store import LmdbStorage
from cachenode.storage.wal import WriteAheadLog


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def commit(wal: WriteAheadLog, ops: list[tuple]) -> None:
    b = wal.writer()
    for op in ops:
        getattr(b, op[0])(*op[1:])
    if b.write():
        wal.sync()
        wal.publish()


def snapshot_of(wal: WriteAheadLog, groups: range | list[int]) -> dict[int, tuple[list, dict]]:
    return {g: (wal.load_log(g), wal.load_log_meta(g)) for g in groups}


def crash_copy(src: Path, dst: Path) -> Path:
    """What the disk holds now, as a process crash would leave it.  Holes
    stay holes: with writemap, LMDB's data file is as large as its map."""
    shutil.copytree(src, dst, copy_function=_copy_sparse)
    return dst


def _copy_sparse(src: str, dst: str) -> None:
    subprocess.run(["cp", "--sparse=always", "--preserve=mode,timestamps", src, dst], check=True)


def segments(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix == ".wal")


def test_entries_and_meta_survive_a_reopen_across_many_segments(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "w", segment_bytes=4096)
    for i in range(1, 301):
        commit(wal, [("append", 1, i, 1 + i // 100, b"one-%d" % i), ("append", 2, i, 1, b"two" * 20)])
    commit(wal, [("set_meta", 1, "term", b"3"), ("set_meta", 1, "voted", b"n2"), ("delete_from", 2, 250)])
    before = snapshot_of(wal, [1, 2, 3])
    assert len(before[1][0]) == 300 and len(before[2][0]) == 249
    assert wal.stats()["segments"] >= 8
    wal.close()
    again = WriteAheadLog(tmp_path / "w", segment_bytes=4096)
    assert snapshot_of(again, [1, 2, 3]) == before
    assert again.log_entries(1, 100, 102) == [(b"one-100", 100, 2), (b"one-101", 101, 2), (b"one-102", 102, 2)]
    assert again.log_sizes(2)[-1] == (249, 1, 60)
    assert again.groups() == {1, 2}
    again.close()


def test_a_process_crash_loses_nothing_that_was_written(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "w", segment_bytes=8192)
    for i in range(1, 101):
        commit(wal, [("append", 7, i, 1, b"x%d" % i)])
    commit(wal, [("set_meta", 7, "term", b"1")])
    expected = snapshot_of(wal, [7])
    copy = crash_copy(tmp_path / "w", tmp_path / "crashed")  # never closed: no seal on the last segment
    wal.close()
    again = WriteAheadLog(copy, segment_bytes=8192)
    assert snapshot_of(again, [7]) == expected
    assert again.torn_frames == 0
    again.close()


@pytest.mark.parametrize("damage", ["cut", "scribble"])
def test_a_torn_last_write_is_dropped_and_everything_before_it_kept(tmp_path: Path, damage: str) -> None:
    wal = WriteAheadLog(tmp_path / "w")
    for i in range(1, 51):
        commit(wal, [("append", 1, i, 1, b"kept-%d" % i)])
    kept = snapshot_of(wal, [1])
    seg = wal._segments[-1]
    start = seg.end
    commit(wal, [("append", 1, 51, 1, b"torn" * 300)])  # the write a machine crash tears
    copy = crash_copy(tmp_path / "w", tmp_path / "crashed")
    wal.close()
    last = segments(copy)[-1]
    with open(last, "r+b") as f:
        if damage == "cut":  # the frame's second half never reached the disk
            f.seek(start + 600)
            f.write(bytes(800))
        else:  # the sector holding its header came back as garbage
            f.seek(start)
            f.write(b"\x13\x37" * 8)
    again = WriteAheadLog(copy)
    assert snapshot_of(again, [1]) == kept
    assert again.torn_frames == 1
    commit(again, [("append", 1, 51, 2, b"after the crash")])
    again.close()
    # The torn segment was sealed at its valid end: a second reopen reads it the same way.
    third = WriteAheadLog(copy)
    assert third.load_log(1)[-1] == (b"after the crash", 51, 2) and len(third.load_log(1)) == 51
    assert third.torn_frames == 0
    third.close()


def test_corruption_inside_a_completed_segment_stops_the_open(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "w", segment_bytes=4096)
    for i in range(1, 60):
        commit(wal, [("append", 1, i, 1, b"v" * 100)])
    wal.close()
    first = segments(tmp_path / "w")[0]
    data = bytearray(first.read_bytes())
    data[200] ^= 0xFF  # bit rot in a sealed segment
    first.write_bytes(bytes(data))
    with pytest.raises(StorageFault, match="corrupt .* rejoin"):
        WriteAheadLog(tmp_path / "w", segment_bytes=4096)


def test_a_segment_that_is_not_ours_stops_the_open(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "w")
    commit(wal, [("append", 1, 1, 1, b"a")])
    wal.close()
    segments(tmp_path / "w")[0].write_bytes(b"not a journal segment at all")
    with pytest.raises(StorageFault, match="damaged"):
        WriteAheadLog(tmp_path / "w")


def test_compacted_segments_are_deleted(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "w", segment_bytes=4096)
    for i in range(1, 401):
        commit(wal, [("append", 1, i, 1, b"e" * 64)])
    grown = wal.stats()["segments"]
    assert grown > 8
    commit(wal, [("delete_before", 1, 395)])  # a snapshot made entries before 395 unnecessary
    st_ = wal.stats()
    assert st_["segments"] <= 2 and st_["deleted_segments"] >= grown - 2
    assert [i for _, i, _ in wal.load_log(1)] == list(range(395, 401))
    wal.close()
    assert len(segments(tmp_path / "w")) <= 3  # the reopen adds one
    again = WriteAheadLog(tmp_path / "w", segment_bytes=4096)
    assert [i for _, i, _ in again.load_log(1)] == list(range(395, 401))
    again.close()


def test_an_idle_group_does_not_pin_old_segments(tmp_path: Path) -> None:
    """Group 9 writes once and never again; group 1 writes and compacts.
    Without copying group 9's entries forward the oldest segment (and so
    every later one) would stay forever."""
    clock = FakeClock()
    wal = WriteAheadLog(tmp_path / "w", segment_bytes=4096, monotonic=clock)
    commit(wal, [("append", 9, 1, 1, b"idle"), ("append", 9, 2, 1, b"idle too"), ("set_meta", 9, "term", b"1")])
    for i in range(1, 2001):
        commit(wal, [("append", 1, i, 1, b"busy" * 16)])
        if i % 50 == 0:
            commit(wal, [("delete_before", 1, i - 10)])
            clock.t += 1.0
    assert wal.rewritten_bytes > 0
    assert wal.stats()["segments"] <= 6
    assert wal.load_log(9) == [(b"idle", 1, 1), (b"idle too", 2, 1)]
    wal.close()
    again = WriteAheadLog(tmp_path / "w", segment_bytes=4096, monotonic=clock)
    assert again.load_log(9) == [(b"idle", 1, 1), (b"idle too", 2, 1)]
    assert again.load_log_meta(9) == {"term": b"1"}
    again.close()


def test_a_thrifty_log_frees_its_one_sealed_segment_without_a_write_of_its_own(tmp_path: Path) -> None:
    """Short of disk (``thrifty``), the few live entries of an idle group
    no longer keep the only sealed segment: a batch with nothing else to
    write copies them forward, and the segment is deleted.  Otherwise the
    log waits for a second sealed segment, and for a write."""
    clock = FakeClock()
    wal = WriteAheadLog(tmp_path / "w", segment_bytes=4096, monotonic=clock)
    commit(wal, [("append", 9, 1, 1, b"idle"), ("set_meta", 9, "term", b"1")])
    i = 0
    while wal.stats()["segments"] < 2:
        i += 1
        commit(wal, [("append", 1, i, 1, b"busy" * 16)])
    commit(wal, [("delete_before", 1, i)])  # group 1 compacted: only group 9 lives in the sealed segment
    clock.t += 10
    commit(wal, [("append", 1, i + 1, 1, b"one more")])
    assert wal.stats()["segments"] == 2 and wal.rewritten_bytes == 0, "one sealed segment is not copied from"
    empty = wal.writer()
    assert not empty.write(), "a batch with nothing to write writes nothing"
    empty.discard()

    wal.thrifty = True
    clock.t += 10
    commit(wal, [])
    st_ = wal.stats()
    assert st_["segments"] == 1 and st_["deleted_segments"] == 1 and wal.rewritten_bytes == len(b"idle"), st_
    assert wal.load_log(9) == [(b"idle", 1, 1)]
    assert [k for _, k, _ in wal.load_log(1)] == [i, i + 1]
    wal.close()
    again = WriteAheadLog(tmp_path / "w", segment_bytes=4096, monotonic=clock)
    assert again.load_log(9) == [(b"idle", 1, 1)] and again.load_log_meta(9) == {"term": b"1"}
    assert [k for _, k, _ in again.load_log(1)] == [i, i + 1]
    again.close()


def test_a_copy_forward_never_brings_back_an_entry_deleted_in_the_same_batch(tmp_path: Path) -> None:
    clock = FakeClock()
    wal = WriteAheadLog(tmp_path / "w", segment_bytes=4096, monotonic=clock)
    commit(wal, [("append", 9, i, 1, b"pinned %d" % i) for i in range(1, 4)])
    for i in range(1, 300):
        commit(wal, [("append", 1, i, 1, b"f" * 64), ("delete_before", 1, i)])
    clock.t += 10
    # This batch deletes group 9's entries 2 and 3 while the log copies group 9 forward.
    commit(wal, [("delete_from", 9, 2)])
    assert wal.load_log(9) == [(b"pinned 1", 1, 1)]
    wal.close()
    again = WriteAheadLog(tmp_path / "w", segment_bytes=4096)
    assert again.load_log(9) == [(b"pinned 1", 1, 1)]
    again.close()


def test_readers_on_other_threads_see_whole_batches(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "w", segment_bytes=16384)
    stop = threading.Event()
    bad: list[str] = []

    def read() -> None:
        while not stop.is_set():
            got = wal.load_log(1)
            idxs = [i for _, i, _ in got]
            if idxs and idxs != list(range(idxs[0], idxs[0] + len(idxs))):
                bad.append(f"gap in {idxs[:5]}...")
            if any(c != b"%d" % i * 10 for c, i, _ in got):
                bad.append("wrong bytes")

    t = threading.Thread(target=read)
    t.start()
    try:
        for i in range(1, 2001):
            ops = [("append", 1, i, 1, b"%d" % i * 10)]
            if i % 100 == 0:
                ops.append(("delete_before", 1, i - 50))
            commit(wal, ops)
    finally:
        stop.set()
        t.join()
    wal.close()
    assert bad == []


# ---- a model-based check: any sequence of operations, crashes and reopens ----

_op = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 3), st.integers(1, 40), st.integers(1, 4), st.binary(max_size=300)),
    st.tuples(st.just("delete_from"), st.integers(1, 3), st.integers(1, 40)),
    st.tuples(st.just("delete_before"), st.integers(1, 3), st.integers(1, 40)),
    st.tuples(st.just("clear"), st.integers(1, 3)),
    st.tuples(st.just("set_meta"), st.integers(1, 3), st.sampled_from(["term", "voted", "commit"]), st.binary(max_size=20)),
    st.tuples(st.just("clear_meta"), st.integers(1, 3)),
)
_step = st.one_of(
    st.lists(_op, min_size=1, max_size=6).map(lambda ops: ("batch", ops)),
    st.just(("reopen",)),
    st.just(("crash",)),
    st.just(("tick",)),
)


def _model_apply(model: dict[int, tuple[dict[int, tuple[int, bytes]], dict[str, bytes]]], op: tuple) -> None:
    kind, g = op[0], op[1]
    log, meta = model.setdefault(g, ({}, {}))
    if kind == "append":
        log[op[2]] = (op[3], op[4])
    elif kind == "delete_from":
        for i in [i for i in log if i >= op[2]]:
            del log[i]
    elif kind == "delete_before":
        for i in [i for i in log if i < op[2]]:
            del log[i]
    elif kind == "clear":
        log.clear()
    elif kind == "set_meta":
        meta[op[2]] = op[3]
    elif kind == "clear_meta":
        meta.clear()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_step, max_size=40))
def test_the_log_matches_a_model_through_crashes_and_reopens(tmp_path_factory: pytest.TempPathFactory, steps: list) -> None:
    base = tmp_path_factory.mktemp("model")
    clock = FakeClock()
    path = base / "w0"
    wal = WriteAheadLog(path, segment_bytes=4096, monotonic=clock)
    model: dict[int, tuple[dict[int, tuple[int, bytes]], dict[str, bytes]]] = {}
    n = 0
    for step in steps:
        if step[0] == "batch":
            commit(wal, step[1])
            for op in step[1]:
                _model_apply(model, op)
        elif step[0] == "reopen":
            wal.close()
            wal = WriteAheadLog(path, segment_bytes=4096, monotonic=clock)
        elif step[0] == "crash":
            n += 1
            copy = crash_copy(path, base / f"w{n}")
            wal.close()
            path = copy
            wal = WriteAheadLog(path, segment_bytes=4096, monotonic=clock)
        else:
            clock.t += 1.0
        for g in (1, 2, 3):
            log, meta = model.get(g, ({}, {}))
            assert wal.load_log(g) == [(log[i][1], i, log[i][0]) for i in sorted(log)]
            assert wal.load_log_meta(g) == meta
    wal.close()


# ---- LmdbStorage: the state and the journal across crashes ----------------


def _write(s: LmdbStorage, group: int, items: dict[bytes, bytes], index: int) -> None:
    b = s.begin()
    w = b.state(group)
    for k, v in items.items():
        w.put(k, Record(v, index))
    w.set_applied(index, 0)
    b.log.append(group, index, 1, b"entry %d" % index)
    b.commit()


def test_state_is_kept_after_a_process_crash(tmp_path: Path) -> None:
    s = LmdbStorage(tmp_path / "db", boot_id=lambda: "boot-1")
    _write(s, 1, {b"a": b"1"}, 5)
    copy = crash_copy(tmp_path / "db", tmp_path / "crashed")  # no clean close
    s.close()
    again = LmdbStorage(copy, boot_id=lambda: "boot-1")
    try:
        assert not again.rebuilt
        assert again.reader(1).get(b"a") == Record(b"1", 5)
        assert again.load_log(1) == [(b"entry 5", 5, 1)]
    finally:
        again.close()


def test_state_is_rebuilt_after_a_machine_crash_and_the_journal_kept(tmp_path: Path) -> None:
    s = LmdbStorage(tmp_path / "db", boot_id=lambda: "boot-1")
    _write(s, 1, {b"a": b"1", b"b": b"2"}, 5)
    copy = crash_copy(tmp_path / "db", tmp_path / "crashed")
    s.close()
    data = copy / "data.mdb"
    with open(data, "r+b") as f:  # what a torn unsynced write can leave behind
        f.seek(4096 * 2)
        f.write(os.urandom(4096 * 4))
    again = LmdbStorage(copy, boot_id=lambda: "boot-2")
    try:
        assert again.rebuilt
        assert again.reader(1).get(b"a") is None and again.reader(1).applied_index() == 0
        assert again.load_log(1) == [(b"entry 5", 5, 1)]  # the journal rebuilds it
    finally:
        again.close()


def test_a_state_file_that_is_mostly_free_pages_is_compacted_at_open(tmp_path: Path) -> None:
    """LMDB reuses the pages deletes free but never gives them back to the
    disk; an open gives them back when they are at least
    ``compact_at_open_bytes`` and half the file, and the state is whole."""
    s = LmdbStorage(tmp_path / "db", boot_id=lambda: "boot-1")
    big = {b"k%04d" % i: os.urandom(8000) for i in range(400)}  # 3.2 MB
    _write(s, 1, big, 5)
    _write(s, 2, {b"kept": b"v"}, 6)
    b = s.begin()
    w = b.state(1)
    for k in big:
        assert w.delete(k)
    w.set_applied(7, 0)
    b.log.append(1, 7, 1, b"entry 7")
    b.commit()
    s.close()
    data = tmp_path / "db" / "data.mdb"
    before = data.stat().st_blocks * 512
    assert before > 3 << 20
    (tmp_path / "db" / "data.mdb.compact").write_bytes(b"a copy a crash cut short")
    as_is = LmdbStorage(tmp_path / "db", boot_id=lambda: "boot-1")  # 3 MB free: under the 64 MiB default
    assert as_is.compacted_bytes == 0 and not (tmp_path / "db" / "data.mdb.compact").exists()
    as_is.close()
    assert data.stat().st_blocks * 512 >= before
    again = LmdbStorage(tmp_path / "db", boot_id=lambda: "boot-1", compact_at_open_bytes=1 << 20)
    try:
        assert again.compacted_bytes >= 3 << 20 and not again.rebuilt
        assert data.stat().st_blocks * 512 < before // 4
        assert again.reader(2).get(b"kept") == Record(b"v", 6)
        assert again.reader(1).get(b"k0001") is None and again.reader(1).applied_index() == 7
        assert again.load_log(1)[-1] == (b"entry 7", 7, 1)
        _write(again, 3, {b"after": b"x"}, 8)  # the new file takes writes
    finally:
        again.close()
    third = LmdbStorage(tmp_path / "db", boot_id=lambda: "boot-2", compact_at_open_bytes=1 << 20)
    try:  # a clean close: trusted after a reboot, nothing left to compact
        assert not third.rebuilt and third.compacted_bytes == 0
        assert third.reader(3).get(b"after") == Record(b"x", 8) and third.reader(2).get(b"kept") == Record(b"v", 6)
    finally:
        third.close()


def test_a_failed_write_back_of_the_state_makes_the_next_open_rebuild_it(tmp_path: Path) -> None:
    s = LmdbStorage(tmp_path / "db", boot_id=lambda: "boot-1")
    _write(s, 1, {b"a": b"1"}, 5)
    s._state_torn("EIO: simulated")  # what the sync thread does when env.sync fails
    with pytest.raises(StorageFault, match="could not be written back"):
        s.begin()
    s.close()
    again = LmdbStorage(tmp_path / "db", boot_id=lambda: "boot-1")  # same boot, clean close or not
    try:
        assert again.rebuilt and again.reader(1).get(b"a") is None
        assert again.load_log(1) == [(b"entry 5", 5, 1)]
        assert not (tmp_path / "db" / "state.torn").exists()
    finally:
        again.close()
    third = LmdbStorage(tmp_path / "db", boot_id=lambda: "boot-1")
    try:
        assert not third.rebuilt
    finally:
        third.close()


def test_a_clean_shutdown_is_trusted_after_a_machine_restart(tmp_path: Path) -> None:
    s = LmdbStorage(tmp_path / "db", boot_id=lambda: "boot-1")
    _write(s, 1, {b"a": b"1"}, 5)
    s.close()
    again = LmdbStorage(tmp_path / "db", boot_id=lambda: "boot-2")
    try:
        assert not again.rebuilt and again.reader(1).get(b"a") == Record(b"1", 5)
        _write(again, 1, {b"b": b"2"}, 6)
        copy = crash_copy(tmp_path / "db", tmp_path / "crashed")  # the clean mark went at open
    finally:
        again.close()
    third = LmdbStorage(copy, boot_id=lambda: "boot-3")
    try:
        assert third.rebuilt
    finally:
        third.close()


U32, U64 = struct.Struct(">I"), struct.Struct(">Q")


def make_legacy(path: Path, entries: int = 5, term: int = 2) -> None:
    """A data directory of before session 9: journal and meta in LMDB, synced."""
    env = lmdb.open(str(path), map_size=1 << 30, subdir=True, max_dbs=8)
    log_db, meta_db = env.open_db(b"log"), env.open_db(b"logmeta")
    for name in (b"data", b"expiry", b"dedup", b"dedupt", b"gmeta"):
        env.open_db(name)
    with env.begin(write=True) as txn:
        for g in (1, 2):
            for i in range(1, entries + 1):
                txn.put(U32.pack(g) + U64.pack(i), U64.pack(term) + b"g%d-%d" % (g, i), db=log_db)
            txn.put(U32.pack(g) + b"term", b"%d" % term, db=meta_db)
    env.sync(True)
    env.close()


def test_a_journal_kept_in_lmdb_moves_into_the_log_once(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_legacy(path)
    s = LmdbStorage(path, boot_id=lambda: "boot-1")
    try:
        assert s.load_log(2) == [(b"g2-%d" % i, i, 2) for i in range(1, 6)]
        assert s.load_log_meta(1) == {"term": b"2"}
        with s._env.begin() as txn:
            assert txn.cursor(db=s._dbs.log).first() is False
    finally:
        s.close()
    again = LmdbStorage(path, boot_id=lambda: "boot-1")
    try:
        assert again.load_log(1) == [(b"g1-%d" % i, i, 2) for i in range(1, 6)]
    finally:
        again.close()


def test_a_migration_cut_short_is_redone_and_a_reboot_meanwhile_loses_nothing(tmp_path: Path) -> None:
    """The legacy LMDB holds the only copy of the journal until the move is
    done: a machine restart in between must not count it as torn.  Frames
    of 100 bytes here, so the move takes several; the process dies after
    the second."""
    path = tmp_path / "db"
    make_legacy(path, entries=20)

    class DiesOnTheThird(WriteAheadLog):
        calls = 0

        def publish(self) -> None:
            DiesOnTheThird.calls += 1
            if DiesOnTheThird.calls == 3:
                raise SystemExit("the process dies half way")
            super().publish()

    with pytest.raises(SystemExit):
        LmdbStorage(path, boot_id=lambda: "boot-1", wal_class=DiesOnTheThird, migrate_frame_bytes=100)
    assert DiesOnTheThird.calls == 3
    assert not (path / "state.boot").exists()
    s = LmdbStorage(path, boot_id=lambda: "boot-2", migrate_frame_bytes=100)  # the machine restarted meanwhile
    try:
        assert not s.rebuilt
        assert s.load_log(1) == [(b"g1-%d" % i, i, 2) for i in range(1, 21)]
        assert s.load_log_meta(2) == {"term": b"2"}
    finally:
        s.close()


def test_the_legacy_journal_replaces_what_the_log_held_for_its_groups(tmp_path: Path) -> None:
    """A node upgraded, downgraded (its old version wrote the LMDB journal
    again) and upgraded again: the LMDB journal is the newer one."""
    path = tmp_path / "db"
    make_legacy(path, entries=5, term=2)
    LmdbStorage(path, boot_id=lambda: "boot-1").close()
    make_legacy(path, entries=3, term=7)  # what the old version wrote meanwhile
    s = LmdbStorage(path, boot_id=lambda: "boot-1")
    try:
        assert s.load_log(1) == [(b"g1-%d" % i, i, 7) for i in range(1, 4)]
        assert s.load_log_meta(1) == {"term": b"7"}
    finally:
        s.close()


def test_short_writes_are_finished_and_a_failed_write_is_never_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux moves at most 2 GiB per pwrite, and a full disk may write part
    of a frame: the log writes the rest, or fails the batch."""
    from cachenode.storage import wal as walmod

    real = os.pwrite
    monkeypatch.setattr(walmod.os, "pwrite", lambda fd, data, off: real(fd, bytes(data)[:700], off))
    wal = WriteAheadLog(tmp_path / "w", segment_bytes=1 << 20)
    commit(wal, [("append", 1, i, 1, bytes([i]) * 3000) for i in range(1, 5)])
    monkeypatch.setattr(walmod.os, "pwrite", lambda fd, data, off: 0)  # the disk is full
    b = wal.writer()
    b.append(1, 5, 1, b"never acknowledged")
    with pytest.raises(StorageFault, match="check the disk"):
        b.write()
    monkeypatch.setattr(walmod.os, "pwrite", real)
    assert [i for _, i, _ in wal.load_log(1)] == [1, 2, 3, 4]
    copy = crash_copy(tmp_path / "w", tmp_path / "crashed")
    wal.close()
    again = WriteAheadLog(copy)
    assert again.load_log(1) == [(bytes([i]) * 3000, i, 1) for i in range(1, 5)]
    again.close()


def test_a_segment_cut_short_while_created_is_ignored(tmp_path: Path) -> None:
    """A new segment gets its header and meta under a temporary name and is
    renamed only when complete: what a crash leaves half made is dropped."""
    wal = WriteAheadLog(tmp_path / "w", segment_bytes=4096)
    commit(wal, [("append", 1, 1, 1, b"acked"), ("set_meta", 1, "term", b"7")])
    wal.close()
    (tmp_path / "w" / f"{99:016x}.wal.tmp").write_bytes(bytes(4096))
    again = WriteAheadLog(tmp_path / "w", segment_bytes=4096)
    assert again.load_log(1) == [(b"acked", 1, 1)] and again.load_log_meta(1) == {"term": b"7"}
    assert not list((tmp_path / "w").glob("*.tmp"))
    again.close()


def test_a_bad_frame_followed_by_good_ones_is_corruption_not_a_torn_write(tmp_path: Path) -> None:
    """Each frame is synced before the next is written: frames after a bad
    one prove it was synced (maybe acknowledged), so it is not ignored."""
    wal = WriteAheadLog(tmp_path / "w")
    for i in range(1, 11):
        commit(wal, [("append", 1, i, 1, b"entry %d" % i), ("set_meta", 1, "term", b"%d" % i)])
    copy = crash_copy(tmp_path / "w", tmp_path / "crashed")
    wal.close()
    data = bytearray(segments(copy)[-1].read_bytes())
    at = data.find(b"entry 3")
    data[at] ^= 0x01
    segments(copy)[-1].write_bytes(bytes(data))
    with pytest.raises(StorageFault, match="corrupt"):
        WriteAheadLog(copy)


def test_a_failed_deletion_deletes_nothing_newer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A newer segment may hold the deletions of an older one's entries:
    deleting it while the older one stays would bring them back."""
    from cachenode.storage import wal as walmod

    wal = WriteAheadLog(tmp_path / "w", segment_bytes=4096)
    for i in range(1, 101):
        commit(wal, [("append", 1, i, 1, b"e" * 64)])
    real = os.unlink
    monkeypatch.setattr(walmod.os, "unlink", lambda path: (_ for _ in ()).throw(OSError(5, "I/O error")))
    commit(wal, [("delete_before", 1, 100)])
    assert wal.stats()["deleted_segments"] == 0
    monkeypatch.setattr(walmod.os, "unlink", real)
    wal.close()
    again = WriteAheadLog(tmp_path / "w", segment_bytes=4096)
    assert [i for _, i, _ in again.load_log(1)] == [100]
    again.close()


def test_a_clean_restart_goes_on_writing_in_the_last_segment(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "w", segment_bytes=1 << 20)
    commit(wal, [("append", 1, 1, 1, b"live")])
    wal.close()
    for _ in range(10):
        WriteAheadLog(tmp_path / "w", segment_bytes=1 << 20).close()
    assert len(segments(tmp_path / "w")) == 1
    again = WriteAheadLog(tmp_path / "w", segment_bytes=1 << 20)
    commit(again, [("append", 1, 2, 1, b"after")])
    copy = crash_copy(tmp_path / "w", tmp_path / "crashed")
    again.close()
    third = WriteAheadLog(copy, segment_bytes=1 << 20)
    assert [c for c, _, _ in third.load_log(1)] == [b"live", b"after"]
    third.close()


def test_a_large_live_log_at_the_oldest_end_moves_forward_once_the_log_grows(tmp_path: Path) -> None:
    """Group 9 keeps more than a quarter of the oldest segment live (it has
    not compacted yet) while group 1 writes and compacts: once the log
    holds much more than it needs, group 9's entries move forward."""
    clock = FakeClock()
    wal = WriteAheadLog(tmp_path / "w", segment_bytes=4096, monotonic=clock)
    commit(wal, [("append", 9, 1, 1, b"p" * 1500)])
    for i in range(1, 3001):
        commit(wal, [("append", 1, i, 1, b"busy" * 16), ("delete_before", 1, i)])
        clock.t += 0.1
    st_ = wal.stats()
    assert st_["rewritten_bytes"] >= 1500 and st_["segments"] <= 8
    assert wal.load_log(9) == [(b"p" * 1500, 1, 1)]
    wal.close()
